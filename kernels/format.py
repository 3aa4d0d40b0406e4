"""The formats every implementation shares, host side: the packed bit mask and the compressed WELS weight.

Bit mask: the weight's contiguous row-major flattening; int32 words; bit ``b`` of word ``w`` is element
``32*w + b``; tail bits zero; 1 = fit (kept), 0 = reset. One bit per weight, 32x less than the float32 mask
of the official KE code. Also here: the KELS rule and the validation of a WELS draw (the draw itself is the
``ke_fast::wels_bits_`` op: Triton in :mod:`.bitmask`, C++, or the reference).

Compressed WELS weight (:class:`Compressed`), the layout every sparse kernel and the reference read:

* The weight is viewed as a matrix ``[N, K]`` with N = output channels and K in *implicit-GEMM order*
  ``(kh, kw, C_in/groups)`` (channel fastest, matching NHWC activations).
* ``bits``: int32 ``[N, ceil(K / 32)]``, rows word-aligned (unlike the flat mask format).
* ``values``: the kept values chunk-major (a chunk is 8 words = 256 k of a row: chunk 0 of every row,
  then chunk 1 of every row, ...; k ascending within a row's chunk).
* ``offsets``: int64 ``[N, ceil(T / 8)]``, the index in ``values`` of the first kept value of (row, chunk).

This module builds, checks and decompresses it and validates the sparse ops' arguments; the kernels that
read it are :mod:`.sparse_conv` (Triton) and :mod:`.reference`.

No Triton here: ``import ke_fast``, ``split``, the reset, ``fit_only`` and the extraction use this module
where Triton is absent. :mod:`.bitmask` and :mod:`.sparse_conv` re-export these names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import reference
from .reference import pack_mask as _pack_bool
from .streams import PURPOSE_MASK, check_seed, stream_id

_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of the compressed values and the sparse ops' inputs
CHUNK_WORDS = 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- the bit mask ----------------------------------------------------------------------------------

def num_words(numel: int) -> int:
    """Number of int32 words holding ``numel`` bits."""
    return (numel + 31) // 32


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a mask (bool, integer or float 0/1 tensor of any shape; non-zero = fit) into int32 words.

    Returns a 1-D int32 tensor of ``ceil(numel / 32)`` words on the mask's device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError("mask must be a bool, integer or float tensor, got a complex tensor")
    return reference.pack_mask(mask)


def unpack_mask(bits: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """Unpack int32 words into a bool tensor of ``shape`` (True = fit)."""
    shape = torch.Size(shape)
    _check_words(bits, shape.numel(), "bits")
    return reference.unpack_mask(bits, shape.numel()).reshape(shape)


def word_popcounts(bits: torch.Tensor) -> torch.Tensor:
    """Set bits of every int32 word, as int64, in the words' shape."""
    by = bits.contiguous().view(torch.uint8).to(torch.int64)
    return _POPCOUNT8.to(bits.device)[by].view(*bits.shape, 4).sum(-1)


def popcount(bits: torch.Tensor) -> int:
    """Number of set bits (fit entries) in int32 words (tail bits are zero by the format)."""
    _check_words(bits, None, "bits")
    return int(word_popcounts(bits).sum())


def density(bits: torch.Tensor, numel: int) -> float:
    """Fraction of fit entries of a ``numel``-element mask."""
    _check_words(bits, numel, "bits")
    return popcount(bits) / numel if numel else 1.0


def check_split_rate(split_rate: object) -> float:
    """Validate a split rate in (0, 1] and return it as a float."""
    if isinstance(split_rate, bool) or not isinstance(split_rate, (int, float)):
        raise TypeError(f"split_rate must be a number in (0, 1], got {type(split_rate).__name__}")
    if not (0.0 < float(split_rate) <= 1.0):
        raise ValueError(f"split_rate must be in (0, 1], got {split_rate}")
    return float(split_rate)


def kels_mask_bits(shape: Sequence[int] | torch.Size, split_rate: float, *, keep_all_inputs: bool = False,
                   keep_all_outputs: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """KELS mask words for a weight of ``shape`` = (C_out, C_in, *kernel) (or (C_out,) for a bias).

    Fit = the first ``ceil(split_rate * C_out)`` filters x the first ``ceil(split_rate * C_in)`` input
    channels (all inputs with ``keep_all_inputs`` — the layer reading the network input; all outputs
    with ``keep_all_outputs`` — the classifier)."""
    shape = torch.Size(shape)
    s = check_split_rate(split_rate)
    if len(shape) < 1 or any(d < 0 for d in shape):
        raise ValueError(f"shape must have at least one non-negative dimension, got {tuple(shape)}")
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    c_out = shape[0] if keep_all_outputs else math.ceil(s * shape[0])
    if len(shape) == 1:
        mask[:c_out] = True
    else:
        c_in = shape[1] if keep_all_inputs else math.ceil(s * shape[1])
        mask[:c_out, :c_in] = True
    return reference.pack_mask(mask)


def check_wels_args(shape: Sequence[int] | torch.Size, split_rate: float, seed: int, stream: int) -> tuple[int, int]:
    """Validate a WELS draw; return (numel, integer threshold)."""
    shape = torch.Size(shape)
    s = check_split_rate(split_rate)
    check_seed(seed)
    try:
        check_seed(stream)  # same range as a seed
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("seed", "stream")) from None
    return shape.numel(), reference.wels_threshold(s)


def layer_stream(generation: int, layer: int) -> int:
    """The mask stream of ``layer`` in ``generation`` (0 for a fixed mask)."""
    return stream_id(PURPOSE_MASK, generation, layer)


def _check_words(bits: object, numel: int | None, name: str) -> None:
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.int32 or bits.dim() != 1:
        got = f"{bits.dtype} tensor of shape {tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else type(bits).__name__
        raise TypeError(f"{name} must be a 1-D int32 tensor of packed words, got {got}")
    if numel is not None and bits.numel() != num_words(numel):
        raise ValueError(f"{name} has {bits.numel()} words, expected {num_words(numel)} for {numel} elements")
