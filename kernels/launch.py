"""Host side of the multi-tensor ops (masked weights, the reset): argument checks, reset schemes and the
launch tables, built once per set of sizes and cached. No Triton here: the C++ and reference
implementations take the same tables, so ``ke_fast.ops`` uses this module where Triton is absent; the Triton
launchers (:mod:`.masked`, :mod:`.reinit`) fill a table's address columns from the tensors they are given.
:mod:`.masked` and :mod:`.reinit` re-export these names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import backend, reference
from .format import _cdiv, num_words, pack_mask

# ---- masked weights --------------------------------------------------------------------------------

MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_BLOCK = 2048
TABLE_COLUMNS = 5  # a masks table row: (w_off, m_off, numel, out_off, first tile)


def check_args(x: torch.Tensor, words: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """Validate the arguments of a masked weight (every implementation's contract); return the output dtype."""
    dtype = x.dtype if dtype is None else dtype
    if x.dtype not in MASK_DTYPES or dtype not in MASK_DTYPES:
        raise TypeError(f"masked weight supports float32/float16/bfloat16/float64, got weight {x.dtype} -> "
                        f"dtype {dtype}")
    if words.dtype != torch.int32 or words.dim() != 1 or words.numel() != num_words(x.numel()):
        raise ValueError(f"words must be {num_words(x.numel())} int32 packed words for {x.numel()} elements, "
                         f"got {words.dtype} of shape {tuple(words.shape)}")
    if words.device != x.device:
        raise ValueError(f"words is on {words.device}, weight on {x.device}")
    return dtype


def block_size() -> int:
    """Elements per program: 256 under the interpreter (odd test shapes span several tiles), else GPU_BLOCK."""
    return 256 if backend.interpreting() else GPU_BLOCK


def check_many(xs: list[torch.Tensor], words: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Validate the arguments of a multi-tensor masked weight: at least one tensor; contiguous inputs of one
    dtype and device, each with its mask words (:func:`check_args`)."""
    if not xs or len(xs) != len(words):
        raise ValueError(f"masked weights need one words tensor per weight, at least one: got {len(xs)} weights, "
                         f"{len(words)} words")
    for i, (x, w) in enumerate(zip(xs, words)):
        if x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise ValueError(f"weights[{i}] is {x.dtype} on {x.device}, weights[0] {xs[0].dtype} on {xs[0].device}: "
                             f"one launch takes one dtype and device")
        if not x.is_contiguous() or not w.is_contiguous():
            raise ValueError(f"weights[{i}] and words[{i}] must be contiguous")
        check_args(x, w, dtype)


def masks_table(numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, tiles) of a multi-tensor masked weight over tensors of these sizes, on ``device``.

    table: int64 [T, 5] rows (0, 0, numel, out_off, first tile); the Triton launcher fills the first two
    columns from the tensors it is given (:func:`.reinit.addressed`). tiles: int32 [n_tiles], the row of
    each tile. Empty tensors get no tile. The CPU kernels read numel and out_off only."""
    block = block_size()
    rows, counts, out_off, first = [], [], 0, 0
    for n in numels:
        nt = _cdiv(n, block)
        rows.append([0, 0, n, out_off, first])
        counts.append(nt)
        out_off += n
        first += nt
    table = torch.tensor(rows, dtype=torch.int64).reshape(len(numels), TABLE_COLUMNS).to(device)
    tiles = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(counts)).to(device)
    return table, tiles

# ---- the reset -------------------------------------------------------------------------------------

SCHEMES = ("kaiming_uniform_a_sqrt5", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal", "zeros")
RESET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_TILE_GROUPS = 512  # groups of 4 elements per program on a GPU: 2048 elements


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
        if w.dtype not in RESET_DTYPES:
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
    return [g for g in ([j for j in jobs if j.weight.dtype == dt and j.weight.numel()] for dt in RESET_DTYPES) if g]


def tile_groups() -> int:
    """Groups of 4 elements per program: 32 under the interpreter (odd test shapes span several tiles),
    GPU_TILE_GROUPS (2048 elements) on a GPU. Launches with normal tensors walk it in sub-tiles."""
    return 32 if backend.interpreting() else GPU_TILE_GROUPS


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False where CUDA is absent)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def refuse_in_capture(device: torch.device, what: str) -> None:
    """RuntimeError if a launch table for ``device`` would be built while the current CUDA stream captures a
    graph: building one copies from pageable host memory, which a graph cannot replay (nor may a capture
    sync). Launch tables are kept by the object that uses them (a ReinitPlan, a FitGroup), so the same call
    made once before the capture builds them and the captured call only reads them."""
    if device.type == "cuda" and capturing():
        raise RuntimeError(f"{what} while the current CUDA stream is capturing a graph: building it copies from "
                           f"host memory, which a graph cannot replay. Make the same call once before the capture "
                           f"(the table is then kept by the plan / fit group that uses it)")



def launch_table(group: list[_Job]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, bool]:
    """(weights, words, table, tiles, has_normal) of one dtype group: the arguments of a reset, built anew
    (one host-to-device copy) for its caller to keep: a :class:`ke_fast.ReinitPlan` owns its tables, so they
    live exactly as long as the plan. Raises RuntimeError while a CUDA graph is being captured.

    table: int64 [T, 8] on the weights' device, one row per tensor in list order: (0, 0, numel, layer id,
    kind, fp32 bits of the scale, first tile, 0) — see :func:`.reference.table_rows`; the Triton launcher
    fills the first two columns (the element offsets of the weight and of its words from the lowest-
    addressed ones) from the tensors it is given. tiles: int32 [n_tiles], the row of each tile of the
    Triton launch."""
    device = group[0].weight.device
    refuse_in_capture(device, "building a reset launch table")
    key = (device, tile_groups(), tuple((j.weight.numel(), j.layer, j.kind, j.scale) for j in group))
    table, tiles, has_normal = _new_table(key)
    return [j.weight for j in group], [j.words for j in group], table, tiles, has_normal


def _new_table(key: tuple) -> tuple[torch.Tensor, torch.Tensor, bool]:
    device, bq, jobs = key
    rows, counts = [], []
    first = 0
    for numel, layer, kind, scale in jobs:
        nt = _cdiv(_cdiv(numel, 4), bq)
        scale_bits = int(torch.tensor(scale, dtype=torch.float32).view(torch.int32))
        rows.append([0, 0, numel, layer, kind, scale_bits, first, 0])
        counts.append(nt)
        first += nt
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    tiles = torch.repeat_interleave(torch.arange(len(jobs), dtype=torch.int32), torch.tensor(counts)).to(device)
    return table, tiles, any(kind == reference.KIND_NORMAL for _, _, kind, _ in jobs)
