"""The fused batch kernel of :mod:`.augment` (CUDA, or the interpreter): box draw, crop, antialiased resize,
flip, normalisation, cast and any output layout in one launch, reading the ragged uint8 store directly.

Imported only by :func:`.augment.augment_triton` (Triton is imported with it).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .augment import AUG_DRAWS, CROP_RATIO, CROP_SCALE, CROP_TRIES
from .device import launch_guard
from .rng import cast_rtne, philox_group, select4

BLOCK = 256  # output pixels per program
_CONSTANTS: dict[torch.device, torch.Tensor] = {}


def constants(device: torch.device) -> torch.Tensor:
    """The kernel's fp64 constants on ``device``, made once per device (call before a CUDA-graph capture)."""
    device = torch.device(device)
    if device not in _CONSTANTS:
        lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        _CONSTANTS[device] = torch.tensor([CROP_SCALE[0], CROP_SCALE[1] - CROP_SCALE[0], lo, hi - lo, *CROP_RATIO],
                                          dtype=torch.float64, device=device)
    return _CONSTANTS[device]


@triton.jit
def _uniforms(key, stream, e):
    """fp64 uniforms in [0, 1) of elements ``e`` (int64) of the Philox stream (as ``augment.draw_uniforms``)."""
    r0, r1, r2, r3 = philox_group(key, e >> 2, stream)
    return (select4(e & 3, r0, r1, r2, r3) >> 8).to(tl.float64) * (1.0 / 16777216.0)


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _pick(v, lane, j):
    """Lane ``j`` of a vector as a scalar."""
    return tl.sum(tl.where(lane == j, v, 0.0))


@triton.jit
def _store(dst, v, scale, shift, mask, OUT_U8: tl.constexpr):
    """One channel: v in 0..255 rounded half up to uint8, or normalised (v * scale + shift) and cast."""
    if OUT_U8:
        tl.store(dst, tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 255.0).to(tl.uint8), mask=mask)
    else:
        tl.store(dst, cast_rtne(v * scale + shift, dst.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["stream"])  # the rank: 1 would otherwise become a constant of its own compile
def _augment_kernel(out_ptr, pix_ptr, off_ptr, shape_ptr, ids_ptr, key_ptr, box_ptr, const_ptr,
                    s_b, s_c, s_y, s_x, stream, size, resize,
                    sc0, sc1, sc2, sh0, sh1, sh2,
                    TRAIN: tl.constexpr, OUT_U8: tl.constexpr, WRITE_BOXES: tl.constexpr,
                    TRIES: tl.constexpr, DRAWS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, t): output pixels t*BLOCK .. of sample b, all three channels.

    out_ptr: [B, 3, size, size] with strides (s_b, s_c, s_y, s_x). pix_ptr / off_ptr / shape_ptr: the store
    (uint8 bytes, int64 offsets, int64 (H, W) pairs). ids_ptr: int64 [B] images of the batch. key_ptr: int64
    [1], the Philox key (TRAIN only). box_ptr: int32 [B, 5] (WRITE_BOXES only). stream: the Philox stream.
    const_ptr: fp64 [6] (area lo, area hi - lo, log ratio lo, log ratio hi - lo, ratio lo, ratio hi): fp64
    constants from memory, as a float literal in a kernel is rounded to fp32 first.
    size / resize: output side and the centre view's resize side. sc*/sh*: per-channel scale and shift.
    TRAIN: random-resized crop + flip (torchvision's rule, 10 tries vectorised over 16 lanes, fp64 as the
    PyTorch path) else the centre view. OUT_U8: round to uint8 instead of normalising.
    """
    b = tl.program_id(0)
    t = tl.program_id(1)
    img = tl.load(ids_ptr + b).to(tl.int64)
    off = tl.load(off_ptr + img)
    h = tl.load(shape_ptr + 2 * img)
    w = tl.load(shape_ptr + 2 * img + 1)
    hf = h.to(tl.float64)
    wf = w.to(tl.float64)
    if TRAIN:
        key = tl.load(key_ptr)
        area_lo = tl.load(const_ptr)
        area_span = tl.load(const_ptr + 1)
        log_lo = tl.load(const_ptr + 2)
        log_span = tl.load(const_ptr + 3)
        ratio_lo = tl.load(const_ptr + 4)
        ratio_hi = tl.load(const_ptr + 5)
        lane = tl.arange(0, 16)
        e0 = b.to(tl.int64) * DRAWS
        area = hf * wf * (area_lo + area_span * _uniforms(key, stream, e0 + lane))
        ratio = tl.exp(log_lo + log_span * _uniforms(key, stream, e0 + TRIES + lane))
        cw = _round_half_even(tl.sqrt(area * ratio))
        ch = _round_half_even(tl.sqrt(area / ratio))
        fits = (cw >= 1.0) & (cw <= wf) & (ch >= 1.0) & (ch <= hf) & (lane < TRIES)
        first = tl.min(tl.where(fits, lane, 16))
        found = first < TRIES
        u4 = _uniforms(key, stream, e0 + 2 * TRIES + tl.arange(0, 4))
        lane4 = tl.arange(0, 4)
        # no candidate fits: the centre crop of the whole image, its ratio clamped to the range
        fw = tl.where(wf / hf > ratio_hi, _round_half_even(hf * ratio_hi), wf)
        fh = tl.where(wf / hf < ratio_lo, _round_half_even(wf / ratio_lo), hf)
        bw = tl.where(found, _pick(cw, lane, first), fw)
        bh = tl.where(found, _pick(ch, lane, first), fh)
        top = tl.where(found, tl.floor(_pick(u4, lane4, 0) * (hf - bh + 1.0)), tl.floor((hf - bh) * 0.5))
        left = tl.where(found, tl.floor(_pick(u4, lane4, 1) * (wf - bw + 1.0)), tl.floor((wf - bw) * 0.5))
        flip = _pick(u4, lane4, 2) < 0.5
        if WRITE_BOXES:
            if t == 0:
                row = box_ptr + b * 5
                tl.store(row, top.to(tl.int32))
                tl.store(row + 1, left.to(tl.int32))
                tl.store(row + 2, bh.to(tl.int32))
                tl.store(row + 3, bw.to(tl.int32))
                tl.store(row + 4, flip.to(tl.int32))
        y_base = top.to(tl.float32)
        x_base = left.to(tl.float32)
        y_off = 0.0
        x_off = 0.0
        y_s = (bh / size).to(tl.float32)
        x_s = (bw / size).to(tl.float32)
        y_lo = top.to(tl.int32)
        x_lo = left.to(tl.int32)
        y_hi = (top + bh).to(tl.int32)
        x_hi = (left + bw).to(tl.int32)
    else:
        portrait = w <= h
        oh = tl.where(portrait, (resize * h) // w, resize)
        ow = tl.where(portrait, resize, (resize * w) // h)
        dy = oh - size
        dx = ow - size
        ky = dy // 2
        kx = dx // 2
        y_base = 0.0
        x_base = 0.0
        y_off = tl.where((dy % 2 == 1) & (ky % 2 == 1), ky + 1, ky).to(tl.float32)  # round half to even
        x_off = tl.where((dx % 2 == 1) & (kx % 2 == 1), kx + 1, kx).to(tl.float32)
        y_s = (hf / oh.to(tl.float64)).to(tl.float32)
        x_s = (wf / ow.to(tl.float64)).to(tl.float32)
        y_lo = 0
        x_lo = 0
        y_hi = h.to(tl.int32)
        x_hi = w.to(tl.int32)
    p = t * BLOCK + tl.arange(0, BLOCK)
    valid = p < size * size
    oy = p // size
    ox = p % size
    if TRAIN:
        ox = tl.where(flip, size - 1 - ox, ox)
    cy = y_base + (oy.to(tl.float32) + y_off + 0.5) * y_s
    cx = x_base + (ox.to(tl.float32) + x_off + 0.5) * x_s
    fy = tl.maximum(y_s, 1.0)
    fx = tl.maximum(x_s, 1.0)
    y0 = tl.maximum(tl.floor(cy - fy + 0.5).to(tl.int32), y_lo)
    x0 = tl.maximum(tl.floor(cx - fx + 0.5).to(tl.int32), x_lo)
    y1 = tl.minimum(tl.floor(cy + fy + 0.5).to(tl.int32), y_hi)
    x1 = tl.minimum(tl.floor(cx + fx + 0.5).to(tl.int32), x_hi)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    wsum = tl.zeros([BLOCK], dtype=tl.float32)
    ny = tl.floor(2.0 * fy).to(tl.int32) + 2
    nx = tl.floor(2.0 * fx).to(tl.int32) + 2
    for jy in range(0, ny):
        yy = y0 + jy
        wy = tl.where(yy < y1, tl.maximum(1.0 - tl.abs((yy.to(tl.float32) - cy + 0.5) / fy), 0.0), 0.0)
        row = yy.to(tl.int64) * w
        for jx in range(0, nx):
            xx = x0 + jx
            wx = tl.where(xx < x1, tl.maximum(1.0 - tl.abs((xx.to(tl.float32) - cx + 0.5) / fx), 0.0), 0.0)
            wgt = wy * wx
            m = valid & (wgt > 0.0)
            a = pix_ptr + off + (row + xx.to(tl.int64)) * 3
            acc0 += wgt * tl.load(a, mask=m, other=0).to(tl.float32)
            acc1 += wgt * tl.load(a + 1, mask=m, other=0).to(tl.float32)
            acc2 += wgt * tl.load(a + 2, mask=m, other=0).to(tl.float32)
            wsum += wgt
    wsum = tl.where(valid, wsum, 1.0)
    dst = out_ptr + b.to(tl.int64) * s_b + oy.to(tl.int64) * s_y + (p % size).to(tl.int64) * s_x
    _store(dst, acc0 / wsum, sc0, sh0, valid, OUT_U8)
    _store(dst + s_c, acc1 / wsum, sc1, sh1, valid, OUT_U8)
    _store(dst + 2 * s_c, acc2 / wsum, sc2, sh2, valid, OUT_U8)


def launch(out: torch.Tensor, pixels: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor, ids: torch.Tensor,
           key: torch.Tensor | None, stream: int, size: int, resize: int, scale: tuple[float, float, float],
           shift: tuple[float, float, float], boxes: torch.Tensor | None) -> torch.Tensor:
    """See :func:`.augment.augment_triton`."""
    n = len(ids)
    if n == 0:
        return out
    train = key is not None
    grid = (n, triton.cdiv(size * size, BLOCK))
    with launch_guard(out):  # Triton launches on the current device: the output's
        _augment_kernel[grid](
            out, pixels, offsets, shapes, ids, key if train else offsets, boxes if boxes is not None else ids,
            constants(out.device), *out.stride(), stream, size, resize, *(float(v) for v in scale),
            *(float(v) for v in shift), TRAIN=train, OUT_U8=out.dtype == torch.uint8,
            WRITE_BOXES=boxes is not None, TRIES=CROP_TRIES, DRAWS=AUG_DRAWS, BLOCK=BLOCK)
    return out


def aot_specs() -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, options) of every variant the launcher makes, in the form of
    :func:`.aot.specs` (compiled for sm_80 / sm_90 in this task: 55-66 registers, no spills, Triton 3.9)."""
    base = {"out_ptr": None, "pix_ptr": "*u8", "off_ptr": "*i64", "shape_ptr": "*i64", "ids_ptr": "*i64",
            "key_ptr": "*i64", "box_ptr": "*i32", "const_ptr": "*fp64", "s_b": "i64", "s_c": "i64", "s_y": "i64",
            "s_x": "i64", "stream": "i32", "size": "i32", "resize": "i32",
            **{k: "fp32" for k in ("sc0", "sc1", "sc2", "sh0", "sh1", "sh2")},
            **{k: "constexpr" for k in ("TRAIN", "OUT_U8", "WRITE_BOXES", "TRIES", "DRAWS", "BLOCK")}}
    out = []
    for dtype in ("fp32", "bf16", "fp16", "u8"):
        for train in (True, False):
            out.append((f"augment[{dtype},{'train' if train else 'centre'}]", _augment_kernel,
                        dict(base, out_ptr=f"*{dtype}"),
                        dict(TRAIN=train, OUT_U8=dtype == "u8", WRITE_BOXES=False, TRIES=CROP_TRIES, DRAWS=AUG_DRAWS,
                             BLOCK=BLOCK), {"num_warps": 4}))
    return out
