"""Fused multi-tensor reset: every reset weight of every layer re-drawn in one launch per (device, dtype).

For each tensor: its packed mask, a scheme (uniform bound / normal std / zeros) and a Philox stream.
Reset entries (bit 0) get a fresh draw; fit entries (bit 1) are never read nor written, so they keep
their exact bits. Tiles without a reset entry skip the random draw and write nothing; all-reset tiles
are written without reading the weight (the weight is never read at all).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from . import backend, reference
from .bitmask import num_words, pack_mask
from .device import launch_guard
from .rng import box_muller_groups, cast_rtne, philox_group, select4, splitmix64, uniform_pm1

SCHEMES = ("kaiming_uniform_a_sqrt5", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal", "zeros")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_TILE_GROUPS = 512  # groups of 4 elements per program on a GPU: 2048 elements
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


@dataclass
class _Job:
    weight: torch.Tensor
    words: torch.Tensor
    kind: int
    scale: float
    layer: int


def fans_of(shape: torch.Size) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight as torch.nn.init computes them (needs >= 2 dimensions)."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def scheme_params(init: str, fan_in: int, fan_out: int, *, bias: bool = False,
                  fan_mode: str = "fan_in") -> tuple[int, float]:
    """(kind, scale) of a scheme: kind 0 = scale*U[-1, 1), 1 = scale*N(0, 1), 2 = zeros.

    Biases (1-D tensors) are U(+-1/sqrt(fan_in)) — torch's and the official KE's bias init — unless
    the scheme is ``zeros``."""
    if init == "zeros":
        return reference.KIND_ZEROS, 0.0
    if bias or init == "kaiming_uniform_a_sqrt5":
        return reference.KIND_UNIFORM, 1.0 / math.sqrt(fan_in)  # gain sqrt(1/3) * sqrt(3 / fan_in)
    fan = fan_in if fan_mode == "fan_in" else fan_out
    if init == "kaiming_uniform":
        return reference.KIND_UNIFORM, math.sqrt(6.0 / fan)  # relu gain sqrt(2), bound gain*sqrt(3/fan)
    if init == "kaiming_normal":
        return reference.KIND_NORMAL, math.sqrt(2.0 / fan)
    if init == "xavier_uniform":
        return reference.KIND_UNIFORM, math.sqrt(6.0 / (fan_in + fan_out))
    if init == "xavier_normal":
        return reference.KIND_NORMAL, math.sqrt(2.0 / (fan_in + fan_out))
    raise ValueError(f"init must be one of {SCHEMES}, got {init!r}")


def check_generation(generation: object, purpose: object) -> None:
    """Validate a (generation, purpose) pair of a reset."""
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise ValueError(f"generation must be a non-negative int, got {generation!r}")
    if purpose not in ("reset", "init"):
        raise ValueError(f"purpose must be 'reset' or 'init', got {purpose!r}")


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
_MAX_ADDRESS_SETS = 8


def addressed(table: torch.Tensor, weights: list[torch.Tensor], w_ptrs: list[int], words: list[torch.Tensor],
              m_ptrs: list[int]) -> torch.Tensor:
    """``table`` with columns 0 and 1 set to every tensor's element offset from the lowest-addressed weight
    / mask words (``w_ptrs`` / ``m_ptrs``: their data pointers); cached on the table per layout."""
    w_low, m_low = min(w_ptrs), min(m_ptrs)
    key = (weights[0].element_size(), *(p - w_low for p in w_ptrs), *(p - m_low for p in m_ptrs))
    per_table = table.__dict__.setdefault("_ke_addressed", {})
    filled = per_table.get(key)
    if filled is None:
        offs = torch.tensor([_base_offsets(weights, w_ptrs), _base_offsets(words, m_ptrs)], dtype=torch.int64).t()
        filled = table.clone()
        filled[:, :2] = offs.to(table.device)
        if len(per_table) >= _MAX_ADDRESS_SETS:
            per_table.clear()
        per_table[key] = filled
    return filled


def prepare(weights, masks, init, fans, layer_ids, fan_mode) -> list[_Job]:
    """Validate everything and pack masks; raises before anything is written."""
    if init not in SCHEMES:
        raise ValueError(f"init must be one of {SCHEMES}, got {init!r}")
    if fan_mode not in ("fan_in", "fan_out"):
        raise ValueError(f"fan_mode must be 'fan_in' or 'fan_out', got {fan_mode!r}")
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError("weights must be a list or tuple of tensors")
    if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence):
        raise TypeError("masks must be a list or tuple of tensors, one per weight")
    if len(weights) == 0:
        raise ValueError("weights is empty: nothing to reset")
    if len(masks) != len(weights):
        raise ValueError(f"masks has {len(masks)} entries, weights has {len(weights)}")
    if fans is not None and len(fans) != len(weights):
        raise ValueError(f"fans has {len(fans)} entries, weights has {len(weights)}")
    if layer_ids is None:
        layer_ids = range(len(weights))
    elif len(layer_ids) != len(weights):
        raise ValueError(f"layer_ids has {len(layer_ids)} entries, weights has {len(weights)}")
    device = None
    jobs = []
    for i, (w, m) in enumerate(zip(weights, masks)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if w.dtype not in DTYPES:
            raise TypeError(f"weights[{i}] has dtype {w.dtype}; supported: float32, float16, bfloat16, float64")
        if not w.is_contiguous():
            raise ValueError(f"weights[{i}] must be contiguous (the mask follows its row-major flattening)")
        if device is None:
            device = w.device
        elif w.device != device:
            raise ValueError(f"weights[{i}] is on {w.device}, weights[0] on {device}: all must share one device")
        words = _as_words(m, w, i)
        fan = fans[i] if fans is not None and fans[i] is not None else None
        if fan is None:
            if w.dim() < 2:
                raise ValueError(f"fans[{i}] is required: weights[{i}] has {w.dim()} dimension(s), so its fan-in "
                                 f"cannot be derived (pass its layer's (fan_in, fan_out))")
            fan = fans_of(w.shape)
        if len(fan) != 2 or any(isinstance(f, bool) or not isinstance(f, int) or f <= 0 for f in fan):
            raise ValueError(f"fans[{i}] must be a pair of positive ints, got {fan!r}")
        lid = layer_ids[i]
        if isinstance(lid, bool) or not isinstance(lid, int) or lid < 0:
            raise ValueError(f"layer_ids[{i}] must be a non-negative int, got {lid!r}")
        kind, scale = scheme_params(init, fan[0], fan[1], bias=w.dim() == 1, fan_mode=fan_mode)
        jobs.append(_Job(w, words, kind, scale, lid))
    return jobs


def _as_words(m: object, w: torch.Tensor, i: int) -> torch.Tensor:
    """The packed words of ``masks[i]`` (packed as given, or packed from a dense 0/1 tensor)."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"masks[{i}] must be a torch.Tensor, got {type(m).__name__}")
    if m.device != w.device:
        raise ValueError(f"masks[{i}] is on {m.device}, weights[{i}] on {w.device}")
    if m.dtype == torch.int32:
        if m.dim() != 1 or m.numel() != num_words(w.numel()):
            raise ValueError(f"masks[{i}] is int32, so it must be packed words: expected shape "
                             f"({num_words(w.numel())},) for a weight of {w.numel()} elements, got {tuple(m.shape)}")
        return m.contiguous()
    if m.dtype not in (torch.bool, torch.uint8) and not m.is_floating_point():
        raise TypeError(f"masks[{i}] has dtype {m.dtype}; expected int32 packed words or a bool/uint8/float 0-1 mask")
    if m.shape != w.shape:
        raise ValueError(f"masks[{i}] has shape {tuple(m.shape)}, weights[{i}] has {tuple(w.shape)}")
    state = None if m.is_inference() else (m._version, m.data_ptr())  # inference tensors keep no version
    cached = _PACKED.get(m)
    if cached is not None and state is not None and cached[0] == state:
        return cached[1]
    if m.dtype != torch.bool and bool(((m != 0) & (m != 1)).any()):
        raise ValueError(f"masks[{i}] must hold only 0 and 1")
    words = pack_mask(m)
    if state is not None:
        _PACKED[m] = (state, words)
    return words


# Packed words of the dense 0/1 masks given to ``prepare`` (what the official KE code passes every generation),
# keyed weakly on the mask tensor itself and checked against its version counter and address: a repeated
# one-shot reset with the same masks skips the validation pass and the packing, an in-place change of a mask
# re-packs it, and an entry dies with its mask (the words do not refer to the mask). Inference tensors keep
# no version counter: they are packed every call.
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def dtype_groups(jobs: list[_Job]) -> list[list[_Job]]:
    """The jobs split by weight dtype (one launch each), empty weights left out."""
    return [g for g in ([j for j in jobs if j.weight.dtype == dt and j.weight.numel()] for dt in DTYPES) if g]


def tile_groups() -> int:
    """Groups of 4 elements per program: 32 under the interpreter (odd test shapes span several tiles),
    GPU_TILE_GROUPS (2048 elements) on a GPU. Launches with normal tensors walk it in sub-tiles."""
    return 32 if backend.interpreting() else GPU_TILE_GROUPS


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


def launch_table(group: list[_Job]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, bool]:
    """(weights, words, table, tiles, has_normal) of one dtype group: the arguments of a reset, built once.

    table: int64 [T, 8] on the weights' device, one row per tensor in list order: (0, 0, numel, layer id,
    kind, fp32 bits of the scale, first tile, 0) — see :func:`.reference.table_rows`; the Triton launcher
    fills the first two columns (the element offsets of the weight and of its words from the lowest-
    addressed ones) from the tensors it is given. tiles: int32 [n_tiles], the row of each tile of the
    Triton launch."""
    key = (group[0].weight.device, tile_groups(), tuple((j.weight.numel(), j.layer, j.kind, j.scale) for j in group))
    cached = _TABLES.pop(key, None)
    if cached is None:
        cached = _new_table(key)
    elif len(_TABLES) >= _MAX_TABLES:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = cached  # most recently used last
    table, tiles, has_normal = cached
    return [j.weight for j in group], [j.words for j in group], table, tiles, has_normal


# Launch tables per (device, tile size, rows): a one-shot reset of the same layers (a new ReinitPlan every
# generation) finds its table here, with the offsets already filled for its tensors' addresses (:func:`addressed`),
# and does not copy it to the device again. A table holds no reference to any tensor of the reset.
_MAX_TABLES = 16
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, bool]] = {}


def _new_table(key: tuple) -> tuple[torch.Tensor, torch.Tensor, bool]:
    device, bq, jobs = key
    rows, counts = [], []
    first = 0
    for numel, layer, kind, scale in jobs:
        nt = triton.cdiv(triton.cdiv(numel, 4), bq)
        scale_bits = int(torch.tensor(scale, dtype=torch.float32).view(torch.int32))
        rows.append([0, 0, numel, layer, kind, scale_bits, first, 0])
        counts.append(nt)
        first += nt
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    tiles = torch.repeat_interleave(torch.arange(len(jobs), dtype=torch.int32), torch.tensor(counts)).to(device)
    return table, tiles, any(kind == reference.KIND_NORMAL for _, _, kind, _ in jobs)
