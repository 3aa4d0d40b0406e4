"""Pure-PyTorch oracle of every ke_fast kernel.

This file is the tests' truth and the fallback CPU path when the C++ extension cannot be built.
It runs on any device (only int64 / float32 torch ops) and follows the shared contract:

* Bit mask: the weight's contiguous row-major flattening, int32 words, bit ``b`` of word ``w`` is
  element ``32*w + b``; tail bits are zero; bit = 1 means *fit* (kept), 0 means *reset*.
* Randomness: Philox4x32-10 exactly as Triton's ``tl.philox`` (key = the 64-bit seed, counter =
  ``(q_lo, q_hi, stream_lo, stream_hi)`` with ``q = element_index >> 2``); element ``i`` uses output
  word ``i & 3`` of its group. A value therefore depends only on (seed, stream, element index).
* Uniform draw: ``v = ((r >> 8) - 2**23) * 2**-23`` in [-1, 1), exact in fp32, then one fp32 multiply
  by the scheme's bound: bit-identical on every backend.
* Normal draw: Box-Muller on the pairs (r0, r1) and (r2, r3) of a group (cos for the even, sin for
  the odd element), computed in fp64 and rounded once to fp32, then times the std in fp32; the
  libraries' log/cos/sin differ, so backends may differ by an ulp or two.
* WELS mask bit: ``(r >> 8) < round(split_rate * 2**24)`` — an integer compare, exact everywhere.
"""
from __future__ import annotations

import math
import struct
from typing import Sequence

import torch
import torch.nn.functional as F

from .streams import splitmix64_host

M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

KIND_UNIFORM, KIND_NORMAL, KIND_ZEROS = 0, 1, 2
TWO_PI = 6.283185307179586
_CHUNK = 1 << 22  # elements per chunk: bounds the int64 temporaries of the reference


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a*b for a in [0, 2^32) (int64 tensor) and a 32-bit constant b.

    Split a into 16-bit halves so no int64 intermediate overflows (a*b itself needs 64 bits)."""
    t_h = (a >> 16) * b
    t_l = (a & 0xFFFF) * b
    hi = (t_h + (t_l >> 16)) >> 16
    lo = (((t_h & 0xFFFF) << 16) + t_l) & M32
    return hi, lo


def philox4x32(q: torch.Tensor, key: int, stream: int) -> torch.Tensor:
    """Philox4x32-10 of counters ``(q_lo, q_hi, stream_lo, stream_hi)`` under ``key`` (64-bit seed).

    Args:
        q: int64 tensor of group indices (``element_index >> 2``), any shape.
        key: seed in [0, 2^64).
        stream: stream id in [0, 2^64).
    Returns:
        int64 tensor of shape ``q.shape + (4,)`` holding the four uint32 outputs.
    """
    q = q.to(torch.int64)
    c0 = q & M32
    c1 = (q >> 32) & M32
    c2 = torch.full_like(q, stream & M32)
    c3 = torch.full_like(q, (stream >> 32) & M32)
    k0, k1 = key & M32, (key >> 32) & M32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & M32
        k1 = (k1 + PHILOX_KEY_B) & M32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def random_bits(start: int, count: int, key: int, stream: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint32 draws (in int64) of elements ``start .. start+count-1`` of a stream."""
    q0 = start >> 2
    q1 = (start + count - 1) >> 2
    q = torch.arange(q0, q1 + 1, device=device, dtype=torch.int64)
    r = philox4x32(q, key, stream).reshape(-1)
    off = start - 4 * q0
    return r[off : off + count]


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """Exact fp32 uniform in [-1, 1) from uint32 draws: ((r >> 8) - 2^23) * 2^-23."""
    return ((r >> 8) - (1 << 23)).to(torch.float32) * (1.0 / (1 << 23))


def normal_from_groups(g: torch.Tensor) -> torch.Tensor:
    """Normals for whole groups: ``g`` is (..., 4) uint32 draws -> (..., 4) fp32 normals (fp64 math)."""
    u1a = ((g[..., 0] >> 8) + 1).to(torch.float64) * (1.0 / (1 << 24))
    u2a = (g[..., 1] >> 8).to(torch.float64) * (1.0 / (1 << 24))
    u1b = ((g[..., 2] >> 8) + 1).to(torch.float64) * (1.0 / (1 << 24))
    u2b = (g[..., 3] >> 8).to(torch.float64) * (1.0 / (1 << 24))
    ra = torch.sqrt(-2.0 * torch.log(u1a))
    rb = torch.sqrt(-2.0 * torch.log(u1b))
    ta, tb = TWO_PI * u2a, TWO_PI * u2b
    z = torch.stack((ra * torch.cos(ta), ra * torch.sin(ta), rb * torch.cos(tb), rb * torch.sin(tb)), dim=-1)
    return z.to(torch.float32)


def draw(start: int, count: int, key: int, stream: int, kind: int, scale: float,
         device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 values of elements ``start .. start+count-1`` of a stream under a scheme kind.

    ``scale`` is the bound (uniform) or standard deviation (normal); it is rounded to fp32 first,
    as the kernels do."""
    scale32 = torch.tensor(scale, dtype=torch.float32, device=device)
    if kind == KIND_ZEROS:
        return torch.zeros(count, dtype=torch.float32, device=device)
    q0 = start >> 2
    q1 = (start + count - 1) >> 2
    q = torch.arange(q0, q1 + 1, device=device, dtype=torch.int64)
    g = philox4x32(q, key, stream)
    if kind == KIND_UNIFORM:
        v = uniform_from_bits(g)
    elif kind == KIND_NORMAL:
        v = normal_from_groups(g)
    else:
        raise ValueError(f"unknown kind {kind}")
    off = start - 4 * q0
    return v.reshape(-1)[off : off + count] * scale32


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool-like tensor (non-zero = fit) into int32 words (row-major flattening, LSB first)."""
    flat = mask.reshape(-1) != 0
    n = flat.numel()
    pad = (-n) % 32
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=flat.device)
    # Bytes in little-endian order form the int32 words: byte k of word w holds elements 32w+8k..+7.
    by = (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)
    return by.view(torch.int32)


def unpack_mask(words: torch.Tensor, numel: int) -> torch.Tensor:
    """Unpack int32 words into a flat bool tensor of ``numel`` elements."""
    by = words.contiguous().view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    bits = (by.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)


def wels_bits_(out: torch.Tensor, numel: int, seed: int, stream: int, threshold: int) -> None:
    """WELS mask words into ``out``: element i is fit iff (r_i >> 8) < threshold (seed/stream as int64)."""
    key, stream = seed & M64, stream & M64
    for start in range(0, numel, _CHUNK):  # _CHUNK is a multiple of 32: chunks fill whole words
        count = min(_CHUNK, numel - start)
        r = random_bits(start, count, key, stream, out.device)
        out[start // 32 : (start + count + 31) // 32] = pack_mask((r >> 8) < threshold)


def wels_threshold(split_rate: float) -> int:
    """Integer threshold on the top 24 bits of a draw: P(fit) = threshold / 2^24 ~ split_rate."""
    return min(1 << 24, max(0, int(round(split_rate * (1 << 24)))))


def reset_tensor_(weight: torch.Tensor, words: torch.Tensor, key: int, stream: int, kind: int, scale: float
                  ) -> torch.Tensor:
    """Reset the entries of a contiguous ``weight`` whose mask bit is 0, in place; fit entries keep their bits."""
    flat = weight.view(-1)
    n = flat.numel()
    with torch.no_grad():
        for start in range(0, n, _CHUNK):
            count = min(_CHUNK, n - start)
            fit = unpack_mask(words[start // 32 : (start + count + 31) // 32], count)
            if bool(fit.all()):
                continue
            vals = draw(start, count, key, stream, kind, scale, weight.device).to(weight.dtype)
            seg = flat[start : start + count]
            seg.copy_(torch.where(fit, seg, vals))
    return weight



def apply_mask(x: torch.Tensor, words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(x * M).to(dtype) with M unpacked from ``words``; reset entries are exact zeros."""
    keep = unpack_mask(words, x.numel()).reshape(x.shape)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).to(dtype)


def apply_masks(xs: list[torch.Tensor], words: list[torch.Tensor], table: torch.Tensor, tiles: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """Every ``(xs[i] * M_i).to(dtype)`` flattened one after the other into one tensor (``table`` / ``tiles``
    unused: the sizes are the tensors')."""
    return torch.cat([apply_mask(x, w, dtype).reshape(-1) for x, w in zip(xs, words)])


def table_rows(table: torch.Tensor, prefix: int) -> list[tuple[int, int, int, float]]:
    """(row, stream, kind, scale) of every row of a reset table (``kernels.reinit.launch_table``).

    A row's stream is ``splitmix64(prefix ^ layer id)``, the unsigned 64-bit value the kernels finish on
    the device; ``prefix`` may be given as its int64 reinterpretation."""
    out = []
    for i, row in enumerate(table.tolist()):
        scale = struct.unpack("<f", struct.pack("<I", row[5] & M32))[0]
        out.append((i, splitmix64_host((prefix & M64) ^ (row[3] & M64)), row[4], scale))
    return out


def reset_entries_(weights: list[torch.Tensor], words: list[torch.Tensor], table: torch.Tensor, tiles: torch.Tensor,
                   seed: int, prefix: int, has_normal: bool) -> None:
    """Re-draw the reset entries of every tensor of a reset table, tensor by tensor (``tiles`` unused)."""
    for i, stream, kind, scale in table_rows(table, prefix):
        reset_tensor_(weights[i], words[i], seed & M64, stream, kind, scale)


SPARSE_CHUNK = 256  # weights per chunk of a row in the compressed format (8 words)


def chunk_major(rows: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [C, N, 256]: the chunks of 256 columns (the last zero-padded), chunk-major — the order in
    which the compressed format stores its kept values."""
    n, k = rows.shape
    c = max(1, -(-k // SPARSE_CHUNK))
    return F.pad(rows, (0, c * SPARSE_CHUNK - k)).view(n, c, SPARSE_CHUNK).transpose(0, 1)


def decompress(bits: torch.Tensor, values: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The dense W*M of a compressed sparse weight (``kernels.sparse_conv`` format: values chunk-major) in its
    layout ``shape``."""
    n, k = shape[0], math.prod(shape[1:])
    t = bits.shape[1]
    keep = unpack_mask(bits.reshape(-1), n * t * 32).view(n, t * 32)[:, :k]
    chunks = torch.zeros(chunk_major(keep).shape, dtype=values.dtype, device=values.device)
    chunks[chunk_major(keep)] = values
    dense = chunks.transpose(0, 1).reshape(n, chunks.shape[0] * SPARSE_CHUNK)[:, :k].contiguous()
    if len(shape) == 4:
        _, c, r, s = shape
        return dense.view(n, r, s, c).permute(0, 3, 1, 2).contiguous()
    return dense.view(tuple(shape))


def conv_out_size(x_shape: Sequence[int], shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """(B, N, OH, OW) of a conv2d of an input of ``x_shape`` with a weight of ``shape``."""
    n_out, _, r, s = shape
    oh = (x_shape[2] + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (x_shape[3] + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return x_shape[0], n_out, oh, ow


def sparse_conv2d(x: torch.Tensor, bits: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                  shape: Sequence[int], bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int) -> torch.Tensor:
    """conv2d with a compressed weight: decompress, then F.conv2d; NCHW in channels_last memory.

    A weight without elements (N = 0 or C_in = 0) gives the sum over no term: the bias (or zeros) in the
    output's shape, as F.linear does for K = 0 (F.conv2d refuses N = 0 and returns 0 channels for C_in = 0)."""
    if math.prod(shape) == 0:
        out = x.new_zeros(conv_out_size(x.shape, shape, stride, padding, dilation))
        if bias is not None:
            out += bias.to(x.dtype).view(1, -1, 1, 1)
        return out.contiguous(memory_format=torch.channels_last)
    w = decompress(bits, values, shape).to(x.dtype)
    out = F.conv2d(x, w, None if bias is None else bias.to(x.dtype), tuple(stride), tuple(padding), tuple(dilation),
                   groups)
    return out.contiguous(memory_format=torch.channels_last)


def sparse_linear(x: torch.Tensor, bits: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                  shape: Sequence[int], bias: torch.Tensor | None) -> torch.Tensor:
    """linear with a compressed weight: decompress, then F.linear; contiguous."""
    w = decompress(bits, values, shape).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype)).contiguous()
