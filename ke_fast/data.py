"""Data: scikit-learn's bundled digits (no download) in KE's small-data regime, or real images.

Images come in two layouts (see the README): an ImageFolder tree (``train/`` and ``test/`` or ``val/``, one
folder per class) or the split-list layout of the official KE Flower102 / Aircraft loaders (an image folder
and CSV lists naming each split's files and labels). Either is decoded once into uint8 tensors, cached in
memory and on disk (``<root>/.ke_fast_cache``; rebuilt when a file is added, removed or modified), and handed
to the trainer as :class:`ImageSet`: the training set at ``round(size * 256 / 224)`` pixels square (shorter side
resized, centre square), from which ``ke_fast.batches`` cuts random-resized crops of ``size`` on the device;
the test set already resized and centre-cropped to ``size``.
"""
from __future__ import annotations

import csv
import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# sklearn's digits: the smallest class (digit 8) has 174 images, and every class keeps one for testing
DIGITS_MAX_PER_CLASS = 173
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224  # test images: shorter side to size * 256/224, centre crop size (the official recipe)
CACHE_DIR = ".ke_fast_cache"
CACHE_VERSION = 1  # bump when the decoding changes: older cache files are rebuilt
# the official split-list layout: (image folder, train list, test lists in order of preference)
SPLIT_LISTS = (("jpg", "train_all_sub_list.csv", ("test_all_sub_list.csv", "val_all_sub_list.csv")),  # Flower102
               ("images", "trn.csv", ("tst.csv", "val.csv")))  # Aircraft


class DataError(ValueError):
    """A data set that cannot be used (missing, empty, malformed); the CLI exits with code 2."""


def digits(per_class: int = 20, seed: int = 0) -> tuple[TensorDataset, TensorDataset, int, int]:
    """sklearn's 8x8 digits: ``per_class`` training images per class, the rest for testing.

    Returns (train, test, num_classes, in_channels); images are 1x8x8 floats in [0, 1]. Raises DataError
    unless every class keeps at least one test image (``per_class`` <= DIGITS_MAX_PER_CLASS)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    counts = torch.bincount(y)
    if not 1 <= per_class < int(counts.min()):
        raise DataError(f"per_class must be in 1 .. {int(counts.min()) - 1} (digit {int(counts.argmin())} has "
                        f"{int(counts.min())} images and keeps at least one for testing), got {per_class}")
    g = torch.Generator().manual_seed(seed)
    train_idx = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        train_idx.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    train = torch.cat(train_idx)
    test = torch.ones(len(y), dtype=torch.bool)
    test[train] = False
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), 10, 1


def stored_size(size: int, train: bool) -> int:
    """The side of the cached square images: ``size`` for test images (already centre-cropped), the resize
    side ``round(size * 256/224)`` for training images (the random-resized crop happens per batch)."""
    return round(size * RESIZE_RATIO) if train else size


def _decode(path: Path, size: int, crop: int) -> torch.Tensor:
    """One image as uint8 [3, crop, crop]: shorter side resized to ``size`` (bilinear, antialiased), centre crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale that is still >= size
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            left, top = (im.size[0] - crop) // 2, (im.size[1] - crop) // 2
            im = im.crop((left, top, left + crop, top + crop))
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error ... by format; truncated files too
        raise DataError(f"image {str(path)!r} is corrupt or no image ({type(exc).__name__}: {exc})") from None
    return x.view(crop, crop, 3).permute(2, 0, 1)


class ImageSet(Dataset):
    """Decoded images as one uint8 tensor ``images`` [N, 3, S, S] and int64 ``labels`` [N].

    ``train``: S is ``stored_size(size, True)`` and batches get the training recipe (random-resized crop to
    ``size``, horizontal flip; ``ke_fast.batches``); otherwise S is ``size`` (resized, centre-cropped). Either
    way batches are normalised with ImageNet's mean and std. Indexing (``set[i]``) gives the normalised,
    centre-cropped ``size`` view of an image without randomness (for fingerprints and inspection).

    Built by :func:`image_folder` / :func:`split_lists`, which decode each file once (threads) and keep the
    result in ``<cache_dir>/<name>-<S>.pt``: a later run loads that file unless a file was added, removed or
    modified since (size and modification time), or the decoding changed."""

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], size: int, train: bool,
                 root: Path, cache_dir: Path | None, name: str) -> None:
        if not files:
            raise DataError(f"{name}: no images")
        self.files, self.classes, self.size, self.train, self.root = files, classes, size, train, root
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.side = stored_size(size, train)
        stats = [f.stat() for f in files]
        # identity of the contents for resume checks: names, labels and sizes (copying the data keeps it)
        self._fingerprint = "\n".join(f"{f.relative_to(root)}:{label}:{st.st_size}"
                                      for f, label, st in zip(files, labels, stats))
        key = hashlib.sha256(f"{CACHE_VERSION}:{self.side}\n{self._fingerprint}\n".encode()
                             + "\n".join(str(st.st_mtime_ns) for st in stats).encode()).hexdigest()
        self.cache_file = cache_dir / f"{name}-{self.side}.pt" if cache_dir is not None else None
        self.images = self._load_cache(key)
        self.from_cache = self.images is not None
        if self.images is None:
            self.images = self._decode_all()
            self._save_cache(key)

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor, size: int, train: bool) -> "ImageSet":
        """An ImageSet of images already decoded: uint8 [N, 3, S, S] with S = ``stored_size(size, train)``
        (e.g. synthetic data); no files, no cache."""
        side = stored_size(size, train)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, side, side):
            raise ValueError(f"images must be uint8 [N, 3, {side}, {side}] for size {size} (train={train}), "
                             f"got {images.dtype} {list(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape [{len(images)}], got {list(labels.shape)}")
        self = cls.__new__(cls)
        self.files, self.root, self.cache_file, self.from_cache = [], None, None, False
        self.size, self.train, self.side = size, train, side
        self.images, self.labels = images, labels.to(torch.int64)
        self.classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
        self._fingerprint = hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).hexdigest()
        return self

    def _load_cache(self, key: str) -> torch.Tensor | None:
        if self.cache_file is None or not self.cache_file.is_file():
            return None
        try:
            saved = torch.load(self.cache_file, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: rebuilt below
            return None
        if not isinstance(saved, dict) or saved.get("key") != key:
            return None
        return saved["images"]

    def _decode_all(self) -> torch.Tensor:
        out = torch.empty(len(self.files), 3, self.side, self.side, dtype=torch.uint8)
        resize = self.side if self.train else round(self.size * RESIZE_RATIO)

        def one(i: int) -> None:
            out[i] = _decode(self.files[i], resize, self.side)

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
            for _ in pool.map(one, range(len(self.files))):
                pass
        return out

    def _save_cache(self, key: str) -> None:
        if self.cache_file is None:
            return
        tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(key=key, images=self.images), tmp)
            os.replace(tmp, self.cache_file)
        except OSError as exc:  # a read-only data folder: the run goes on, decoding again next time
            warnings.warn(f"cannot write the image cache {str(self.cache_file)!r} ({exc}); images are decoded "
                          f"again on the next run", stacklevel=3)

    def fingerprint(self) -> str:
        """The files' relative names, labels and sizes, joined (see ke_fast.evolve.data_fingerprint)."""
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.train:  # the centre ``size`` crop of the stored square
            o = (self.side - self.size) // 2
            x = x[:, o:o + self.size, o:o + self.size]
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x.float() / 255 - mean) / std, int(self.labels[i])


def _folder_samples(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of ``root/<class>/<file>`` (torchvision's ImageFolder layout)."""
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")) if (root / c).is_dir() else ():
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(i)
    if not files:
        raise DataError(f"data folder {str(root)!r} holds no images in <class>/<file> layout")
    return files, labels, classes


def _cache_dir(root: Path, cache: bool) -> Path | None:
    return root / CACHE_DIR if cache else None


def image_folder(root: str | Path, size: int = 224, cache: bool = True) -> tuple[ImageSet, ImageSet, int, int]:
    """``root/train`` and ``root/test`` (or ``val``) folders, one sub-folder per class; (train, test,
    num_classes, 3). ``cache``: keep the decoded images in ``root/.ke_fast_cache``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"data folder {str(root)!r} must hold train/ and test/ (or val/) in ImageFolder layout, "
                        f"or the split-list layout (see the README)")
    files, labels, classes = _folder_samples(root / "train")
    test_files, test_labels, test_classes = _folder_samples(test_dir)
    if test_classes != classes:
        raise DataError(f"train and test folders of {str(root)!r} have different classes")
    return (ImageSet(files, labels, classes, size, True, root, _cache_dir(root, cache), "train"),
            ImageSet(test_files, test_labels, classes, size, False, root, _cache_dir(root, cache), test_dir.name),
            len(classes), 3)


def _read_list(path: Path, images: Path) -> list[tuple[Path, str]]:
    """(image path, label) rows of a split list: a CSV with the columns ``file_name`` and ``label``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file_name", "label"} <= set(reader.fieldnames):
            raise DataError(f"split list {str(path)!r} must be a CSV with the columns file_name and label, "
                            f"got {reader.fieldnames}")
        rows = [(images / r["file_name"], r["label"].strip()) for r in reader]
    if not rows:
        raise DataError(f"split list {str(path)!r} names no images")
    missing = next((p for p, _ in rows if not p.is_file()), None)
    if missing is not None:
        raise DataError(f"split list {str(path)!r} names {str(missing)!r}, which does not exist")
    return rows


def split_lists(root: str | Path, size: int = 224, cache: bool = True) -> tuple[ImageSet, ImageSet, int, int]:
    """The official KE split-list layout: ``root/jpg/`` with ``root/lists/train_all_sub_list.csv`` and
    ``test_all_sub_list.csv`` (Flower102; ``val_all_sub_list.csv`` when there is no test list), or
    ``root/images/`` with ``root/lists/trn.csv`` and ``tst.csv`` (``val.csv``) (Aircraft). Each list is a CSV
    with the columns ``file_name`` (relative to the image folder) and ``label``; the training list's sorted
    labels (numerically when all are integers) are the classes 0 .. C-1. (train, test, num_classes, 3)."""
    root = Path(root)
    for image_dir, train_name, test_names in SPLIT_LISTS:
        lists = root / "lists"
        if (root / image_dir).is_dir() and (lists / train_name).is_file():
            test_list = next((lists / n for n in test_names if (lists / n).is_file()), None)
            if test_list is None:
                raise DataError(f"{str(lists)!r} holds {train_name} but none of {', '.join(test_names)}")
            break
    else:
        raise DataError(f"data folder {str(root)!r} is in neither layout: expected train/ and test/ (ImageFolder) "
                        f"or jpg/ + lists/train_all_sub_list.csv or images/ + lists/trn.csv (split lists)")
    train_rows = _read_list(lists / train_name, root / image_dir)
    test_rows = _read_list(test_list, root / image_dir)
    names = {label for _, label in train_rows}
    classes = sorted(names, key=int) if all(n.lstrip("-").isdigit() for n in names) else sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    unknown = next((label for _, label in test_rows if label not in index), None)
    if unknown is not None:
        raise DataError(f"split list {str(test_list)!r} has label {unknown!r}, which the training list lacks")
    cache_dir = _cache_dir(root, cache)
    return (ImageSet([p for p, _ in train_rows], [index[c] for _, c in train_rows], classes, size, True, root,
                     cache_dir, "train"),
            ImageSet([p for p, _ in test_rows], [index[c] for _, c in test_rows], classes, size, False, root,
                     cache_dir, test_list.stem),
            len(classes), 3)


def images(root: str | Path, size: int = 224, cache: bool = True) -> tuple[ImageSet, ImageSet, int, int]:
    """An image data set in either layout: ImageFolder (``train/``) or the official split lists (``lists/``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist")
    if (root / "lists").is_dir() and not (root / "train").is_dir():
        return split_lists(root, size, cache)
    return image_folder(root, size, cache)


DIABETES_TEST = 88  # samples held out for testing (a fifth of the 442, rounded down)


def diabetes(seed: int = 0) -> tuple[TensorDataset, TensorDataset, int, int]:
    """scikit-learn's bundled diabetes regression data (442 samples, 10 features, no download): a seeded split
    into 354 training and DIABETES_TEST test samples, features and target standardised with the training
    samples' mean and standard deviation only (the test samples are never looked at).

    Returns (train, test, num_targets, num_features) = (..., 1, 10): float32 features [N, 10] and one target
    per sample [N] (disease progression after a year, standardised: an RMSE of 1.0 is the training spread)."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    x = torch.tensor(d.data, dtype=torch.float64)
    y = torch.tensor(d.target, dtype=torch.float64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[DIABETES_TEST:], order[:DIABETES_TEST]
    mean, std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()

    def standardised(idx: torch.Tensor) -> TensorDataset:
        return TensorDataset(((x[idx] - mean) / std).float(), ((y[idx] - y_mean) / y_std).float())

    return standardised(train), standardised(test), 1, x.shape[1]
