"""Fused multi-tensor reset: every reset weight of every layer re-drawn in one launch per (device, dtype).

For each tensor: its packed mask, a scheme (uniform bound / normal std / zeros) and a Philox stream.
Reset entries (bit 0) get a fresh draw; fit entries (bit 1) are never read nor written, so they keep
their exact bits. Tiles without a reset entry skip the random draw and write nothing; all-reset tiles
are written without reading the weight (the weight is never read at all).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# the host side (no Triton), re-exported under the old names
from .device import launch_guard
from .launch import (_PACKED, GPU_TILE_GROUPS, SCHEMES, _as_words, _Job, _new_table, check_generation,  # noqa: F401
                     capturing, dtype_groups, fans_of, launch_table, prepare, refuse_in_capture,
                     scheme_params, tile_groups)
from .launch import RESET_DTYPES as DTYPES  # noqa: F401
from .rng import box_muller_groups, cast_rtne, philox_group, select4, splitmix64, uniform_pm1

GPU_NUM_WARPS = 8


@triton.jit(do_not_specialize=["seed", "stream_prefix"])
def _reinit_kernel(w_base, m_base, meta, tile_tensor, seed: tl.int64, stream_prefix: tl.int64, BQ: tl.constexpr,
                   HAS_NORMAL: tl.constexpr):
    """One tile = BQ groups of 4 consecutive elements of one tensor.

    w_base: the lowest-addressed weight of the launch; every weight is ``w_base + w_off`` (elements).
    m_base: likewise for the int32 mask words (``m_base + m_off``).
    meta: int64 [T, 8] rows (w_off, m_off, numel, layer id, kind, fp32 bits of scale, first tile, pad).
    tile_tensor: int32 [n_tiles], the tensor index of each tile. seed: Philox key (int64).
    stream_prefix: the (purpose, generation) part of the streams; a tensor's stream is
    splitmix64(stream_prefix ^ layer id), as on the host, so the tables are built once per plan.
    seed and stream_prefix are typed int64 and not specialised (``do_not_specialize``): a new generation's
    prefix (or a seed that happens to fit in int32, or be divisible by 16) reuses the compiled kernel.
    HAS_NORMAL: whether any tensor of the launch is kind 1; the fp64 Box-Muller costs registers and
    stack, so uniform-only launches (the default KE reset) compile without it, and launches with it
    draw the tile in 4 sequential sub-tiles of BQ // 4 groups to bound the registers.
    Element i of a tensor is reset iff bit (i % 32) of word i // 32 is 0; its value is
    scale * uniform[-1, 1) (kind 0), scale * N(0, 1) (kind 1) or 0 (kind 2) from group i >> 2.
    """
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid).to(tl.int64)
    row = meta + t * 8
    w_off = tl.load(row)
    m_off = tl.load(row + 1)
    numel = tl.load(row + 2)
    layer = tl.load(row + 3)
    stream = splitmix64(stream_prefix.to(tl.int64).to(tl.uint64, bitcast=True) ^ layer.to(tl.uint64, bitcast=True))
    stream = stream.to(tl.int64, bitcast=True)
    kind = tl.load(row + 4)
    scale = tl.load(row + 5).to(tl.int32).to(tl.float32, bitcast=True)
    first = tl.load(row + 6)
    # Launches with normal tensors walk the tile in NSUB sub-tiles, one after the other: the fp64
    # Box-Muller of 8 elements per thread at once needs ~100 registers; 2 at a time, under 50.
    # Uniform-only launches (the default reset) keep one pass over the tile: their code is unchanged.
    NSUB: tl.constexpr = 4 if HAS_NORMAL else 1
    QS: tl.constexpr = BQ // NSUB
    for s in tl.static_range(NSUB):
        q = (pid - first) * BQ + s * QS + tl.arange(0, QS)[:, None]  # int64: tensors may exceed 2^31 elements
        j = tl.arange(0, 4)[None, :]
        idx = q * 4 + j
        word = tl.load(m_base + m_off + (q >> 3), mask=q * 4 < numel, other=-1)
        reset = (((word >> ((q & 7) * 4 + j).to(tl.int32)) & 1) == 0) & (idx < numel)
        if tl.max(reset.to(tl.int32)) > 0:
            if kind == 2:
                val = tl.zeros([QS, 4], dtype=tl.float32)
            else:
                r0, r1, r2, r3 = philox_group(seed, q, stream)
                val = uniform_pm1(select4(j, r0, r1, r2, r3)) * scale
                if HAS_NORMAL:
                    if kind == 1:
                        val = box_muller_groups(r0, r1, r2, r3) * scale
            tl.store(w_base + w_off + idx, cast_rtne(val, w_base.dtype.element_ty), mask=reset)


def reset_entries_(weights: list[torch.Tensor], words: list[torch.Tensor], table: torch.Tensor, tiles: torch.Tensor,
                   seed: int, prefix: int, has_normal: bool) -> None:
    """Triton: re-draw the reset entries of one dtype group in one launch (see :func:`launch_table`).

    ``seed``/``prefix`` are int64 reinterpretations of the Philox key and the (purpose, generation)
    stream prefix; ``has_normal`` whether a row of the table is kind 1 (normal)."""
    if not tiles.numel():
        return
    w_ptrs, m_ptrs = [x.data_ptr() for x in weights], [x.data_ptr() for x in words]
    w_base, m_base = weights[w_ptrs.index(min(w_ptrs))], words[m_ptrs.index(min(m_ptrs))]
    with launch_guard(w_base):
        _reinit_kernel[(tiles.numel(),)](w_base, m_base, addressed(table, weights, w_ptrs, words, m_ptrs), tiles,
                                         seed, prefix, BQ=tile_groups(), HAS_NORMAL=has_normal,
                                         num_warps=GPU_NUM_WARPS)


# The kernel reaches every tensor as an offset from the lowest-addressed one, so the offsets are taken from
# the tensors actually passed (a clone made by functionalization or opcheck has other addresses) and kept
# on the table object, per layout (the addresses relative to the lowest ones, and the element size): repeated
# launches on the same tensors, or on tensors laid out alike (e.g. the gradients of the multi-tensor masked
# weight, consecutive views of one new buffer every step), do no host work beyond reading their addresses.
# A kept layout lives as long as its table (a captured CUDA graph may read it): none is ever evicted; past
# MAX_ADDRESS_SETS layouts per table, a new one is filled for its call only.
MAX_ADDRESS_SETS = 8


def addressed(table: torch.Tensor, weights: list[torch.Tensor], w_ptrs: list[int], words: list[torch.Tensor],
              m_ptrs: list[int]) -> torch.Tensor:
    """``table`` with columns 0 and 1 set to every tensor's element offset from the lowest-addressed weight
    / mask words (``w_ptrs`` / ``m_ptrs``: their data pointers); kept on the table per layout (the first
    :data:`MAX_ADDRESS_SETS` layouts, for the table's life). A new layout while a CUDA graph is being captured
    raises RuntimeError (:func:`refuse_in_capture`)."""
    w_low, m_low = min(w_ptrs), min(m_ptrs)
    key = (weights[0].element_size(), *(p - w_low for p in w_ptrs), *(p - m_low for p in m_ptrs))
    per_table = table.__dict__.setdefault("_ke_addressed", {})
    filled = per_table.get(key)
    if filled is None:
        refuse_in_capture(table.device, "filling a launch table for a new layout of its tensors")
        offs = torch.tensor([_base_offsets(weights, w_ptrs), _base_offsets(words, m_ptrs)], dtype=torch.int64).t()
        filled = table.clone()
        filled[:, :2] = offs.to(table.device)
        if len(per_table) < MAX_ADDRESS_SETS:
            per_table[key] = filled
    return filled


def _base_offsets(tensors: list[torch.Tensor], ptrs: list[int]) -> list[int]:
    """Every tensor's element offset from the lowest-addressed one (``ptrs``: their data pointers)."""
    base = min(ptrs)
    size = tensors[0].element_size()
    offs = []
    for p in ptrs:
        if (p - base) % size:  # cannot happen for allocator-made tensors of one dtype; refuse rather than corrupt
            raise ValueError("tensor addresses are not aligned to their element size")
        offs.append((p - base) // size)
    return offs
