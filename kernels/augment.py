"""The paper's image augmentation from a ragged uint8 store: random-resized crop, flip, and the centre view.

**Store format** (shared by every implementation): ``pixels`` uint8 [T] holds every image's H x W x 3 bytes
(row-major, RGB interleaved) at ``offsets`` int64 [N]; ``shapes`` int64 [N, 2] holds (H, W). After the last
image ``pixels`` keeps at least ``3 * max W`` spare bytes (:func:`tail_bytes`), so a row window of the CPU
path never runs past its end. Images keep their own aspect ratio.

**Training view** (torchvision's ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip``, its
``get_params`` rule computed on the stored image): up to CROP_TRIES candidates (area fraction uniform in
CROP_SCALE, aspect ratio log-uniform in CROP_RATIO, sides rounded half to even); the first that fits is taken
at a uniform integer position; if none fits, the centre crop of the whole image with its ratio clamped to
CROP_RATIO. The box is resampled to ``size`` x ``size`` (below) and mirrored with probability 1/2.
Draws: Philox4x32-10 (:mod:`.reference`) with key ``key`` (the batch's seed), stream ``stream`` and
element ``AUG_DRAWS * i + j`` for sample ``i`` of the batch: j 0..9 the areas, 10..19 the ratios, 20 the
top, 21 the left, 22 the flip; uniform = (r >> 8) * 2^-24. So a batch's boxes are a function of (key,
stream, position in the batch) only.

**Centre view** (the official evaluation transform ``Resize(resize)`` + ``CenterCrop(size)``; resize =
round(size * 256/224)): shorter side to ``resize`` (longer side ``floor(resize * long / short)``), then the
centre ``size`` square (offsets rounded half to even), as torchvision computes them.

**Resampling** (PIL's and torch's antialiased bilinear, ``antialias=True``): per axis, output pixel X of a
view whose source origin is ``base``, output offset ``o`` and scale ``s`` (source pixels per output pixel)
has centre ``c = base + (X + o + 0.5) * s`` and support ``f = max(s, 1)``; its taps are the source pixels
t in [max(floor(c - f + 0.5), lo), min(floor(c + f + 0.5), hi)) with weights max(0, 1 - |t - c + 0.5| / f),
normalised to sum 1; [lo, hi) is the crop box (training: torchvision crops, then resizes) or the whole
image (centre view: resize, then crop). The 2-d filter is the product of the two axes' filters.

Implementations: the batched PyTorch path here (any device; used on CPU) and one Triton kernel on CUDA
(:mod:`.augment_triton`, launched by :func:`augment_triton`) that also normalises, casts and writes any
memory format. No per-sample Python work and no host reads of tensor values in either.
"""
from __future__ import annotations

import math

import torch

from . import reference

CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults: area fraction and aspect ratio range
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
AUG_DRAWS = 24  # Philox draws per sample (23 used; a multiple of 4 keeps each sample's groups its own)
# bytes of float temporaries per chunk of samples in the CPU path (at least one sample: ~12 MB at 224 px from a
# 448 px store). Small chunks are reused from the heap; chunks over 32 MB are mmapped and page-faulted afresh by
# glibc each time: 64 MB chunks took about twice as long (same results, bit for bit)
_GATHER_BUDGET = 1 << 22


def tail_bytes(max_width: int) -> int:
    """Spare bytes a store keeps after its last image (see the module docstring)."""
    return 3 * max_width


def check_store(pixels: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor) -> None:
    """Raise ValueError unless (pixels, offsets, shapes) is a store in the module's format (reads the tensors:
    call once, when a store is built, not per batch)."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 1:
        raise ValueError(f"pixels must be a 1-d uint8 tensor, got {pixels.dtype} {list(pixels.shape)}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1:
        raise ValueError(f"offsets must be a 1-d int64 tensor, got {offsets.dtype} {list(offsets.shape)}")
    if shapes.dtype != torch.int64 or tuple(shapes.shape) != (len(offsets), 2):
        raise ValueError(f"shapes must be int64 [{len(offsets)}, 2], got {shapes.dtype} {list(shapes.shape)}")
    if len(offsets) and (int(shapes.min()) < 1 or int(offsets.min()) < 0):
        raise ValueError("every image needs a height and width >= 1 and an offset >= 0")
    if len(offsets):
        end = int((offsets + 3 * shapes[:, 0] * shapes[:, 1]).max()) + tail_bytes(int(shapes[:, 1].max()))
        if pixels.numel() < end:
            raise ValueError(f"pixels holds {pixels.numel()} bytes; the images and the tail need {end}")


def draw_uniforms(key: int, stream: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp64 [count, AUG_DRAWS] uniforms in [0, 1) of samples 0 .. count-1 (see the module docstring)."""
    q = torch.arange(count * AUG_DRAWS // 4, device=device, dtype=torch.int64)
    r = reference.philox4x32(q, key, stream).reshape(count, AUG_DRAWS)
    return (r >> 8).to(torch.float64) * (1.0 / (1 << 24))


def random_boxes(u: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for every sample at once, plus the flip.

    Args:
        u: fp64 [B, AUG_DRAWS] uniforms (:func:`draw_uniforms`).
        shapes: int64 [B, 2] (H, W) of the images.
    Returns:
        int64 [B, 5]: top, left, height, width of the box, and 1 where the view is mirrored.
    """
    h, w = shapes[:, 0:1].to(torch.float64), shapes[:, 1:2].to(torch.float64)
    target = h * w * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, :CROP_TRIES])
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(lo + (hi - lo) * u[:, CROP_TRIES:2 * CROP_TRIES])
    cw, ch = torch.round(torch.sqrt(target * ratio)), torch.round(torch.sqrt(target / ratio))  # half to even
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    tries = torch.arange(CROP_TRIES, device=u.device)
    first = torch.where(fits, tries, CROP_TRIES).amin(1, keepdim=True)
    found = first < CROP_TRIES
    pick = first.clamp(max=CROP_TRIES - 1)
    cw, ch = cw.gather(1, pick), ch.gather(1, pick)
    # no candidate fits: the centre crop of the whole image, its aspect ratio clamped to CROP_RATIO
    wide, tall = w / h > CROP_RATIO[1], w / h < CROP_RATIO[0]
    fw = torch.where(wide, torch.round(h * CROP_RATIO[1]), w)
    fh = torch.where(tall, torch.round(w / CROP_RATIO[0]), h)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    top = torch.where(found, torch.floor(u[:, 20:21] * (h - ch + 1)), torch.floor((h - ch) / 2))
    left = torch.where(found, torch.floor(u[:, 21:22] * (w - cw + 1)), torch.floor((w - cw) / 2))
    flip = (u[:, 22:23] < 0.5).to(torch.float64)
    return torch.cat([top, left, ch, cw, flip], 1).to(torch.int64)


def train_axes(boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) sampling parameters fp64 [B, 5] = (base, output offset, scale, lo, hi) of crop boxes."""
    b = boxes.to(torch.float64)
    zero = torch.zeros_like(b[:, 0])
    y = torch.stack([b[:, 0], zero, b[:, 2] / size, b[:, 0], b[:, 0] + b[:, 2]], 1)
    x = torch.stack([b[:, 1], zero, b[:, 3] / size, b[:, 1], b[:, 1] + b[:, 3]], 1)
    return y, x


def _half_even_half(d: torch.Tensor) -> torch.Tensor:
    """round(d / 2) half to even for integer-valued d >= 0 (Python's round on torchvision's crop offset)."""
    k = torch.div(d, 2, rounding_mode="floor")
    return torch.where((d % 2 == 1) & (k % 2 == 1), k + 1, k)


def centre_axes(shapes: torch.Tensor, size: int, resize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) sampling parameters of the centre view (``Resize(resize)`` + ``CenterCrop(size)``)."""
    h, w = shapes[:, 0], shapes[:, 1]
    portrait = w <= h
    oh = torch.where(portrait, torch.div(resize * h, w, rounding_mode="floor"), torch.full_like(h, resize))
    ow = torch.where(portrait, torch.full_like(w, resize), torch.div(resize * w, h, rounding_mode="floor"))
    top, left = _half_even_half(oh - size), _half_even_half(ow - size)
    zero = torch.zeros_like(h, dtype=torch.float64)
    hf, wf = h.to(torch.float64), w.to(torch.float64)
    y = torch.stack([zero, top.to(torch.float64), hf / oh, zero, hf], 1)
    x = torch.stack([zero, left.to(torch.float64), wf / ow, zero, wf], 1)
    return y, x


def max_taps(max_side: int, size: int) -> int:
    """An upper bound of the taps per output pixel and axis for images of sides <= ``max_side``."""
    return math.floor(2 * max(1.0, max_side / size)) + 2


def taps(axis: torch.Tensor, size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First tap int64 [B, size] and normalised weights fp32 [B, size, k] of every output pixel of an axis."""
    base, o, s, lo, hi = axis.unbind(1)
    c = base[:, None] + (torch.arange(size, device=axis.device, dtype=torch.float64) + o[:, None] + 0.5) * s[:, None]
    f = s.clamp(min=1.0)[:, None]
    first = torch.maximum(torch.floor(c - f + 0.5), lo[:, None])
    end = torch.minimum(torch.floor(c + f + 0.5), hi[:, None])
    t = first[..., None] + torch.arange(k, device=axis.device, dtype=torch.float64)
    wt = (1 - ((t - c[..., None] + 0.5) / f[..., None]).abs()).clamp(min=0) * (t < end[..., None])
    return first.to(torch.int64), (wt / wt.sum(-1, keepdim=True)).to(torch.float32)


def resample(pixels: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor, ids: torch.Tensor,
             y: torch.Tensor, x: torch.Tensor, flip: torch.Tensor | None, size: int, max_side: int,
             max_width: int) -> torch.Tensor:
    """The views ``(y, x)`` (fp64 [B, 5] each) of images ``ids`` as fp32 [B, 3, size, size] in 0..255.

    Batched PyTorch: the vertical pass a weighted sum over at most :func:`max_taps` uint8 rows (each row window
    gathered from a strided view of the store), the horizontal pass a product with each sample's dense
    weight matrix; ``max_side`` / ``max_width`` are bounds over the whole store, so no tensor value
    is read on the host. ``flip`` (bool [B]) mirrors views horizontally. Samples go in chunks that bound the
    float temporaries to about 4 MB (one sample at least)."""
    k = max_taps(max_side, size)
    window = 3 * max_width  # bytes of a row of the vertical pass: any box or whole image fits
    rows = pixels.unfold(0, window, 1)
    out = torch.empty(len(ids), 3, size, size, dtype=torch.float32, device=pixels.device)
    chunk = max(1, _GATHER_BUDGET // (4 * size * k * max(window, 3 * size)))
    for s in range(0, len(ids), chunk):
        sl = slice(s, s + chunk)
        idx = ids[sl]
        n, off, hw = len(idx), offsets[idx], shapes[idx]
        ys, wy = taps(y[sl], size, k)
        xs, wx = taps(x[sl], size, k)
        if flip is not None:
            mirrored = flip[sl, None]
            xs, wx = torch.where(mirrored, xs.flip(1), xs), torch.where(mirrored[..., None], wx.flip(1), wx)
        # vertical: rows ys + j (clamped into the image; their weight is 0 past the view) from column lo_x on
        r = (ys[..., None] + torch.arange(k, device=ids.device)).minimum(hw[:, 0, None, None] - 1)
        start = off[:, None, None] + (r * hw[:, 1, None, None] + x[sl, 3].to(torch.int64)[:, None, None]) * 3
        v = rows.index_select(0, start.reshape(-1)).view(n, size, k, window).to(torch.float32)
        v = torch.matmul(wy[:, :, None, :], v).view(n, size, max_width, 3)
        # horizontal: the k weights of each output column scattered into a dense [size, max_width] matrix per
        # sample, one batched matrix product (faster on CPUs than gathering k-pixel windows)
        cols = xs - x[sl, 3].to(torch.int64)[:, None]
        dense = wx.new_zeros(n, size, max_width + k).scatter_(2, cols[..., None] + torch.arange(k, device=ids.device),
                                                              wx)[..., :max_width]
        v = torch.bmm(dense, v.permute(0, 2, 1, 3).reshape(n, max_width, size * 3))
        out[sl] = v.view(n, size, size, 3).permute(0, 3, 2, 1)
    return out


def random_resized_crop(pixels: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor, ids: torch.Tensor,
                        key: int, stream: int, size: int, max_side: int, max_width: int) -> torch.Tensor:
    """Training views of images ``ids`` (batched PyTorch): fp32 [B, 3, size, size] in 0..255."""
    u = draw_uniforms(key, stream, len(ids), ids.device)
    boxes = random_boxes(u, shapes[ids])
    y, x = train_axes(boxes, size)
    return resample(pixels, offsets, shapes, ids, y, x, boxes[:, 4] == 1, size, max_side, max_width)


def centre_view(pixels: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor, ids: torch.Tensor, size: int,
                resize: int, max_side: int, max_width: int) -> torch.Tensor:
    """Centre views of images ``ids`` (batched PyTorch): fp32 [B, 3, size, size] in 0..255."""
    y, x = centre_axes(shapes[ids], size, resize)
    return resample(pixels, offsets, shapes, ids, y, x, None, size, max_side, max_width)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """0..255 floats to uint8, rounding half up (as the Triton kernel does)."""
    return torch.floor(x + 0.5).clamp(0, 255).to(torch.uint8)


def augment_triton(out: torch.Tensor, pixels: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor,
                   ids: torch.Tensor, key: torch.Tensor | None, stream: int, size: int, resize: int,
                   scale: tuple[float, float, float], shift: tuple[float, float, float],
                   boxes: torch.Tensor | None = None) -> torch.Tensor:
    """One launch: the views of images ``ids`` into ``out`` [B, 3, size, size] (any strides: channels_last
    too; fp32 / fp16 / bf16 values ``v * scale[c] + shift[c]`` for v in 0..255, or uint8 v).

    ``key``: int64 [1] tensor on the device holding the batch's Philox key: training views (random-resized
    crop and flip); None: centre views (``resize`` then centre ``size``). ``boxes``: optional int32 [B, 5]
    that receives (top, left, height, width, flip) of each training view. Arguments are not checked here:
    the caller (``ke_fast.batches``) builds them."""
    from .augment_triton import launch

    return launch(out, pixels, offsets, shapes, ids, key, stream, size, resize, scale, shift, boxes)
