"""Masked weight: ``out = (W * M).to(dtype)`` in one pass (forward) and ``grad * M`` (backward).

The same kernel serves both directions: it reads the packed mask, loads only the kept entries and
writes every output entry in the output dtype (e.g. bf16 under autocast), so the masked copy and the
cast cost one read and one write instead of two of each.

The multi-tensor form (:func:`apply_masks`) does the same for many tensors of one dtype in one launch:
the outputs are written one after the other into one flat tensor. Like the reset, it reaches every
input as an offset from the lowest-addressed one, through a table built once per set of sizes
(:func:`masks_table`): a GPU pays one launch for all the layers of a model instead of one per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# the host side (no Triton), re-exported under the old names
from .device import launch_guard
from .launch import GPU_BLOCK, TABLE_COLUMNS, block_size, check_args, check_many, masks_table  # noqa: F401
from .launch import MASK_DTYPES as DTYPES  # noqa: F401
from .reinit import addressed
from .rng import cast_rtne

GPU_NUM_WARPS = 8


@triton.jit
def _cast_out(x, dtype: tl.constexpr):
    """A loaded value in the output dtype, as torch's ``.to(dtype)`` rounds it: unchanged in its own dtype;
    fp64 exact; every narrower output through fp32 first, as torch converts fp64 to fp16 / bf16 (so a fp64
    value just above a tie rounds like torch's, not once directly), then :func:`.rng.cast_rtne`."""
    if x.dtype == dtype:
        return x
    elif dtype == tl.float64:
        return x.to(tl.float64)
    else:
        return cast_rtne(x.to(tl.float32), dtype)


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
    tl.store(out_ptr + offs, _cast_out(x, out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _masked_multi_kernel(out_ptr, w_base, m_base, meta, tile_tensor, BLOCK: tl.constexpr):
    """One tile = BLOCK consecutive elements of one tensor of a :func:`masks_table`.

    out_ptr: the flat output; w_base / m_base: the lowest-addressed input / mask words of the launch,
    every tensor is reached as ``base + offset`` (elements). meta: int64 [T, 5] rows (w_off, m_off,
    numel, out_off, first tile); tile_tensor: int32 [n_tiles], the row of each tile."""
    pid = tl.program_id(0)
    row = meta + tl.load(tile_tensor + pid).to(tl.int64) * 5
    w_off = tl.load(row)
    m_off = tl.load(row + 1)
    numel = tl.load(row + 2)
    out_off = tl.load(row + 3)
    first = tl.load(row + 4)
    offs = (pid - first).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    word = tl.load(m_base + m_off + (offs >> 5), mask=inb, other=0)
    keep = ((word >> (offs & 31).to(tl.int32)) & 1) != 0
    x = tl.load(w_base + w_off + offs, mask=inb & keep, other=0.0)
    tl.store(out_ptr + out_off + offs, _cast_out(x, out_ptr.dtype.element_ty), mask=inb)


def apply_mask(x: torch.Tensor, words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton: a new contiguous tensor ``(x * M).to(dtype)``, M unpacked from ``words`` (1 = keep).

    Args (validated by :func:`check_args`): x contiguous fp32/fp16/bf16/fp64; words its
    ``ceil(numel / 32)`` contiguous int32 mask words on the same device; dtype the output dtype."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.numel():
        block = block_size()
        with launch_guard(x):
            _masked_kernel[(triton.cdiv(x.numel(), block),)](out, x, words, x.numel(), BLOCK=block,
                                                             num_warps=GPU_NUM_WARPS)
    return out


def apply_masks(xs: list[torch.Tensor], words: list[torch.Tensor], table: torch.Tensor, tiles: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """Triton: every ``(xs[i] * M_i).to(dtype)`` flattened one after the other into one new flat tensor, in
    one launch. Args validated by :func:`check_many`; (table, tiles) from :func:`masks_table` of their sizes."""
    out = torch.empty(sum(x.numel() for x in xs), dtype=dtype, device=xs[0].device)
    if tiles.numel():
        w_ptrs, m_ptrs = [x.data_ptr() for x in xs], [w.data_ptr() for w in words]
        w_base, m_base = xs[w_ptrs.index(min(w_ptrs))], words[m_ptrs.index(min(m_ptrs))]
        with launch_guard(out):
            _masked_multi_kernel[(tiles.numel(),)](out, w_base, m_base, addressed(table, xs, w_ptrs, words, m_ptrs),
                                                   tiles, BLOCK=block_size(), num_warps=GPU_NUM_WARPS)
    return out
