"""The compressed WELS weight format read by the sparse kernels (:mod:`.sparse_conv`) and the reference.

One layer, :class:`Compressed`:

* The weight is viewed as a matrix ``[N, K]`` with N = output channels and K in *implicit-GEMM order*
  ``(kh, kw, C_in/groups)`` — channel fastest, matching NHWC activations — so a conv weight
  ``[N, C, R, S]`` is permuted to ``[N, R, S, C]`` first (a linear weight ``[N, K]`` is already there).
* ``bits``: int32 ``[N, T]``, ``T = ceil(K / 32)``; bit b of word (n, t) keeps element ``k = 32 t + b``
  of row n. Rows start on a word boundary (unlike the flat mask format) so a K-tile of 32 is one word.
* ``values``: the kept values (``nnz`` of them, fp32 / fp16 / bf16) *chunk-major*: a chunk is 8 words
  (256 k) of a row; chunk 0 of rows 0..N-1, then chunk 1 of rows 0..N-1, ...; within a chunk of a row k
  ascending. So the values a program reads for a block of consecutive rows in one chunk are one contiguous
  run, whatever its block size.
* ``offsets``: int64 ``[N, ceil(T / 8)]``, the index in ``values`` of the first kept value of (row n,
  chunk c): a tile decodes from its chunk's offset plus popcounts of at most 7 earlier words of the row,
  never scanning its row. (With one chunk per row, K <= 256, the order is simply row by row.)

Memory: ``s*bits + 1 + 0.25`` bits per weight, i.e. 57.8 % of dense bf16 at s = 0.5.
A weight tile ``[32, BLOCK_N]`` is decoded as ``value = bit ? values[offset + popcount(word & (2^b - 1))] : 0``.
Also the argument contract of the sparse ops (every implementation's). Host-side only (no Triton):
compressing, checking and decompressing need no GPU toolchain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import reference
from .format import word_popcounts
from .reference import pack_mask

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK_WORDS = 8


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
        check_compressed(self.bits, self.values, self.offsets, self.shape)
        tail = self.k % 32
        if tail and bool(((self.bits[:, -1].to(torch.int64) & 0xFFFFFFFF) >> tail).any()):
            raise ValueError("compressed bits have bits set beyond the row length")
        counts = word_popcounts(self.bits)
        if int(counts.sum()) != self.values.numel():
            raise ValueError(f"compressed values hold {self.values.numel()} entries, the bits keep {int(counts.sum())}")
        if not torch.equal(_chunk_offsets(counts), self.offsets):
            raise ValueError("compressed offsets do not match the bits")
        return self


def check_compressed(bits: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, shape: Sequence[int],
                     bias: torch.Tensor | None = None) -> None:
    """Validate the dtypes and shapes of a compressed weight's tensors (and of a bias: [N], floating) against
    the dense ``shape``; raise ValueError naming the tensor. Reads no value (no device sync): see
    :meth:`Compressed.validate` for the content checks."""
    n, k = shape[0], math.prod(shape[1:])
    t = (k + 31) // 32
    if bits.dtype != torch.int32 or tuple(bits.shape) != (n, t):
        raise ValueError(f"compressed bits must be int32 of shape {(n, t)}, got {bits.dtype} {tuple(bits.shape)}")
    if offsets.dtype != torch.int64 or tuple(offsets.shape) != (n, -(-t // CHUNK_WORDS)):
        raise ValueError(f"compressed offsets must be int64 of shape {(n, -(-t // CHUNK_WORDS))}, got "
                         f"{offsets.dtype} {tuple(offsets.shape)}")
    if values.dtype not in DTYPES or values.dim() != 1:
        raise ValueError(f"compressed values must be a 1-D fp32/fp16/bf16 tensor, got {values.dtype} "
                         f"{tuple(values.shape)}")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a floating tensor of shape {(n,)}, got {bias.dtype} {tuple(bias.shape)}")


def _chunk_offsets(counts: torch.Tensor) -> torch.Tensor:
    """offsets [N, C] from the per-word popcounts [N, T]: exclusive prefix in chunk-major order."""
    n, t = counts.shape
    chunks = -(-t // CHUNK_WORDS)
    per_chunk = torch.nn.functional.pad(counts, (0, chunks * CHUNK_WORDS - t)).view(n, chunks, CHUNK_WORDS).sum(-1)
    flat = per_chunk.t().reshape(-1)  # chunk-major: (c, n)
    start = torch.cumsum(flat, 0) - flat
    return start.view(chunks, n).t().contiguous()


def gemm_order(w: torch.Tensor) -> torch.Tensor:
    """[N, C, R, S] -> [N, R*S*C] (implicit-GEMM order); [N, K] unchanged."""
    k = math.prod(w.shape[1:])  # explicit: reshape(0, -1) of an empty weight is ambiguous
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], k) if w.dim() == 4 else w.reshape(w.shape[0], k)


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
    bits = pack_mask(padded).view(n, t)
    values = reference.chunk_major(w2)[reference.chunk_major(m2)]
    return Compressed(tuple(weight.shape), bits, values.contiguous(), _chunk_offsets(word_popcounts(bits)))


def decompress(cw: Compressed) -> torch.Tensor:
    """The dense weight W*M in its original layout."""
    return reference.decompress(cw.bits, cw.values, cw.shape)


def check_conv_args(x: torch.Tensor, shape: Sequence[int], groups: int) -> None:
    """Validate a sparse conv2d call (every implementation's contract)."""
    if len(shape) != 4:
        raise ValueError(f"a conv weight shape has 4 entries (N, C/groups, R, S), got {tuple(shape)}")
    n_out, c_g = shape[0], shape[1]
    if x.dim() != 4 or x.shape[1] != c_g * groups:
        raise ValueError(f"x must be [B, {c_g * groups}, H, W], got {tuple(x.shape)}")
    if groups not in (1, x.shape[1]) or (groups > 1 and n_out != groups):
        raise ValueError(f"sparse conv supports groups=1 and depthwise (groups = C_in = C_out), got groups={groups}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be fp32/fp16/bf16, got {x.dtype}")


def check_linear_args(x: torch.Tensor, shape: Sequence[int]) -> None:
    """Validate a sparse linear call."""
    if len(shape) != 2:
        raise ValueError(f"a linear weight shape has 2 entries (N, K), got {tuple(shape)}")
    if x.dim() < 1 or x.shape[-1] != shape[1]:
        raise ValueError(f"x must end in {shape[1]} features, got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be fp32/fp16/bf16, got {x.dtype}")


def density_of(cw: Compressed) -> float:
    """Fraction of kept weights (from the number of values: no device sync)."""
    return cw.values.numel() / max(1, cw.shape[0] * cw.k)
