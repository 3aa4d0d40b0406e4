"""The sparse/dense dispatcher: a WELS layer's compressed weight runs either the Triton sparse kernel or the
dense path (its W*M through cuDNN / cuBLAS, or torch's CPU kernels), whichever is faster.

Choice (``KE_FAST_SPARSE``, read by :mod:`ke_fast.ops` once, see ``ops.reload_settings``): ``off``, or an
implementation other than Triton for the input's device: always dense; ``on``: always sparse; ``auto`` (the
default): on the first call of a *decision key*, both paths are timed (:func:`path_seconds`) and the faster is
cached, as Triton's autotuner does. The key (:func:`sparse_decisions` shows it) names the op, the weight's shape
and kept count, the conv geometry (stride, padding, dilation, groups), the input's shape, dtype and device,
and whether the layer keeps its W*M (``kept``) or decompresses it per call. It does not name the layer nor the
implementation: layers with equal keys share one decision (the first of them to run is timed), and decisions
are made only where the Triton implementation runs. While torch.compile traces or a CUDA graph captures nothing
is timed: a cached decision, else the static rule :func:`static_choice` (not cached). Decisions can be kept
next to a model (:func:`save_sparse_decisions` / :func:`load_sparse_decisions`).

Determinism policy: the dispatcher never changes a layer's result beyond :func:`tolerance`.

1. Equal numerics on both paths. The sparse kernel multiplies exactly (fp32 inputs: IEEE fp32 products, no
   TF32; fp16 / bf16: the products are exact in fp32) and accumulates in fp32. The dense path it times and
   runs is computed the same way: TF32 and reduced-precision reductions are switched off around it for its op
   and dtype (``torch.backends.cudnn.allow_tf32`` for a conv2d in fp32, ``torch.backends.cuda.matmul.allow_tf32``
   for a linear in fp32, ``allow_fp16/bf16_reduced_precision_reduction`` for a linear in fp16 / bf16) and
   restored after the call (:func:`exact_dense`). Whichever path a timing race picks (per process, per DDP
   rank), an output differs from the other path's by at most ``tolerance(dtype, K) * (sum_k |x_k w_k| + |b|)``
   elementwise (K = the reduction length): two fp32 summation orders of exact products plus one rounding to
   the output dtype each. This bounds GEMM-ordered dense algorithms; cuDNN's Winograd / FFT convolutions,
   which cuDNN may pick for some fp32 shapes, round their transforms as well and can exceed it.
2. Batch size. The sparse kernel's variant follows the GEMM rows (batch x output pixels): one row runs an FMA
   reduction, up to 16 rows the split-K skinny kernel, more rows the tiled kernel; the dispatcher decides per
   input shape, and cuDNN / cuBLAS choose algorithms by shape too. So one sample's output at batch 16 and at
   batch 17 may differ, by at most the same bound (tests/test_dispatch_numerics.py measures it under the Triton
   interpreter and asserts the bound). For a fixed (input shape, dtype, device, decision) a result is the same
   run after run: the skinny kernel sums its split-K partials in split order.
3. Compiled code. Python cannot switch the flags inside a torch.compile graph, so a dense path compiled into
   a graph follows torch's global flags: keep ``torch.backends.cudnn.allow_tf32 = False`` (and matmul TF32 off,
   torch's default) for bound 1 to hold there as well.

This module imports :mod:`ke_fast.ops` (the door: the ops and the implementation choice); the old names
``ke_fast.ops.sparse_conv2d`` etc. remain as aliases of these.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Sequence

import torch

from . import kernels as K
from . import ops
from .kernels.compressed import Compressed

SPARSE_MAX_ROWS = 64  # static rule (tracing without a cached decision): a roofline argument, not a measurement
SPARSE_MAX_DENSITY = 0.7
DECISIONS_FORMAT = 1
_DECISIONS: dict[tuple, bool] = {}  # _decision_key(...) -> True (sparse) / False (dense)
_clock = time.perf_counter  # path_seconds' clock off CUDA (a test swaps in a fake one)

# unit roundoff of each output dtype: the error of one rounding to it is at most u * |value|
_UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def tolerance(dtype: torch.dtype, k: int) -> float:
    """The documented bound on how far the two paths (or one sample at two batch sizes) may differ, relative
    to ``sum_k |x_k w_k| + |b|`` of each output element: ``k * 2^-23`` (two fp32 summation orders of ``k``
    exact products, ``k * 2^-24`` each) plus one rounding to ``dtype`` on each side."""
    return k * 2.0 ** -23 + 2 * _UNIT_ROUNDOFF[dtype]


def static_choice(rows: int, density: float) -> bool:
    """The rule used without a measurement (while tracing, before any decision is cached): sparse for at most
    :data:`SPARSE_MAX_ROWS` GEMM rows at density at most :data:`SPARSE_MAX_DENSITY`."""
    return rows <= SPARSE_MAX_ROWS and density <= SPARSE_MAX_DENSITY


def use_sparse(rows: int, density: float, device: torch.device, measure: Callable[[], bool] | None = None) -> bool:
    """Whether a sparse layer with ``rows`` GEMM rows and this density runs the Triton sparse kernel.

    ``KE_FAST_SPARSE=off`` or an implementation other than Triton: never; ``on``: always; ``auto`` (the
    default): ``measure()`` when given (the dispatcher's cached or timed decision), else :func:`static_choice`."""
    want = ops.settings().sparse
    if want not in ops.SPARSE_MODES:
        raise ValueError(f"{ops.SPARSE_ENV} must be auto, on or off, got {want!r}")
    if want == "off" or ops.implementation(device.type) != "triton":
        return False
    if want == "on":
        return True
    return measure() if measure is not None else static_choice(rows, density)


def _tracing() -> bool:
    """torch.compile is tracing or the current CUDA stream is capturing a graph: no timing, no sync."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def path_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds per call of ``fn`` after one warm-up call (which compiles a kernel on first use): Triton's
    ``do_bench`` on CUDA (L2 flushed, a few ms of repetitions), the median of 5 calls elsewhere."""
    fn()
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=20) / 1e3
    times = []
    for _ in range(5):
        t0 = _clock()
        fn()
        times.append(_clock() - t0)
    return sorted(times)[2]


def _loose_flag(op: str, dtype: torch.dtype) -> tuple[object, str] | None:
    """The torch flag that lets the dense ``op`` on ``dtype`` round below the sparse kernel (TF32 products or
    reduced-precision reductions), as (holder, attribute name); None where none applies."""
    if dtype == torch.float32:
        return (torch.backends.cudnn, "allow_tf32") if op == "conv2d" else (torch.backends.cuda.matmul, "allow_tf32")
    if op == "linear" and dtype == torch.float16:
        return torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction"
    if op == "linear" and dtype == torch.bfloat16:
        return torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction"
    return None


def exact_dense(op: str, dtype: torch.dtype, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` (the dense ``op`` on ``dtype`` inputs) with the flag of :func:`_loose_flag` off, restored after:
    fp32 products and fp32 accumulation, as the sparse kernel computes. The flags are global and only CUDA
    reads them; they are set whatever the device (a few hundred ns) so one rule holds everywhere. While
    tracing, ``fn()`` as is (see the module docstring, 3.)."""
    flag = _loose_flag(op, dtype)
    if flag is None or torch.compiler.is_compiling():
        return fn()
    holder, name = flag
    before = getattr(holder, name)
    if not before:
        return fn()
    setattr(holder, name, False)
    try:
        return fn()
    finally:
        setattr(holder, name, before)  # a reduced-precision flag that is on has split-K on as well (torch's rule)


DecisionKey = tuple  # (op, weight shape, kept count, geometry, x shape, dtype, device, keeps W*M)


def _decision_key(op: str, cw: Compressed, x: torch.Tensor, keeps_dense: bool,
                  geometry: tuple[int, ...] = ()) -> DecisionKey:
    return (op, tuple(cw.shape), cw.values.numel(), geometry, tuple(x.shape), x.dtype, x.device, keeps_dense)


def _key_str(key: DecisionKey) -> str:
    op, shape, nnz, geometry, x_shape, dtype, device, keeps = key
    return (f"{op}|w{'x'.join(map(str, shape))}|nnz{nnz}|g{','.join(map(str, geometry))}|x{'x'.join(map(str, x_shape))}"
            f"|{str(dtype).replace('torch.', '')}|{device}|{'kept' if keeps else 'decompress'}")


def _key_from_str(text: str) -> DecisionKey:
    """Inverse of :func:`_key_str`; raises ValueError for anything else."""
    parts = text.split("|")
    ints = lambda v, sep: tuple(int(i) for i in v.split(sep) if i)  # noqa: E731
    try:
        if len(parts) != 8 or not isinstance(getattr(torch, parts[5], None), torch.dtype) \
                or parts[7] not in ("kept", "decompress") or parts[0] not in ("conv2d", "linear"):
            raise ValueError(text)
        return (parts[0], ints(parts[1][1:], "x"), int(parts[2][3:]), ints(parts[3][1:], ","),
                ints(parts[4][1:], "x"), getattr(torch, parts[5]), torch.device(parts[6]), parts[7] == "kept")
    except (ValueError, RuntimeError):
        raise ValueError(f"not a sparse decision key: {text!r}") from None


def _decide(op: str, cw: Compressed, x: torch.Tensor, dense: torch.Tensor | None, geometry: tuple[int, ...],
            rows: int, density: float, run_sparse: Callable[[], object],
            run_dense: Callable[[], object]) -> Callable[[], bool]:
    """The dispatcher's ``measure`` for :func:`use_sparse` (called only where the Triton implementation runs):
    the cached decision for this call's key; else, outside tracing and capture, time both paths and cache the
    faster; while tracing, :func:`static_choice` (not cached)."""

    def measure() -> bool:
        key = _decision_key(op, cw, x, dense is not None, geometry)
        hit = _DECISIONS.get(key)
        if hit is not None:
            return hit
        if _tracing():
            return static_choice(rows, density)
        with torch.no_grad():
            sparse = path_seconds(run_sparse, x.device) < path_seconds(run_dense, x.device)
        _DECISIONS[key] = sparse
        return sparse

    return measure


def sparse_decisions() -> dict[str, str]:
    """The dispatcher's cached decisions: key -> ``"sparse"`` or ``"dense"``. A key is
    ``op|w<weight shape>|nnz<kept count>|g<stride, padding, dilation, groups>|x<input shape>|dtype|device|kept``
    (``decompress`` for a layer that does not keep its W*M): it names neither the layer (layers with equal keys
    share one decision) nor the implementation (decisions exist only where Triton runs)."""
    return {_key_str(k): "sparse" if v else "dense" for k, v in _DECISIONS.items()}


def clear_sparse_decisions() -> None:
    """Forget every cached decision: the next call of each key times both paths again."""
    _DECISIONS.clear()


def _device_names() -> dict[str, str]:
    names = {"cpu": "cpu"}
    if torch.cuda.is_available():
        names.update({f"cuda:{i}": torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return names


def save_sparse_decisions(path: str | os.PathLike) -> None:
    """Write the cached decisions to a JSON file (e.g. next to the model's checkpoint), with the name of
    each device they were measured on."""
    names = _device_names()
    used = {str(k[6]) for k in _DECISIONS}
    doc = {"format": DECISIONS_FORMAT, "devices": {d: names.get(d, d) for d in sorted(used)},
           "decisions": sparse_decisions()}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)


def load_sparse_decisions(path: str | os.PathLike) -> int:
    """Add the decisions of a file written by :func:`save_sparse_decisions` to the cache; those measured on
    a device whose name differs from this host's device of the same index are skipped (another GPU may
    decide otherwise). Returns how many were loaded. Raises ValueError for a file of another format."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("format") != DECISIONS_FORMAT or not isinstance(doc.get("decisions"), dict):
        raise ValueError(f"{path}: not a ke_fast sparse decisions file of format {DECISIONS_FORMAT}")
    names, saved = _device_names(), doc.get("devices", {})
    loaded = 0
    decisions = {}
    for text, choice in doc["decisions"].items():
        try:
            key = _key_from_str(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if choice not in ("sparse", "dense"):
            raise ValueError(f"{path}: decision for {text!r} must be 'sparse' or 'dense', got {choice!r}")
        decisions[key] = choice == "sparse"
    for key, sparse in decisions.items():  # all checked first: a bad file adds nothing
        device = str(key[6])
        if names.get(device) is not None and names[device] == saved.get(device):
            _DECISIONS[key] = sparse
            loaded += 1
    return loaded


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def conv_rows(x: torch.Tensor, cw: Compressed, stride: int | Sequence[int], padding: int | Sequence[int],
              dilation: int | Sequence[int]) -> int:
    """GEMM rows (batch x output pixels) of a conv2d of ``x`` with a compressed weight."""
    size = K.reference.conv_out_size(x.shape, cw.shape, _pair(stride), _pair(padding), _pair(dilation))
    return size[0] * size[2] * size[3]


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)  # no .to() call on the hot path when it is a no-op


def _dense_of(cw: Compressed, dense: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return _as(dense if dense is not None else K.compressed.decompress(cw), dtype)


def sparse_conv2d(x: torch.Tensor, cw: Compressed, bias: torch.Tensor | None = None,
                  stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                  dilation: int | Sequence[int] = 1, groups: int = 1, dense: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """conv2d with a compressed weight, on the sparse kernel or densely as the dispatcher decides (see
    :func:`use_sparse`; in ``auto`` mode timed on the first call of each decision key, then cached). ``dense``
    is the layer's kept W*M for the dense path (None: decompress on every dense call)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    K.compressed.check_conv_args(x, cw.shape, groups)

    def run_sparse():
        return torch.ops.ke_fast.sparse_conv2d.default(x, cw.bits, cw.values, cw.offsets, list(cw.shape), bias,
                                                       stride, padding, dilation, groups)

    def run_dense():
        return exact_dense("conv2d", x.dtype, lambda: torch.nn.functional.conv2d(
            x, _dense_of(cw, dense, x.dtype), _as(bias, x.dtype), stride, padding, dilation, groups))

    rows, density = conv_rows(x, cw, stride, padding, dilation), K.compressed.density_of(cw)
    measure = _decide("conv2d", cw, x, dense, (*stride, *padding, *dilation, groups), rows, density, run_sparse,
                      run_dense)
    sparse = use_sparse(rows, density, x.device, measure)
    return run_sparse() if sparse else run_dense()


def sparse_linear(x: torch.Tensor, cw: Compressed, bias: torch.Tensor | None = None,
                  dense: torch.Tensor | None = None) -> torch.Tensor:
    """linear with a compressed weight, sparse or dense as the dispatcher decides (see :func:`sparse_conv2d`)."""
    K.compressed.check_linear_args(x, cw.shape)

    def run_sparse():
        return torch.ops.ke_fast.sparse_linear.default(x, cw.bits, cw.values, cw.offsets, list(cw.shape), bias)

    def run_dense():
        return exact_dense("linear", x.dtype, lambda: torch.nn.functional.linear(
            x, _dense_of(cw, dense, x.dtype), _as(bias, x.dtype)))

    rows, density = x.numel() // max(1, x.shape[-1]), K.compressed.density_of(cw)
    sparse = use_sparse(rows, density, x.device, _decide("linear", cw, x, dense, (), rows, density, run_sparse,
                                                         run_dense))
    return run_sparse() if sparse else run_dense()
