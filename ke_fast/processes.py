"""How a run is launched: one process, or one per rank under torchrun (DDP): the device and process-group
backend of each rank, a process group that really ends, and the command that launches ke_fast again the
same way (the resume hint after Ctrl-C)."""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist


def init_process_group(backend: str, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group`` such that ``destroy_process_group`` really ends the group.

    DistributedDataParallel imports ``torch._dynamo`` on first use, which imports
    ``torch.distributed.nn.functional``, whose functions bind ``group.WORLD`` as a default argument.
    Imported after the default group exists, those defaults keep it alive past ``destroy_process_group``:
    its gloo worker threads then run on into interpreter shutdown, and one that drops its last reference
    to a Python-owned tensor there needs the GIL, so CPython ends that thread (pthread_exit) inside a
    noexcept destructor and the process aborts ("terminate called without an active exception").
    Importing them before the group exists makes those defaults None."""
    import torch._dynamo  # noqa: F401  (for its side effect above)

    dist.init_process_group(backend, **kwargs)


def resolve_device(device: str | None, cuda_available: bool, device_count: int, local_rank: int = 0,
                   local_world_size: int = 1) -> tuple[str, str]:
    """This process's device and the process-group backend that goes with it: ``(device, backend)``.

    ``cpu`` never touches CUDA: ``("cpu", "gloo")``. ``cuda`` (the default where CUDA is available) gives
    local rank i the GPU ``cuda:i`` and ``nccl``, so it needs a GPU per local rank; ``cuda:N`` pins a
    single process to GPU N. Other device types (mps, xpu ...) pass through with ``gloo`` where this torch
    has them available. ``local_rank`` and
    ``local_world_size`` are torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE (0 and 1 without torchrun).

    Raises ValueError, with a message naming --device, when the request cannot be met."""
    name = f"--device {device}" if device is not None else "--device cuda (the default where CUDA is available)"
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        backend = getattr(torch, dev.type, None)  # torch.mps, torch.xpu ...; torch.device also knows "meta"
        if not (callable(getattr(backend, "is_available", None)) and backend.is_available()):
            raise ValueError(f"--device {device}: no {dev.type} device is available; expected cpu, cuda or cuda:N")
    if dev.type != "cuda":
        return str(dev), "gloo"
    if not cuda_available:
        raise ValueError(f"{name}: CUDA is not available")
    ranks = max(local_world_size, local_rank + 1)
    if dev.index is None:
        if ranks > device_count:
            raise ValueError(f"{name}: {ranks} local ranks need one CUDA device each, but {device_count} "
                             f"CUDA device(s) are visible; use --device cpu or at most {device_count} "
                             f"rank(s) per node")
        return f"cuda:{local_rank}", "nccl"
    if dev.index >= device_count:
        raise ValueError(f"{name}: expected cuda:0 .. cuda:{device_count - 1}, as {device_count} CUDA "
                         f"device(s) are visible")
    if ranks > 1:
        raise ValueError(f"{name} would put all {ranks} local ranks on one GPU; use --device cuda "
                         f"(local rank i gets cuda:i) or --device cpu")
    return str(dev), "nccl"


def launcher() -> list[str]:
    """The start of a command that runs ke_fast as this process was run: the interpreter running now, and
    under torchrun its launcher with as many processes per node (and nodes)."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world <= 1:
        return [sys.executable, "-m", "ke_fast"]
    nodes = max(1, world // max(1, local))
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={local}",
            *([f"--nnodes={nodes}"] if nodes > 1 else []), "-m", "ke_fast"]
