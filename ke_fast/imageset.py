"""Decoded images, once: the ragged uint8 store of a training split, the centre views of an evaluation split.

A training split keeps every image at its own aspect ratio, its shorter side brought down to ``short_side``
(never up; default ``2 * size``), as one ragged uint8 store (``ke_fast.kernels.augment``'s format): the
random-resized crop of each batch is taken from the whole image (``ke_fast.batches``). An evaluation split
keeps the official evaluation view as uint8 [N, 3, size, size]: ``Resize(256)`` + ``CenterCrop(224)`` in
the official ``data/custom_dataset.py`` (lines 23-28; training: ``RandomResizedCrop(224)`` +
``RandomHorizontalFlip()``, lines 15-21, both on the PIL image), here ``Resize(round(size * 256/224))`` +
``CenterCrop(size)`` with torchvision's rounding and PIL's antialiased bilinear. Every file is opened once (threads), its
header read before any pixel is decoded, and the result cached on disk (``<cache_dir>/<name>-<size>.pt``, a
store ``<name>-store<short side>.pt``; rebuilt when a file is added, removed or modified, or the decoding
changes).

Memory (3 bytes per stored pixel; the originals' sizes are typical values, not measured here). The training
split is a store; the validation and test splits are centre views (0.15 MB per image at 224):
===============  ===================  ======================  ===========  ===========  ==========  ==========
data set         typical original     images (train/val/test) train store  train store  eval views  every image
                                                              short 256    short 448    at 224      store 448
===============  ===================  ======================  ===========  ===========  ==========  ==========
Flower102        500 x 667            1,020 / 1,020 / 6,149   0.27 GB      0.82 GB      1.08 GB     6.6 GB
CUB-200-2011     500 x 375            5,994 / - / 5,794       1.57 GB      3.37 GB      0.87 GB     6.6 GB
FGVC-Aircraft    1400 x 950 (1-2 MP)  3,334 / 3,333 / 3,333   0.97 GB      2.96 GB      1.00 GB     8.9 GB
===============  ===================  ======================  ===========  ===========  ==========  ==========
(last column: every image of the data set as a 448 store, as metric learning's pooled splits keep them;
2.1 / 3.1 / 2.9 GB at 256; the originals themselves would take 8.2 / 6.6 / 40 GB.) The default short side,
``2 * size`` (448 at 224), keeps CUB's images as they are and Flower102's nearly so: the smallest crop (8 %
of the area) of a 448 x 597 image is ~127 x 127 pixels before its resize to 224, against ~72 x 72 from a
256 store, so small crops stay about as sharp as from the original files.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .kernels import augment as A

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224  # evaluation: shorter side to size * 256/224, centre crop size (the official transform)
SHORT_SIDE_RATIO = 2  # training store: shorter side at most 2 * size by default
CACHE_DIR = ".ke_fast_cache"
CACHE_VERSION = 2  # bump when the decoding changes: older cache files are rebuilt


class DataError(ValueError):
    """A data set that cannot be used (missing, empty, malformed); the CLI exits with code 2."""


def stored_size(size: int, train: bool) -> int:
    """The evaluation resize side ``round(size * 256/224)`` (``train``), else ``size`` (kept for callers that
    build square training images of that side for :meth:`ImageSet.from_tensors`)."""
    return round(size * RESIZE_RATIO) if train else size


def resize_side(size: int) -> int:
    """The shorter side of the evaluation resize: ``round(size * 256/224)`` (256 for 224)."""
    return round(size * RESIZE_RATIO)


def _resized(w: int, h: int, short: int) -> tuple[int, int]:
    """(w, h) with the shorter side at ``short`` and the longer ``floor(short * long / shorter)`` (torchvision)."""
    return (short, short * h // w) if w <= h else (short * w // h, short)


def _open(path: Path, where: str):
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ... by format
        raise DataError(f"{where}: image {str(path)!r} is unreadable ({type(exc).__name__}: {exc})") from None


def _pixels(path: Path, where: str, size: tuple[int, int], box: tuple[int, int, int, int] | None) -> bytes:
    """RGB bytes (H x W x 3) of an image resized to ``size`` (w, h) and cropped to ``box``. Grayscale,
    palette, CMYK, RGBA ... become RGB (as the official loader's ``convert('RGB')``)."""
    from PIL import Image

    try:
        with _open(path, where) as im:
            im = im.convert("RGB")
            if im.size != size:
                im = im.resize(size, Image.BILINEAR)  # antialiased when it shrinks, as torchvision on PIL
            if box is not None:
                im = im.crop(box)
            return im.tobytes()
    except DataError:
        raise
    except Exception as exc:  # a truncated or corrupt file fails here
        raise DataError(f"{where}: image {str(path)!r} is corrupt ({type(exc).__name__}: {exc})") from None


def _threads() -> int:
    return min(16, os.cpu_count() or 1)


class ImageSet(Dataset):
    """Decoded images of one split and their int64 ``labels`` [N].

    ``train``: a ragged store (``pixels``, ``offsets``, ``shapes``; shorter side at most ``short_side``)
    for the random-resized crop; ``images`` then renders the centre views from it (once, on first use).
    Otherwise ``images`` is uint8 [N, 3, size, size], the official evaluation view of each file. Indexing
    (``set[i]``) gives the normalised centre view of an image (no randomness).

    ``sources`` names where each file was listed (e.g. ``"lists/trn.csv row 3"``) for error messages.
    ``defer``: leave the decoding to :func:`decode_all` (so every split's headers are read before any split
    is decoded)."""

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], size: int, train: bool,
                 root: Path, cache_dir: Path | None, name: str, short_side: int | None = None,
                 sources: list[str] | None = None, defer: bool = False) -> None:
        if not files:
            raise DataError(f"{name}: no images")
        if short_side is not None and short_side < 1:
            raise ValueError(f"short_side must be >= 1, got {short_side}")
        self.files, self.classes, self.size, self.train, self.root = files, classes, size, train, root
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.sources = sources or [f"{name} split"] * len(files)
        self.resize = resize_side(size)
        self.short_side = (short_side or SHORT_SIDE_RATIO * size) if train else None
        side = self.short_side if train else size
        self._views: torch.Tensor | None = None
        self.pixels = self.offsets = self.shapes = None
        stats = [f.stat() for f in files]
        # identity of the contents for resume checks: names, labels and sizes (copying the data keeps it)
        self._fingerprint = "\n".join(f"{f.relative_to(root)}:{label}:{st.st_size}"
                                      for f, label, st in zip(files, labels, stats))
        self._key = hashlib.sha256(f"{CACHE_VERSION}:{train}:{side}:{self.resize}\n{self._fingerprint}\n".encode()
                                   + "\n".join(str(st.st_mtime_ns) for st in stats).encode()).hexdigest()
        # a split may be cached both ways (centre views, or a store when splits are pooled): two names
        stem = f"{name}-store{side}" if train else f"{name}-{side}"
        self.cache_file = cache_dir / f"{stem}.pt" if cache_dir is not None else None
        self.from_cache = self._load_cache()
        self._pending = not self.from_cache
        if self._pending and not defer:
            decode_all([self])

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor, size: int, train: bool) -> "ImageSet":
        """An ImageSet of images already decoded (e.g. synthetic data; no files, no cache): uint8 [N, 3, H, W],
        any H, W for a training set (each image becomes one of the store), H = W = ``size`` otherwise."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or \
                (not train and tuple(images.shape[2:]) != (size, size)):
            want = "[N, 3, H, W]" if train else f"[N, 3, {size}, {size}]"
            raise ValueError(f"images must be uint8 {want} for size {size} (train={train}), "
                             f"got {images.dtype} {list(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape [{len(images)}], got {list(labels.shape)}")
        self = cls.__new__(cls)
        self.files, self.sources, self.root, self.cache_file, self.from_cache = [], [], None, None, False
        self.size, self.train, self.resize, self._pending, self._views = size, train, resize_side(size), False, None
        self.labels = labels.to(torch.int64)
        self.classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
        self._fingerprint = hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).hexdigest()
        self.pixels = self.offsets = self.shapes = None
        if train:
            n, _, h, w = images.shape
            self.short_side = min(h, w)
            self.pixels = torch.cat([images.permute(0, 2, 3, 1).reshape(-1),
                                     torch.zeros(A.tail_bytes(w), dtype=torch.uint8)])
            self.offsets = torch.arange(n, dtype=torch.int64) * (3 * h * w)
            self.shapes = torch.tensor([[h, w]], dtype=torch.int64).expand(n, 2).contiguous()
        else:
            self.short_side, self._views = None, images
        return self

    # -- cache ----------------------------------------------------------------------------------------
    def _load_cache(self) -> bool:
        if self.cache_file is None or not self.cache_file.is_file():
            return False
        try:
            saved = torch.load(self.cache_file, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: rebuilt
            return False
        if not isinstance(saved, dict) or saved.get("key") != self._key:
            return False
        if self.train:
            self.pixels, self.offsets, self.shapes = saved["pixels"], saved["offsets"], saved["shapes"]
        else:
            self._views = saved["images"]
        return True

    def _save_cache(self) -> None:
        if self.cache_file is None:
            return
        tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
        data = dict(pixels=self.pixels, offsets=self.offsets, shapes=self.shapes) if self.train else \
            dict(images=self._views)
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(key=self._key, **data), tmp)
            os.replace(tmp, self.cache_file)
        except OSError as exc:  # a read-only data folder: the run goes on, decoding again next time
            warnings.warn(f"cannot write the image cache {str(self.cache_file)!r} ({exc}); images are decoded "
                          f"again on the next run", stacklevel=3)

    # -- decoding -------------------------------------------------------------------------------------
    def _scan(self) -> list[tuple[tuple[int, int], tuple[int, int, int, int] | None]]:
        """Every file's header (threads): the size (w, h) each is resized to and its crop box, or DataError."""
        def one(i: int):
            with _open(self.files[i], self.sources[i]) as im:
                w, h = im.size
            if self.train:
                return (_resized(w, h, self.short_side) if min(w, h) > self.short_side else (w, h)), None
            ow, oh = _resized(w, h, self.resize)
            top, left = round((oh - self.size) / 2), round((ow - self.size) / 2)  # half to even, as torchvision
            return (ow, oh), (left, top, left + self.size, top + self.size)

        with ThreadPoolExecutor(max_workers=_threads()) as pool:
            return list(pool.map(one, range(len(self.files))))

    def _decode(self, plan: list) -> None:
        if self.train:
            self.shapes = torch.tensor([[h, w] for (w, h), _ in plan], dtype=torch.int64)
            sizes = 3 * self.shapes[:, 0] * self.shapes[:, 1]
            self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
            self.pixels = torch.zeros(int(sizes.sum()) + A.tail_bytes(int(self.shapes[:, 1].max())),
                                      dtype=torch.uint8)
            out = [self.pixels[o:o + n] for o, n in zip(self.offsets.tolist(), sizes.tolist())]
        else:
            self._views = torch.empty(len(self.files), self.size, self.size, 3, dtype=torch.uint8)
            out = list(self._views.view(len(self.files), -1))

        def one(i: int) -> None:
            size, box = plan[i]
            out[i].copy_(torch.frombuffer(bytearray(_pixels(self.files[i], self.sources[i], size, box)),
                                          dtype=torch.uint8))

        with ThreadPoolExecutor(max_workers=_threads()) as pool:  # PIL releases the GIL while decoding
            for _ in pool.map(one, range(len(self.files))):
                pass
        if not self.train:
            self._views = self._views.permute(0, 3, 1, 2).contiguous()
        self._pending = False
        self._save_cache()

    # -- views ----------------------------------------------------------------------------------------
    @property
    def images(self) -> torch.Tensor:
        """uint8 [N, 3, size, size]: the centre views (a training set renders them from its store once)."""
        if self._views is None:  # in chunks: the floats of a whole split would take 4x its uint8 views
            self._views = torch.cat([A.to_uint8(self.centre_views(ids)) for ids in torch.arange(len(self)).split(256)])
        return self._views

    def centre_views(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 [len(ids), 3, size, size] in 0..255: the centre views of images ``ids`` (CPU)."""
        if not self.train:
            return self.images[ids].float()
        return A.centre_view(self.pixels, self.offsets, self.shapes, ids, self.size, self.resize,
                             int(self.shapes.max()), int(self.shapes[:, 1].max()))

    def fingerprint(self) -> str:
        """The files' relative names, labels and sizes, joined (see ke_fast.evolve.data_fingerprint)."""
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # a training set renders this one view (the same computation every time: data fingerprints sample
        # items), rounded like ``images`` (a batched render may differ by one level at a tie)
        v = self.images[i] if not self.train else A.to_uint8(self.centre_views(torch.tensor([int(i)])))[0]
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (v.float() / 255 - mean) / std, int(self.labels[i])


def decode_all(sets: list[ImageSet]) -> None:
    """Decode every set still pending: all headers first (a bad file stops everything before any decoding),
    then the pixels, then the cache files."""
    pending = [s for s in sets if s._pending]
    plans = [s._scan() for s in pending]
    for s, plan in zip(pending, plans):
        s._decode(plan)
