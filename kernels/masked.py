"""Masked weight: ``out = (W * M).to(dtype)`` in one pass (forward) and ``grad * M`` (backward).

The same kernel serves both directions: it reads the packed mask, loads only the kept entries and
writes every output entry in the output dtype (e.g. bf16 under autocast), so the masked copy and the
cast cost one read and one write instead of two of each.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backend
from .bitmask import num_words
from .rng import cast_rtne

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_BLOCK = 2048
GPU_NUM_WARPS = 8


@triton.jit
def _masked_kernel(out_ptr, x_ptr, m_ptr, numel, BLOCK: tl.constexpr):
    """out[i] = x[i] if bit i of the mask words is set else 0, cast to out's dtype.

    out_ptr, x_ptr: contiguous tensors of ``numel`` elements; m_ptr: int32 mask words. Reset entries
    are not read. Offsets are int64: weights may exceed 2^31 elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    word = tl.load(m_ptr + (offs >> 5), mask=inb, other=0)
    keep = ((word >> (offs & 31).to(tl.int32)) & 1) != 0
    x = tl.load(x_ptr + offs, mask=inb & keep, other=0.0)
    tl.store(out_ptr + offs, cast_rtne(x.to(tl.float32), out_ptr.dtype.element_ty), mask=inb)


def check_args(x: torch.Tensor, words: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """Validate the arguments of a masked weight (every implementation's contract); return the output dtype."""
    dtype = x.dtype if dtype is None else dtype
    if x.dtype not in DTYPES or dtype not in DTYPES:
        raise TypeError(f"masked weight supports float32/float16/bfloat16/float64, got weight {x.dtype} -> "
                        f"dtype {dtype}")
    if words.dtype != torch.int32 or words.dim() != 1 or words.numel() != num_words(x.numel()):
        raise ValueError(f"words must be {num_words(x.numel())} int32 packed words for {x.numel()} elements, "
                         f"got {words.dtype} of shape {tuple(words.shape)}")
    if words.device != x.device:
        raise ValueError(f"words is on {words.device}, weight on {x.device}")
    return dtype


def apply_mask(x: torch.Tensor, words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton: a new contiguous tensor ``(x * M).to(dtype)``, M unpacked from ``words`` (1 = keep).

    Args (validated by :func:`check_args`): x contiguous fp32/fp16/bf16/fp64; words its
    ``ceil(numel / 32)`` contiguous int32 mask words on the same device; dtype the output dtype."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.numel():
        block = 256 if backend.interpreting() else GPU_BLOCK
        _masked_kernel[(triton.cdiv(x.numel(), block),)](out, x, words, x.numel(), BLOCK=block, num_warps=GPU_NUM_WARPS)
    return out
