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


# ---- the compressed WELS weight -------------------------------------------------------------------

@dataclass
class Compressed:
    """A conv/linear weight in the compressed WELS format (see the module docstring)."""

    shape: tuple[int, ...]  # the dense weight's shape: (N, C/groups, R, S) or (N, K)
    bits: torch.Tensor  # int32 [N, T]
    values: torch.Tensor  # [nnz]
    offsets: torch.Tensor  # int64 [N, ceil(T / 8)]

    @property
    def k(self) -> int:
        return math.prod(self.shape[1:])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bits, self.values, self.offsets))

    def validate(self) -> "Compressed":
        """Check shapes, dtypes and that offsets and values agree with the bits; raise ValueError if not."""
        n, k = self.shape[0], self.k
        t = (k + 31) // 32
        if self.bits.dtype != torch.int32 or tuple(self.bits.shape) != (n, t):
            raise ValueError(f"compressed bits must be int32 of shape {(n, t)}, got {self.bits.dtype} "
                             f"{tuple(self.bits.shape)}")
        if self.offsets.dtype != torch.int64 or tuple(self.offsets.shape) != (n, _cdiv(t, CHUNK_WORDS)):
            raise ValueError(f"compressed offsets must be int64 of shape {(n, _cdiv(t, CHUNK_WORDS))}, got "
                             f"{self.offsets.dtype} {tuple(self.offsets.shape)}")
        if self.values.dtype not in DTYPES or self.values.dim() != 1:
            raise ValueError(f"compressed values must be a 1-D fp32/fp16/bf16 tensor, got {self.values.dtype} "
                             f"{tuple(self.values.shape)}")
        tail = k % 32
        if tail and bool(((self.bits[:, -1].to(torch.int64) & 0xFFFFFFFF) >> tail).any()):
            raise ValueError("compressed bits have bits set beyond the row length")
        counts = word_popcounts(self.bits)
        if int(counts.sum()) != self.values.numel():
            raise ValueError(f"compressed values hold {self.values.numel()} entries, the bits keep {int(counts.sum())}")
        if not torch.equal(_chunk_offsets(counts), self.offsets):
            raise ValueError("compressed offsets do not match the bits")
        return self


def _chunk_offsets(counts: torch.Tensor) -> torch.Tensor:
    """offsets [N, C] from the per-word popcounts [N, T]: exclusive prefix in chunk-major order."""
    n, t = counts.shape
    chunks = _cdiv(t, CHUNK_WORDS)
    per_chunk = torch.nn.functional.pad(counts, (0, chunks * CHUNK_WORDS - t)).view(n, chunks, CHUNK_WORDS).sum(-1)
    flat = per_chunk.t().reshape(-1)  # chunk-major: (c, n)
    start = torch.cumsum(flat, 0) - flat
    return start.view(chunks, n).t().contiguous()


def gemm_order(w: torch.Tensor) -> torch.Tensor:
    """[N, C, R, S] -> [N, R*S*C] (implicit-GEMM order); [N, K] unchanged."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w.reshape(w.shape[0], -1)


def compress(weight: torch.Tensor, mask: torch.Tensor) -> Compressed:
    """Compress ``weight`` (conv [N, C, R, S] or linear [N, K]) keeping the entries where ``mask`` (bool,
    the weight's shape) is True."""
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"weight must be fp32/fp16/bf16, got {weight.dtype}")
    w2, m2 = gemm_order(weight), gemm_order(mask)
    n, k = w2.shape
    t = (k + 31) // 32
    padded = torch.zeros(n, t * 32, dtype=torch.bool, device=mask.device)
    padded[:, :k] = m2
    bits = _pack_bool(padded).view(n, t)
    values = reference.chunk_major(w2)[reference.chunk_major(m2)]
    return Compressed(tuple(weight.shape), bits, values.contiguous(), _chunk_offsets(word_popcounts(bits)))


def decompress(cw: Compressed) -> torch.Tensor:
    """The dense weight W*M in its original layout."""
    return reference.decompress(cw.bits, cw.values, cw.shape)


def conv_out_size(x_shape: Sequence[int], shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """(B, N, OH, OW) of a conv2d of an input of ``x_shape`` with a weight of ``shape``."""
    n_out, _, r, s = shape
    oh = (x_shape[2] + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (x_shape[3] + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return x_shape[0], n_out, oh, ow


def check_conv_args(x: torch.Tensor, shape: Sequence[int], groups: int) -> None:
    """Validate a sparse conv2d call (every implementation's contract)."""
    n_out, c_g = shape[0], shape[1]
    if x.dim() != 4 or x.shape[1] != c_g * groups:
        raise ValueError(f"x must be [B, {c_g * groups}, H, W], got {tuple(x.shape)}")
    if groups not in (1, x.shape[1]) or (groups > 1 and n_out != groups):
        raise ValueError(f"sparse conv supports groups=1 and depthwise (groups = C_in = C_out), got groups={groups}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be fp32/fp16/bf16, got {x.dtype}")


def check_linear_args(x: torch.Tensor, shape: Sequence[int]) -> None:
    """Validate a sparse linear call."""
    if x.dim() < 1 or x.shape[-1] != shape[1]:
        raise ValueError(f"x must end in {shape[1]} features, got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be fp32/fp16/bf16, got {x.dtype}")


def density_of(cw: Compressed) -> float:
    """Fraction of kept weights (from the number of values: no device sync)."""
    return cw.values.numel() / max(1, cw.shape[0] * cw.k)
