"""Sparse WELS conv2d / linear reading bit-mask-compressed weights, decoded in registers, fed to tl.dot.

The weights come in the compressed format of :mod:`.compressed` (its names are re-exported here). Kernels:
the tiled implicit GEMM (``tl.dot``, autotuned), depthwise, and for at most ``SKINNY_MAX_ROWS`` GEMM rows the
split-K skinny kernel (batch-1 linears, small late convs): the launchers pick by rows.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import backend, reference
# the format's host side (no Triton), re-exported under the old names
from .compressed import (CHUNK_WORDS, DTYPES, Compressed, _chunk_offsets, check_compressed,  # noqa: F401
                         check_conv_args, check_linear_args, compress, decompress, density_of, gemm_order)
from .device import launch_guard
from .reference import conv_out_size
from .rng import cast_rtne


@triton.jit
def _popc(x):
    """Population count of uint32 lanes (SWAR; no intrinsic needed, so it runs in the interpreter)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _dot_acc(a, wt, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ wt: in fp32 (UPCAST: for the interpreter, whose tl.dot multiplies bf16 bit patterns), in
    exact fp32 (IEEE: no TF32), or in the input dtype with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, wt.to(a.dtype), acc, input_precision="ieee")
    else:
        return tl.dot(a, wt.to(a.dtype), acc)


@triton.jit
def _decode_tile(bits_ptr, vals_ptr, offs_ptr, n, n_ok, t, T, NCHUNK, running):
    """Weight tile [32, BLOCK_N] of K-tile ``t`` for output channels ``n``; returns (tile, new running).

    ``running`` is each row's index into ``values`` at word t; it is re-seeded from ``offsets`` at every
    chunk start, so a tile never depends on more than 7 earlier words."""
    word = tl.load(bits_ptr + n * T + t, mask=n_ok, other=0).to(tl.uint32, bitcast=True)
    seed = tl.load(offs_ptr + n * NCHUNK + t // 8, mask=n_ok & (t % 8 == 0), other=0).to(tl.int32)
    running = tl.where(t % 8 == 0, seed, running)
    kk = tl.arange(0, 32).to(tl.uint32)[:, None]
    below = word[None, :] & ((tl.full([32, 1], 1, tl.uint32) << kk) - 1)
    keep = ((word[None, :] >> kk) & 1) != 0
    idx = running[None, :] + _popc(below).to(tl.int32)
    tile = tl.load(vals_ptr + idx, mask=keep & n_ok[None, :], other=0.0)
    return tile, running + _popc(word).to(tl.int32)


_HALF_TILES = [(16, 64, 4, 3), (16, 128, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3),
               (128, 128, 8, 2)]
# fp32 (exact ieee dot) needs more registers: only tiles that compile without spills on sm_80 and sm_90
# under every supported Triton (3.6 to 3.9 checked with `make aot-matrix TRITONS="3.6.0 3.7.0 3.8.0 3.9.0"`)
_FP32_TILES = [(16, 64, 4, 3), (16, 128, 4, 2), (64, 64, 8, 3)]


def gpu_configs(fp32: bool = False) -> list[triton.Config]:
    """Autotuning space on a GPU (BLOCK_K is one mask word: 32)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in (_FP32_TILES if fp32 else _HALF_TILES)]


@triton.jit
def _tile_coords(M, N, OH, OW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows m (output pixels: batch b, oh, ow) and columns n (output channels) of this program's tile."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return m, n, m < M, n < N, m // (OH * OW), (m // OW) % OH, m % OW


@triton.jit
def _store_tile(out_ptr, acc, bias_ptr, m, n, m_ok, n_ok, N, HAS_BIAS: tl.constexpr):
    """out[m, n] = acc (+ bias[n]) in out's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * N + n[None, :], cast_rtne(acc, out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _configs(fp32: bool = False) -> list[triton.Config]:
    # the interpreter has no driver to benchmark configs: one small config there
    if backend.interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return gpu_configs(fp32)


@triton.jit
def _sparse_conv_kernel(out_ptr, x_ptr, bits_ptr, vals_ptr, offs_ptr, bias_ptr,
                        M, N, K, T, NCHUNK, H, W, C, OH, OW, KW,
                        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """out[m, n] = sum_k x_im2col[m, k] * W[n, k] (+ bias[n]) — implicit-GEMM conv on NHWC input.

    out_ptr: [M, N] (NHWC output, M = B*OH*OW); x_ptr: NHWC input [B, H, W, C]; bits/vals/offs: the
    compressed weight; bias_ptr: [N] (unused without HAS_BIAS). k = (r*KW + s)*C + c. A linear layer is
    the case H = W = OH = OW = KW = 1, C = K. Index math is int32 (fewer registers): the launcher
    sends tensors of 2^31 elements or more to the reference path. IEEE: exact fp32 products (no tf32).
    UPCAST: multiply in fp32 — only for the interpreter, whose tl.dot multiplies bf16 bit patterns;
    bf16 x bf16 products are exact in fp32, so the result is the bf16 kernel's."""
    m, n, m_ok, n_ok, b, oh, ow = _tile_coords(M, N, OH, OW, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    running = tl.zeros([BLOCK_N], dtype=tl.int32)
    for t in range(0, T):
        k = t * 32 + tl.arange(0, 32)
        c = k % C
        rs = k // C
        ih = oh[:, None] * stride_h - pad_h + (rs // KW)[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + (rs % KW)[None, :] * dil_w
        ok = m_ok[:, None] & (k < K)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + ((b[:, None] * H + ih) * W + iw) * C + c[None, :], mask=ok, other=0.0)
        wt, running = _decode_tile(bits_ptr, vals_ptr, offs_ptr, n, n_ok, t, T, NCHUNK, running)
        acc = _dot_acc(a, wt, acc, UPCAST, IEEE)
    _store_tile(out_ptr, acc, bias_ptr, m, n, m_ok, n_ok, N, HAS_BIAS)


@triton.jit
def _sparse_depthwise_kernel(out_ptr, x_ptr, bits_ptr, vals_ptr, offs_ptr, bias_ptr,
                             M, N, K, T, NCHUNK, H, W, OH, OW, KW,
                             stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Depthwise conv (groups = C = N): out[m, n] = sum_{r,s} x[b, ih, iw, n] * W[n, r, s] (+ bias[n]).

    No reduction over channels, so no tl.dot: tap k of channel n is decoded on its own as
    ``offsets[n, k // 256] + popcount(earlier words of the chunk) + popcount(word & (2^(k%32) - 1))``."""
    m, n, m_ok, n_ok, b, oh, ow = _tile_coords(M, N, OH, OW, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K):
        wi = k // 32
        word = tl.load(bits_ptr + n * T + wi, mask=n_ok, other=0).to(tl.uint32, bitcast=True)
        idx = tl.load(offs_ptr + n * NCHUNK + wi // 8, mask=n_ok, other=0).to(tl.int32)
        for w in range((wi // 8) * 8, wi):
            idx += _popc(tl.load(bits_ptr + n * T + w, mask=n_ok, other=0).to(tl.uint32, bitcast=True)).to(tl.int32)
        bit = tl.zeros([BLOCK_N], dtype=tl.uint32) + (k % 32)
        idx += _popc(word & ((tl.full([BLOCK_N], 1, tl.uint32) << bit) - 1)).to(tl.int32)
        keep = ((word >> bit) & 1) != 0
        wk = tl.load(vals_ptr + idx, mask=keep & n_ok, other=0.0).to(tl.float32)
        ih = oh * stride_h - pad_h + (k // KW) * dil_h
        iw = ow * stride_w - pad_w + (k % KW) * dil_w
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_ptr + ((b * H + ih) * W + iw)[:, None] * N + n[None, :],
                     mask=ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += xv * wk[None, :]
    _store_tile(out_ptr, acc, bias_ptr, m, n, m_ok, n_ok, N, HAS_BIAS)


_conv_tuned = triton.autotune(configs=_configs(), key=["M", "N", "K"])(_sparse_conv_kernel)
_conv_tuned_fp32 = triton.autotune(configs=_configs(fp32=True), key=["M", "N", "K"])(_sparse_conv_kernel)
_dw_tuned = triton.autotune(configs=[triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)]
                            if not backend.interpreting() else _configs(), key=["M", "N", "K"])(_sparse_depthwise_kernel)


# ---- skinny GEMM: few rows (batch-1 linears, late convs), split-K ----------------------------------

SKINNY_MAX_ROWS = 16  # GEMM rows up to which the Triton launchers run the split-K kernel below
SKINNY_BLOCK_N = 64
SKINNY_WARPS = 4
SKINNY_PROGRAMS_PER_SM = 4


@triton.jit
def _skinny_kernel(out_ptr, part_ptr, count_ptr, x_ptr, bits_ptr, vals_ptr, offs_ptr, bias_ptr,
                   M, N, K, T, NCHUNK, SPLIT_WORDS, SPLIT_K, H, W, C, OH, OW, KW,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   HAS_BIAS: tl.constexpr, ONE_ROW: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m, n] = sum_k x_im2col[m, k] * W[n, k] (+ bias[n]) for M <= BLOCK_M rows, split over K.

    Grid (cdiv(N, BLOCK_N), SPLIT_K): program (j, s) reduces words [s * SPLIT_WORDS, (s + 1) * SPLIT_WORDS)
    of output tile j (SPLIT_WORDS is a multiple of 8: whole chunks, each read as one contiguous run of
    ``values`` from its ``offsets`` entry) into part_ptr[s] (fp32 [SPLIT_K, M, N]) and takes a ticket from
    count_ptr[j] (int32, zero before the launch); the program that draws the last ticket sums the SPLIT_K
    partials in split order (deterministic, whichever program draws it), adds the bias, stores ``out`` and
    sets count_ptr[j] back to zero, so the launcher reuses one workspace without a memset (and a captured
    CUDA graph replays it as is). SPLIT_K = 1 stores at once (part/count unused). T = 0 (K = 0) reads no
    word and stores the bias (or zeros). ONE_ROW (M = 1): FMAs into a [32, BLOCK_N] accumulator, reduced
    once at the end; otherwise tl.dot on a [BLOCK_M, 32] x [32, BLOCK_N] step. The next word of the bit mask is loaded while
    the current one decodes. Addressing as in :func:`_sparse_conv_kernel` (a linear layer: H = W = OH = OW =
    KW = 1, C = K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    b, oh, ow = m // (OH * OW), (m // OW) % OH, m % OW
    t0 = pid_k * SPLIT_WORDS
    t1 = tl.minimum(t0 + SPLIT_WORDS, T)
    if ONE_ROW:
        acc2 = tl.zeros([32, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    running = tl.zeros([BLOCK_N], dtype=tl.int32)  # seeded from offsets at each chunk start (t0 is one)
    # t0 < T unless T = 0 (K = 0: no word to read; bits may then be a null pointer). tl.where rather than
    # `n_ok & (t0 < T)`: the interpreter makes an int8 mask of a tensor & scalar and refuses it
    word = tl.load(bits_ptr + n * T + t0, mask=tl.where(t0 < T, n_ok, False), other=0).to(tl.uint32, bitcast=True)
    kk = tl.arange(0, 32).to(tl.uint32)[:, None]
    low = (tl.full([32, 1], 1, tl.uint32) << kk) - 1
    for t in range(t0, t1):
        # prefetch the next word (the last step reloads its own: no out-of-split read)
        nxt = tl.load(bits_ptr + n * T + tl.minimum(t + 1, t1 - 1), mask=n_ok, other=0).to(tl.uint32, bitcast=True)
        seed = tl.load(offs_ptr + n * NCHUNK + t // 8, mask=n_ok & (t % 8 == 0), other=0).to(tl.int32)
        running = tl.where(t % 8 == 0, seed, running)
        keep = ((word[None, :] >> kk) & 1) != 0
        idx = running[None, :] + _popc(word[None, :] & low).to(tl.int32)
        wt = tl.load(vals_ptr + idx, mask=keep & n_ok[None, :], other=0.0)
        running += _popc(word).to(tl.int32)
        word = nxt
        k = t * 32 + tl.arange(0, 32)
        c = k % C
        rs = k // C
        if ONE_ROW:  # row 0: b = oh = ow = 0
            ih1 = (rs // KW) * dil_h - pad_h
            iw1 = (rs % KW) * dil_w - pad_w
            ok1 = (k < K) & (ih1 >= 0) & (ih1 < H) & (iw1 >= 0) & (iw1 < W)
            a1 = tl.load(x_ptr + (ih1 * W + iw1) * C + c, mask=ok1, other=0.0)
            acc2 += a1.to(tl.float32)[:, None] * wt.to(tl.float32)
        else:
            ih = oh[:, None] * stride_h - pad_h + (rs // KW)[None, :] * dil_h
            iw = ow[:, None] * stride_w - pad_w + (rs % KW)[None, :] * dil_w
            ok = m_ok[:, None] & (k < K)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + ((b[:, None] * H + ih) * W + iw) * C + c[None, :], mask=ok, other=0.0)
            acc = _dot_acc(a, wt, acc, UPCAST, IEEE)
    if ONE_ROW:
        acc = tl.sum(acc2, axis=0)[None, :]  # BLOCK_M = 1
    tile_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        _store_tile(out_ptr, acc, bias_ptr, m, n, m_ok, n_ok, N, HAS_BIAS)
    else:
        tl.store(part_ptr + (pid_k * M + m[:, None]) * N + n[None, :], acc, mask=tile_ok)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, SPLIT_K):
                total += tl.load(part_ptr + (s * M + m[:, None]) * N + n[None, :], mask=tile_ok, other=0.0,
                                 cache_modifier=".cg")
            _store_tile(out_ptr, total, bias_ptr, m, n, m_ok, n_ok, N, HAS_BIAS)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed")  # every ticket is drawn: ready for the next launch


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, read once per device (``get_device_properties`` costs
    microseconds per call); the interpreter has no SMs: a nominal 2, so the tests' small shapes still split."""
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNTS.get(index)
    if count is None:
        count = _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


# Split-K workspaces: (fp32 partials [SPLIT_K, M, N], int32 tickets [tiles]) per (device, stream, SPLIT_K, M, N),
# allocated zeroed on first use and kept for the life of the process (never evicted: a captured CUDA graph keeps
# their addresses; a first use inside a capture allocates from the graph's pool, and the dict keeps it). The kernel
# leaves the tickets at zero, so a launch needs no memset and no allocation. Keyed by stream because two launches of
# one shape running concurrently on two streams must not share tickets; launches on one stream run one after another
# (so do the launches of one graph captured on one stream; two graphs captured on one stream, replayed concurrently
# on two streams, would share one workspace).
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _stream_key(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return triton.runtime.driver.active.get_current_stream(device.index)


def skinny_workspace(device: torch.device, splits: int, m: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials, tickets) of a skinny launch with ``splits`` K splits on the current stream of ``device``: fp32
    [splits, m, n_out] and int32 [ceil(n_out / SKINNY_BLOCK_N)] zeros, one each per (device, stream, splits,
    m, n_out); one element each when nothing is split (the kernel does not touch them, but no pointer is null)."""
    key = (device, _stream_key(device), splits, m, n_out) if splits > 1 else (device, 0, 1, 0, 0)
    ws = _WORKSPACES.get(key)
    if ws is None:
        shape, tiles = ((splits, m, n_out), triton.cdiv(n_out, SKINNY_BLOCK_N)) if splits > 1 else ((1,), 1)
        ws = _WORKSPACES[key] = (torch.zeros(shape, dtype=torch.float32, device=device),
                                 torch.zeros(tiles, dtype=torch.int32, device=device))
    return ws


def skinny_split(n: int, t: int, device: torch.device, split_k: int | None = None) -> tuple[int, int]:
    """(SPLIT_K, words per split) of the skinny kernel for N outputs and T mask words per row: enough splits
    for about SKINNY_PROGRAMS_PER_SM programs per SM, each a whole number of 8-word chunks. ``split_k`` asks for
    a number of splits (rounded to whole chunks; tests use it)."""
    chunks = max(1, triton.cdiv(t, CHUNK_WORDS))
    if split_k is None:
        split_k = triton.cdiv(SKINNY_PROGRAMS_PER_SM * _sm_count(device), max(1, triton.cdiv(n, SKINNY_BLOCK_N)))
    words = triton.cdiv(chunks, max(1, min(split_k, chunks))) * CHUNK_WORDS
    return triton.cdiv(max(t, 1), words), words


def _skinny_launch(out: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, vals: torch.Tensor,
                   offsets: torch.Tensor, bias: torch.Tensor | None, m: int, n_out: int, k: int,
                   geometry: Sequence[int], split_k: int | None) -> None:
    """Launch :func:`_skinny_kernel` on ``out`` [m, n_out] (m <= SKINNY_MAX_ROWS); ``geometry`` is
    (H, W, C, OH, OW, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)."""
    t = bits.shape[1]
    splits, words = skinny_split(n_out, t, x.device, split_k)
    tiles = triton.cdiv(n_out, SKINNY_BLOCK_N)
    part, count = skinny_workspace(x.device, splits, m, n_out)
    _skinny_kernel[(tiles, splits)](out, part, count, x, bits, vals, offsets, vals if bias is None else bias,
                                    m, n_out, k, t, offsets.shape[1], words, splits, *geometry,
                                    HAS_BIAS=bias is not None, ONE_ROW=m == 1, IEEE=x.dtype == torch.float32,
                                    UPCAST=_upcast(x.dtype), BLOCK_M=1 if m == 1 else SKINNY_MAX_ROWS,
                                    BLOCK_N=SKINNY_BLOCK_N,
                                    num_warps=SKINNY_WARPS)


class _Fixed:
    """A kernel launched with one config, no autotuning: ``_Fixed(kernel, cfg)[grid](*args, **constexprs)``."""

    def __init__(self, kernel, config: triton.Config) -> None:
        self.kernel, self.config = kernel, config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.kernel[grid](*args, **kwargs, **self.config.kwargs, num_warps=self.config.num_warps,
                                     num_stages=self.config.num_stages)
        return launch


DEFAULT_CONFIG = {False: triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
                  True: triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3)}


def autotuning() -> bool:
    """Whether the GPU launch autotunes over :func:`gpu_configs` per (M, N, K); ``KE_FAST_AUTOTUNE=0`` runs
    :data:`DEFAULT_CONFIG` instead (the test suite does, and covers every config once on its own)."""
    return not backend.interpreting() and os.environ.get("KE_FAST_AUTOTUNE", "1") != "0"


def _conv_launcher(dtype: torch.dtype, config: triton.Config | None = None):
    fp32 = dtype == torch.float32
    if config is not None:
        return _Fixed(_sparse_conv_kernel, config)
    if not autotuning() and not backend.interpreting():
        return _Fixed(_sparse_conv_kernel, DEFAULT_CONFIG[fp32])
    return _conv_tuned_fp32 if fp32 else _conv_tuned


INDEX_LIMIT = 2 ** 31 - 1


def _too_big(x: torch.Tensor, bits: torch.Tensor, values: torch.Tensor, m: int, n_out: int, splits: int) -> bool:
    """Whether an index of the sparse kernels could pass :data:`INDEX_LIMIT`: they index in int32 (fewer
    registers), so a layer with any buffer of 2^31 elements or more takes the (dense) reference path. The
    buffers: x, the bits (and the k of a row's last word, 32 per word), the values, the output (m x n_out)
    and the skinny kernel's fp32 partials (splits x m x n_out); the offsets are smaller than the bits."""
    return max(x.numel(), bits.numel(), 32 * bits.shape[-1], values.numel(), m * n_out, splits * m * n_out) \
        > INDEX_LIMIT


def _upcast(dtype: torch.dtype) -> bool:
    return backend.interpreting() and dtype == torch.bfloat16


def sparse_conv2d(x: torch.Tensor, bits: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                  shape: Sequence[int], bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, *, config: triton.Config | None = None,
                  split_k: int | None = None) -> torch.Tensor:
    """Triton: conv2d of NCHW ``x`` (any memory format) with a compressed weight (groups 1 or depthwise).

    Arguments validated by :func:`check_conv_args` and :func:`check_compressed`; stride/padding/dilation are
    pairs. With groups = 1, up to :data:`SKINNY_MAX_ROWS` GEMM rows (batch x output pixels) run the split-K
    skinny kernel (``split_k`` forces its number of splits), more rows the tiled kernel (``config`` forces one
    of :func:`gpu_configs` and the tiled kernel at any size). Empty inputs give an empty output, C_in = 0 the
    bias (or zeros). A layer with a buffer past :data:`INDEX_LIMIT` elements runs the reference
    (:func:`_too_big`). Returns NCHW values in channels_last memory (the kernels compute NHWC), as every
    implementation of the op does."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    bsz, n_out, oh, ow = conv_out_size(x.shape, shape, stride, padding, dilation)
    m, t = bsz * oh * ow, bits.shape[1]
    skinny = groups == 1 and config is None and m <= SKINNY_MAX_ROWS
    splits = skinny_split(n_out, t, x.device, split_k)[0] if skinny else 1
    if _too_big(x, bits, values, m, n_out, splits):
        return reference.sparse_conv2d(x, bits, values, offsets, shape, bias, stride, padding, dilation, groups)
    _, c, h, w = x.shape
    s = shape[3]
    xh = x.permute(0, 2, 3, 1).contiguous()
    out = torch.empty(bsz, oh, ow, n_out, dtype=x.dtype, device=x.device)
    k = math.prod(shape[1:])
    vals = values if values.dtype == x.dtype else values.to(x.dtype)
    b_arg = bias.to(x.dtype) if bias is not None else vals
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_N"]))  # noqa: E731
    if out.numel():
        with launch_guard(x):
            if skinny:
                _skinny_launch(out, xh, bits, vals, offsets, b_arg if bias is not None else None, m, n_out, k,
                               (h, w, c, oh, ow, s, sh, sw, ph, pw, dh, dw), split_k)
            elif groups == 1:
                _conv_launcher(x.dtype, config)[grid](out, xh, bits, vals, offsets, b_arg, m, n_out, k, t,
                                                      offsets.shape[1], h, w, c, oh, ow, s, sh, sw, ph, pw, dh, dw,
                                                      HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                                                      UPCAST=_upcast(x.dtype))
            else:
                _dw_tuned[grid](out, xh, bits, vals, offsets, b_arg, m, n_out, k, t, offsets.shape[1], h, w,
                                oh, ow, s, sh, sw, ph, pw, dh, dw, HAS_BIAS=bias is not None)
    return out.permute(0, 3, 1, 2)


def sparse_linear(x: torch.Tensor, bits: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                  shape: Sequence[int], bias: torch.Tensor | None, *, config: triton.Config | None = None,
                  split_k: int | None = None) -> torch.Tensor:
    """Triton: ``x @ (W*M).T + bias`` with a compressed [N, K] weight; x is [..., K] (validated by
    :func:`check_linear_args`); ``config`` / ``split_k``, the kernel choice by rows, empty inputs, K = 0 and
    the size limit as in :func:`sparse_conv2d`. Returns a contiguous [..., N] tensor."""
    n_out, k = shape
    m = math.prod(x.shape[:-1])
    skinny = config is None and m <= SKINNY_MAX_ROWS
    splits = skinny_split(n_out, bits.shape[1], x.device, split_k)[0] if skinny else 1
    if _too_big(x, bits, values, m, n_out, splits):
        return reference.sparse_linear(x, bits, values, offsets, shape, bias)
    x2 = x.reshape(m, k).contiguous()
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    vals = values if values.dtype == x.dtype else values.to(x.dtype)
    b_arg = bias.to(x.dtype) if bias is not None else vals
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_N"]))  # noqa: E731
    if out.numel():
        with launch_guard(x):
            if skinny:
                _skinny_launch(out, x2, bits, vals, offsets, b_arg if bias is not None else None, m, n_out, k,
                               (1, 1, k, 1, 1, 1, 1, 1, 0, 0, 1, 1), split_k)
            else:
                _conv_launcher(x.dtype, config)[grid](out, x2, bits, vals, offsets, b_arg, m, n_out, k,
                                                      bits.shape[1], offsets.shape[1], 1, 1, k, 1, 1, 1, 1, 1, 0, 0,
                                                      1, 1, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                                                      UPCAST=_upcast(x.dtype))
    return out.view(*x.shape[:-1], n_out)
