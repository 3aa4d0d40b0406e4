"""The paper's augmentation (ke_fast.kernels.augment): crop boxes against torchvision's RandomResizedCrop rule
written out from its formula, the batched PyTorch path against PIL (the resampler torchvision uses on PIL
images), the fused Triton kernel (interpreter on CPU, CUDA when present) against the PyTorch path.

Tolerances (0..255 pixel units unless said):
* PyTorch path vs PIL crop + resize (BILINEAR, antialiased): max 1.0, mean 0.5 (PIL rounds to uint8 after
  each of its two passes and keeps 22-bit fixed-point weights; the PyTorch path stays in fp32 throughout).
* PyTorch path vs the documented filter evaluated in fp64: within 2e-3 (fp32 weights and sums, images up to
  300 px).
* Triton vs PyTorch path: boxes identical; fp32 values within 1e-3 (fp32 centres and weights vs fp64 ones,
  another summation order); bf16 within one bf16 rounding; uint8 within 1 level (a value at .5 may round
  either way).
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ke_fast.kernels import augment as A

from conftest import HAS_CUDA

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _image(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients plus seeded noise (H x W x 3 uint8): resampling errors show on both."""
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.random.default_rng(seed)
    return np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)),
                     g.integers(0, 256, (h, w))], -1).astype(np.uint8)


def _store(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64)
    sizes = 3 * shapes[:, 0] * shapes[:, 1]
    tail = torch.zeros(A.tail_bytes(int(shapes[:, 1].max())), dtype=torch.uint8)
    pixels = torch.cat([*(torch.from_numpy(a.copy()).reshape(-1) for a in arrays), tail])
    return pixels, sizes.cumsum(0) - sizes, shapes


def _torchvision_get_params(h: int, w: int, u: list[float]) -> tuple[int, int, int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params (scale (0.08, 1), ratio (3/4, 4/3)) written out
    from its source, its random numbers taken from ``u`` (the 24 draws of one sample)."""
    area = h * w
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for i in range(10):
        target_area = area * (0.08 + (1.0 - 0.08) * u[i])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[10 + i])
        cw = int(round(math.sqrt(target_area * aspect_ratio)))
        ch = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return math.floor(u[20] * (h - ch + 1)), math.floor(u[21] * (w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif in_ratio > 4 / 3:
        ch, cw = h, int(round(h * (4 / 3)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


# ---- crop boxes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (120, 900), (37, 41), (10, 200)])
def test_boxes_are_torchvisions_rule_draw_for_draw(shape):
    """The same uniforms through the batched rule and through torchvision's loop give the same boxes, the
    fallback included ((120, 900) falls back sometimes, (10, 200) always)."""
    n = 2000
    u = A.draw_uniforms(7, 0, n)
    boxes = A.random_boxes(u, torch.tensor([shape]).expand(n, 2))
    expected = [_torchvision_get_params(*shape, row) for row in u.tolist()]
    assert boxes[:, :4].tolist() == [list(e) for e in expected]
    h, w = shape
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= h).all()
                and (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= w).all())
    assert 0.45 < float(boxes[:, 4].float().mean()) < 0.55  # flips: half


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    grid = torch.cat([a, b]).unique()
    cdf = [torch.searchsorted(x.sort().values.contiguous(), grid, right=True) / len(x) for x in (a, b)]
    return float((cdf[0] - cdf[1]).abs().max())


@pytest.mark.parametrize("shape", [(500, 500), (300, 700)])
def test_box_distribution_matches_the_rule(shape):
    """Area fraction, aspect ratio and position of 10000 boxes against 10000 of torchvision's rule driven by
    Python's own generator: two-sample Kolmogorov-Smirnov distance below 0.03 (the 1e-5 level at this n is
    0.027), fallback rates within 2 %."""
    n, (h, w) = 10000, shape
    boxes = A.random_boxes(A.draw_uniforms(123, 0, n), torch.tensor([shape]).expand(n, 2)).double()
    rng = random.Random(0)
    ref = torch.tensor([_torchvision_get_params(h, w, [rng.random() for _ in range(24)]) for _ in range(n)],
                       dtype=torch.float64)
    for got, want in ((boxes[:, 2] * boxes[:, 3] / (h * w), ref[:, 2] * ref[:, 3] / (h * w)),
                      (boxes[:, 3] / boxes[:, 2], ref[:, 3] / ref[:, 2]),
                      ((boxes[:, 1] + boxes[:, 3] / 2) / w, (ref[:, 1] + ref[:, 3] / 2) / w),
                      ((boxes[:, 0] + boxes[:, 2] / 2) / h, (ref[:, 0] + ref[:, 2] / 2) / h)):
        assert _ks(got, want) < 0.03
    whole = (boxes[:, 2:4] == torch.tensor(shape)).all(1).float().mean()
    assert abs(float(whole) - float((ref[:, 2:4] == torch.tensor(shape)).all(1).float().mean())) < 0.02


def test_fallback_when_no_try_fits():
    """A 10 x 200 image: no candidate (area >= 160 px) fits 10 rows at aspect <= 4/3, so every box is the centre
    crop with the ratio clamped: height 10, width round(10 * 4/3) = 13; a tall one likewise."""
    boxes = A.random_boxes(A.draw_uniforms(1, 0, 50), torch.tensor([[10, 200]]).expand(50, 2))
    assert boxes[:, :4].unique(dim=0).tolist() == [[0, 93, 10, 13]]
    boxes = A.random_boxes(A.draw_uniforms(1, 0, 50), torch.tensor([[200, 10]]).expand(50, 2))
    assert boxes[:, :4].unique(dim=0).tolist() == [[93, 0, 13, 10]]


def test_wide_image_yields_crops_outside_its_centre_square():
    """The crop is drawn over the whole image: a 64 x 256 image with red left and blue right quarters shows
    red or blue in many training views (a crop from the centre 64 x 64 square never would)."""
    img = np.zeros((64, 256, 3), np.uint8)
    img[:, :64, 0] = 255
    img[:, 64:192, 1] = 255
    img[:, 192:, 2] = 255
    pixels, offsets, shapes = _store([img])
    n = 64
    out = A.random_resized_crop(pixels, offsets, shapes, torch.zeros(n, dtype=torch.int64), 5, 0, 16, 256, 256)
    red, blue = (out[:, 0] > 128).flatten(1).any(1), (out[:, 2] > 128).flatten(1).any(1)
    assert int(red.sum()) > n // 8 and int(blue.sum()) > n // 8
    boxes = A.random_boxes(A.draw_uniforms(5, 0, 1000), torch.tensor([[64, 256]]).expand(1000, 2))
    outside = (boxes[:, 1] < 96) | (boxes[:, 1] + boxes[:, 3] > 160)
    assert float(outside.float().mean()) > 0.5


# ---- resampling against PIL -------------------------------------------------------------------------

ARRAYS = [_image(50, 37, 0), _image(23, 61, 1), _image(300, 200, 2), _image(17, 17, 3), _image(9, 40, 4)]
# the interpreter runs a program's taps one by one: smaller images (still up- and downsampling) keep it quick
SMALL = [_image(50, 37, 0), _image(23, 61, 1), _image(45, 30, 2), _image(17, 17, 3), _image(9, 40, 4)]


def _pil_train_view(a: np.ndarray, box: list[int], size: int) -> torch.Tensor:
    from PIL import Image

    top, left, h, w, flip = box
    im = Image.fromarray(a).crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()


def _pil_centre_view(a: np.ndarray, size: int, resize: int) -> torch.Tensor:
    """torchvision's Resize(resize) + CenterCrop(size) on a PIL image, from their formulas."""
    from PIL import Image

    h, w = a.shape[:2]
    ow, oh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    im = Image.fromarray(a).resize((ow, oh), Image.BILINEAR)
    top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
    return torch.from_numpy(np.asarray(im.crop((left, top, left + size, top + size))).copy()).permute(2, 0, 1).float()


def _train_views(impl: str, arrays: list[np.ndarray], ids: torch.Tensor, key: int, size: int) -> torch.Tensor:
    """Training views (0..255 floats) by the PyTorch path or by the Triton kernel (interpreter on CPU)."""
    pixels, offsets, shapes = _store(arrays)
    side, width = int(shapes.max()), int(shapes[:, 1].max())
    if impl == "torch":
        return A.random_resized_crop(pixels, offsets, shapes, ids, key, 0, size, side, width)
    device = DEVICES[-1]
    out = torch.empty(len(ids), 3, size, size, device=device)
    t = [x.to(device) for x in (pixels, offsets, shapes, ids)]
    return A.augment_triton(out, *t, torch.tensor([key], device=device), 0, size, size, (1.0,) * 3, (0.0,) * 3).cpu()


@pytest.mark.parametrize("impl,size", [("torch", 16), ("torch", 23), ("triton", 13)])
def test_train_views_match_pil(impl, size):
    """Random-resized crops (up- and downsampling, up to ~12x, flips) against PIL's crop + resize + mirror; the
    kernel on smaller images (the interpreter runs its taps one by one)."""
    arrays = ARRAYS if impl == "torch" else SMALL
    ids = torch.tensor([0, 1, 2, 3, 4, 2, 2, 0])
    out = _train_views(impl, arrays, ids, 99, size)
    boxes = A.random_boxes(A.draw_uniforms(99, 0, len(ids)), _store(arrays)[2][ids])
    ref = torch.stack([_pil_train_view(arrays[i], b, size) for i, b in zip(ids.tolist(), boxes.tolist())])
    diff = (out - ref).abs()
    assert float(diff.max()) <= 1.0 + 1e-3 and float(diff.mean()) < 0.5, (float(diff.max()), float(diff.mean()))


def _filter64(n: int, size: int, base: float, offset: float, s: float, lo: int, hi: int) -> torch.Tensor:
    """fp64 [size, n]: the module docstring's resampling weights of one axis, pixel by pixel."""
    f = max(s, 1.0)
    c = base + (torch.arange(size, dtype=torch.float64)[:, None] + offset + 0.5) * s
    t = torch.arange(n, dtype=torch.float64)[None]
    taps = (t >= torch.floor(c - f + 0.5).clamp(min=lo)) & (t < torch.floor(c + f + 0.5).clamp(max=hi))
    m = (1 - (t - c + 0.5).abs() / f).clamp(min=0) * taps
    return m / m.sum(1, keepdim=True)


def test_cpu_path_is_the_documented_filter():
    """The CPU path against the docstring's filter written out in fp64:
    training views (crop, then resize; up- and downsampling up to ~13x; flips) and centre views (resize the
    whole image, then crop)."""
    pixels, offsets, shapes = _store(ARRAYS)
    ids, size = torch.tensor([0, 1, 2, 3, 4, 2, 2, 0, 2]), 23
    out = A.random_resized_crop(pixels, offsets, shapes, ids, 41, 0, size, 300, 300)
    boxes = A.random_boxes(A.draw_uniforms(41, 0, len(ids)), shapes[ids])
    assert boxes[:, 4].any() and not boxes[:, 4].all()
    for v, i, (top, left, h, w, flip) in zip(out, ids.tolist(), boxes.tolist()):
        img = torch.from_numpy(ARRAYS[i]).double().permute(2, 0, 1)
        ref = (_filter64(img.shape[1], size, top, 0, h / size, top, top + h) @ img
               @ _filter64(img.shape[2], size, left, 0, w / size, left, left + w).T)
        assert float((v - (ref.flip(-1) if flip else ref)).abs().max()) < 2e-3
    resize = round(size * 256 / 224)
    out = A.centre_view(pixels, offsets, shapes, torch.arange(len(ARRAYS)), size, resize, 300, 300)
    for v, a in zip(out, ARRAYS):
        img, (h, w) = torch.from_numpy(a).double().permute(2, 0, 1), a.shape[:2]
        oh, ow = (resize * h // w, resize) if w <= h else (resize, resize * w // h)  # torchvision's Resize
        top, left = round((oh - size) / 2), round((ow - size) / 2)  # CenterCrop (half to even)
        ref = _filter64(h, size, 0, top, h / oh, 0, h) @ img @ _filter64(w, size, 0, left, w / ow, 0, w).T
        assert float((v - ref).abs().max()) < 2e-3


@pytest.mark.parametrize("size", [16, 21])
def test_centre_views_match_the_official_eval_transform(size):
    pixels, offsets, shapes = _store(ARRAYS)
    resize = round(size * 256 / 224)
    ids = torch.arange(len(ARRAYS))
    out = A.centre_view(pixels, offsets, shapes, ids, size, resize, 300, 300)
    ref = torch.stack([_pil_centre_view(a, size, resize) for a in ARRAYS])
    diff = (out - ref).abs()
    assert float(diff.max()) <= 1.0 + 1e-3 and float(diff.mean()) < 0.5, (float(diff.max()), float(diff.mean()))


# ---- the fused kernel -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                 (torch.bfloat16, False), (torch.float16, True)])
def test_triton_kernel_matches_the_pytorch_path(device, dtype, channels_last):
    """One launch (under the interpreter on CPU) against the PyTorch path: same boxes, same normalised views in
    any dtype and memory format."""
    pixels, offsets, shapes = _store(SMALL)
    ids = torch.tensor([2, 0, 4, 1, 3])
    size, key, stream = 13, 2024, 1
    scale, shift = (1 / 58.4, 1 / 57.1, 1 / 57.4), (-2.1, -2.0, -1.8)
    ref = A.random_resized_crop(pixels, offsets, shapes, ids, key, stream, size, 61, 50)
    ref = ref * torch.tensor(scale).view(1, 3, 1, 1) + torch.tensor(shift).view(1, 3, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(len(ids), 3, size, size, dtype=dtype, device=device, memory_format=fmt)
    boxes = torch.zeros(len(ids), 5, dtype=torch.int32, device=device)
    t = [x.to(device) for x in (pixels, offsets, shapes, ids)]
    A.augment_triton(out, *t, torch.tensor([key], device=device), stream, size, 15, scale, shift, boxes)
    expected = A.random_boxes(A.draw_uniforms(key, stream, len(ids)), shapes[ids])
    assert torch.equal(boxes.cpu().long(), expected)
    tol = 1e-3 / 57 if dtype == torch.float32 else 2 ** -7 * 2.2
    assert torch.allclose(out.float().cpu(), ref, atol=tol, rtol=0 if dtype == torch.float32 else 2 ** -7)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_centre_views_to_uint8(device):
    pixels, offsets, shapes = _store(SMALL)
    ids = torch.tensor([4, 3, 2, 1, 0, 2])
    size, resize = 11, 13
    ref = A.to_uint8(A.centre_view(pixels, offsets, shapes, ids, size, resize, 61, 50))
    out = torch.empty(len(ids), 3, size, size, dtype=torch.uint8, device=device)
    t = [x.to(device) for x in (pixels, offsets, shapes, ids)]
    A.augment_triton(out, *t, None, 0, size, resize, (1.0,) * 3, (0.0,) * 3)
    assert int((out.cpu().int() - ref.int()).abs().max()) <= 1


def test_store_is_checked():
    pixels, offsets, shapes = _store(ARRAYS)
    A.check_store(pixels, offsets, shapes)
    with pytest.raises(ValueError, match="the images and the tail need"):
        A.check_store(pixels[:-5], offsets, shapes)
    with pytest.raises(ValueError, match="uint8"):
        A.check_store(pixels.float(), offsets, shapes)
    with pytest.raises(ValueError, match="shapes must be int64"):
        A.check_store(pixels, offsets, shapes[:2])


def test_aot_specs_name_every_kernel_argument():
    """The ahead-of-time specs (for kernels/aot.py's sm_80 / sm_90 compile) cover each kernel parameter."""
    pytest.importorskip("triton")
    from ke_fast.kernels import augment_triton as T

    specs = T.aot_specs()
    params = [p for p in T._augment_kernel.arg_names]
    assert len(specs) == 8 and all(list(sig) == params for _, _, sig, _, _ in specs)
