"""The C++ CPU kernels (``csrc/``) behind the same signatures as the Triton launchers and the reference.

Each function assumes the extension was built (:func:`.backend.cpu_extension` is not None) and its
arguments validated; :mod:`ke_fast.ops` calls them only then.
"""
from __future__ import annotations

import torch

from . import backend, reference
from .streams import as_int64


def apply_mask(x: torch.Tensor, words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(x * M).to(dtype)`` in one pass (vectorised, OpenMP above 512K elements)."""
    return backend.cpu_extension().apply_mask(x, words, dtype)


def apply_masks(xs: list[torch.Tensor], words: list[torch.Tensor], table: torch.Tensor, tiles: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """Every ``(xs[i] * M_i).to(dtype)`` into one flat tensor, one C++ call per tensor (``table`` / ``tiles``
    unused)."""
    ext = backend.cpu_extension()
    return torch.cat([ext.apply_mask(x, w, dtype).reshape(-1) for x, w in zip(xs, words)])


def wels_bits_(out: torch.Tensor, numel: int, seed: int, stream: int, threshold: int) -> None:
    """WELS mask words of a ``numel``-element weight into ``out`` (seed/stream as int64)."""
    out.copy_(backend.cpu_extension().wels_bits(numel, seed, stream, threshold))


def reset_entries_(weights: list[torch.Tensor], words: list[torch.Tensor], table: torch.Tensor, tiles: torch.Tensor,
                   seed: int, prefix: int, has_normal: bool) -> None:
    """Re-draw the reset entries of every tensor of a reset table, one C++ call per tensor (``tiles`` unused)."""
    ext = backend.cpu_extension()
    for i, stream, kind, scale in reference.table_rows(table, prefix):
        ext.reset_tensor_(weights[i], words[i], seed, as_int64(stream), kind, scale)
