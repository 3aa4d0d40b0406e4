"""Counter-based randomness shared by every kernel: the Triton device helpers.

A value depends only on (seed, stream, element index) — never on device, launch shape, rank or how
many values were drawn before — so masks and resets agree on CPU and GPU, on every DDP rank and after
a resume. The exact recipe (Philox4x32-10 as ``tl.philox``, the uniform and normal transforms) is
documented in :mod:`ke_fast.kernels.reference`, which is its oracle. The host half (stream mixing, seed
checks) lives in :mod:`.streams`, which imports no Triton; its names are re-exported here.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .streams import (PURPOSE_INIT, PURPOSE_MASK, PURPOSE_RESET, as_int64, check_seed,  # noqa: F401 (re-exported)
                      splitmix64_host, stream_id, stream_prefix)


@triton.jit
def splitmix64(x):
    """The host's _splitmix64 on a uint64 scalar (the fused reset finishes each layer's stream on device)."""
    x = x + 0x9E3779B97F4A7C15
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def philox_group(seed, q, stream):
    """Four uint32 draws of group ``q`` (int64, element_index >> 2) in ``stream`` (int64 scalar)."""
    s = stream.to(tl.int64).to(tl.uint64, bitcast=True)  # small ints arrive as i32
    return tl.philox(seed, q.to(tl.uint32), (q >> 32).to(tl.uint32),
                     (s & 0xFFFFFFFF).to(tl.uint32), (s >> 32).to(tl.uint32))


@triton.jit
def uniform_pm1(r):
    """Exact fp32 uniform in [-1, 1) from a uint32 draw."""
    return ((r >> 8).to(tl.int32) - 8388608).to(tl.float32) * (1.0 / 8388608.0)


@triton.jit
def box_muller(ra, rb):
    """Two standard normals (cos, sin) from two uint32 draws.

    Computed in fp64 and rounded to fp32 once, so every backend's log/cos/sin agree to ~1 ulp
    (fp32 transcendentals of different libraries drift apart by 3 ulp and more)."""
    u1 = ((ra >> 8) + 1).to(tl.float64) * (1.0 / 16777216.0)
    u2 = (rb >> 8).to(tl.float64) * (1.0 / 16777216.0)
    rad = tl.sqrt(-2.0 * tl.log(u1))
    theta = 6.283185307179586 * u2
    return (rad * tl.cos(theta)).to(tl.float32), (rad * tl.sin(theta)).to(tl.float32)


@triton.jit
def box_muller_groups(r0, r1, r2, r3):
    """The four normals of each group: [Q, 1] uint32 draws -> [Q, 4] fp32.

    Elements 0, 1 are (cos, sin) of ``box_muller(r0, r1)``, elements 2, 3 of ``box_muller(r2, r3)``.
    Both pairs are computed side by side as one [Q, 2] tensor and interleaved with join + reshape, so
    each pair is computed once by one thread. (Broadcasting [Q, 1] results over the 4 columns let
    Triton 3.6/3.7 recompute the fp64 math in each of the 4 threads that store a group: 4x the work,
    255 registers and spills on sm_90.)"""
    p = tl.arange(0, 2)[None, :]
    zc, zs = box_muller(tl.where(p == 0, r0, r2), tl.where(p == 0, r1, r3))
    return tl.reshape(tl.join(zc, zs), [zc.shape[0], 4])


@triton.jit
def select4(j, a, b, c, d):
    """Per column ``j`` in 0..3 pick a, b, c or d (broadcast)."""
    return tl.where(j == 0, a, tl.where(j == 1, b, tl.where(j == 2, c, d)))


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """fp32 ``x`` -> ``dtype`` rounded to nearest, ties to even: torch's ``x.to(dtype)`` for every fp32 input.

    bf16 is rounded by hand in integers, because the interpreter truncates a plain ``.to(tl.bfloat16)``:
    ``(b + 0x7FFF + lsb) >> 16`` on the bits ``b`` rounds every finite value and +-Inf correctly (a carry out
    of the mantissa raises the exponent; from the largest finite values it gives Inf, as torch does). A NaN
    with low bits set (a GPU's NaN is 0x7FFFFFFF) would carry into the sign (-0) or leave a zero mantissa
    (Inf), so a NaN first becomes the quiet NaN of its sign and upper payload with a zero low half, which
    rounds to itself. NaN payloads are unspecified (torch's CPU cast returns 0xFFFF, a GPU's cvt 0x7FFF):
    only "NaN stays NaN" is a contract. (Written as one select before the add: a select after it made
    ptxas spill on sm_80.) fp16 and fp32 use the plain conversion: round to nearest even on a GPU and in
    the interpreter (numpy)."""
    if dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = tl.where(x != x, (b | 0x400000) & 0xFFFF0000, b)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
