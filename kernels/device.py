"""Where a launch runs: the device guard of every Triton launcher and the one-device rule of every op.

Triton launches on the *current* CUDA device and that device's current stream, while a launcher allocates
its outputs on the input's device: tensors on ``cuda:1`` launched with ``cuda:0`` current would read
another device's addresses (an illegal access) or run unordered with the work queued on ``cuda:1``. So
every launcher runs under :func:`launch_guard` of its first tensor, and every op checks first that all
its tensors share one device (:func:`check_one_device`).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable

import torch

_NO_GUARD = contextlib.nullcontext()


def launch_guard(t: torch.Tensor) -> ContextManager:
    """A context making ``t``'s CUDA device current for a launch (and its current stream the one Triton
    uses); nothing for CPU tensors (the interpreter). ``torch.cuda.device`` swaps the device only when it
    differs from the current one, so the usual case (already current) costs a call, not a device switch."""
    if t.device.type != "cuda":
        return _NO_GUARD
    return torch.cuda.device(t.device.index)


def check_one_device(op: str, named: Iterable[tuple[str, torch.Tensor | None]]) -> None:
    """Raise ValueError naming the first tensor of ``named`` ((argument name, tensor or None) pairs) that
    is not on the device of the first tensor: an op reads all its tensors on one device."""
    first: tuple[str, torch.device] | None = None
    for name, t in named:
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"ke_fast::{op}: {name} is on {t.device}, {first[0]} on {first[1]}: all tensors of "
                             f"one call must be on one device")


def listed(name: str, tensors: Iterable[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``[(f"{name}[i]", tensors[i]), ...]``: a list argument's tensors, named for :func:`check_one_device`."""
    return [(f"{name}[{i}]", t) for i, t in enumerate(tensors)]
