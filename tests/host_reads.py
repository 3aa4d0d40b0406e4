"""A counter of host reads: every way a tensor value reaches Python or the host, counted by name.

Two layers, because no single hook sees every path:

- the Python-level reads, patched on ``torch.Tensor`` itself so that every thread is seen (a torch mode is
  thread-local, and ke_fast gathers host-resident batches in a prefetching thread): ``item``, ``tolist``,
  ``numpy``, ``cpu``, ``__bool__`` (``if t:``), ``__float__``, ``__int__``, ``__index__`` and ``__format__``
  (``f"{t:.3f}"``). On a CUDA device each of them synchronises; on the CPU they are the same code path, so
  counting them on the CPU proves the loop would not synchronise on a GPU.
- a ``TorchDispatchMode`` (this thread) for what C++ does without passing through Python:
  ``aten._local_scalar_dense`` (the kernel behind every scalar read), device-to-host copies (``_to_copy`` /
  ``copy_`` into a CPU tensor from a non-CPU one) and the operators whose output size depends on values
  (``nonzero``, ``masked_select``, ``unique``, boolean indexing, ...), which wait for the device on CUDA.

A scalar read issued by one of the patched Python methods is counted once, under the method's name.
"""
from __future__ import annotations

import threading
import traceback
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PYTHON_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__")
aten = torch.ops.aten
# output size depends on the values: on CUDA each of these copies a count to the host and waits
VALUE_SIZED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
               aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.is_nonzero.default,
               aten.equal.default}


class HostReads:
    """The reads counted so far: ``counts`` by name, ``where`` the first stack frame in ke_fast of each."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.where: list[str] = []
        self.on = True
        self._lock = threading.Lock()
        self._inside = threading.local()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, name: str) -> None:
        if not self.on:
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "/ke_fast/" in f.filename]
        with self._lock:
            self.counts[name] += 1
            self.where.append(f"{name} at {frames[-1].filename}:{frames[-1].lineno}" if frames else name)

    def report(self) -> str:
        return f"{dict(self.counts)}: " + "; ".join(self.where[:20])


class _Mode(TorchDispatchMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inside = getattr(self.reads._inside, "depth", 0) > 0
        if func is aten._local_scalar_dense.default:
            if not inside:
                self.reads.add("_local_scalar_dense")
        elif func in VALUE_SIZED:
            self.reads.add(func.name())
        elif func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.reads.add("index with a boolean mask")
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0].device if func is aten.copy_.default else kwargs.get("device") or src.device
            if src.device.type != "cpu" and torch.device(dst).type == "cpu" and not inside:
                self.reads.add("device-to-host copy")
        return func(*args, **kwargs)


@contextmanager
def count_host_reads(monkeypatch) -> Iterator[HostReads]:
    """Counts every host read made inside the block (``reads.on = False`` pauses the count)."""
    reads = HostReads()

    def wrap(name, real):
        def read(self, *args, **kwargs):
            depth = getattr(reads._inside, "depth", 0)
            if depth == 0:
                reads.add(name)
            reads._inside.depth = depth + 1
            try:
                return real(self, *args, **kwargs)
            finally:
                reads._inside.depth = depth
        return read

    for name in PYTHON_READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        with _Mode(reads):
            yield reads
    finally:
        reads.on = False  # the patches stay until the test ends (monkeypatch), counting nothing
