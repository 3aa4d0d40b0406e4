"""Data: scikit-learn's bundled digits (no download) in KE's small-data regime, or real images.

Image data sets come in the layouts the official KE code reads (github.com/ahmdtaha/knowledge_evolution,
``data/flower.py``, ``data/aircraft.py``, ``data/custom_dataset.py``) and in torchvision's ImageFolder tree
(:data:`LAYOUTS` draws them). :func:`load` finds the layout and returns an :class:`ImageData`: the training,
validation (None when the layout has none) and test splits as :class:`ke_fast.imageset.ImageSet`, decoded
once and cached (see that module for the stores, the evaluation view and their memory).
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .imageset import (CACHE_DIR, CACHE_VERSION, IMAGENET_MEAN, IMAGENET_STD, RESIZE_RATIO, DataError, ImageSet,
                       decode_all, resize_side, stored_size)

__all__ = ["CACHE_DIR", "CACHE_VERSION", "DIGITS_MAX_PER_CLASS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES",
           "LAYOUTS", "RESIZE_RATIO", "DataError", "ImageData", "ImageSet", "digits", "image_folder", "images",
           "load", "resize_side", "split_lists", "stored_size"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# sklearn's digits: the smallest class (digit 8) has 174 images, and every class keeps one for testing
DIGITS_MAX_PER_CLASS = 173
# The official split lists (data/flower.py lines 16-36, data/aircraft.py lines 15-33: pd.read_csv of
# lists/trn.csv, tst.csv, val.csv, labels mapped through np.sort(np.unique(training labels))): an image folder
# and lists/ with CSV files of the columns file_name (relative to the image folder) and label, one per split.
# Flower102 used the *_all_sub_list.csv names until the clean-up of January 2021 (commit cd9459e); both are read.
SPLIT_LISTS = {
    "flower102": ("jpg", (("trn.csv", "val.csv", "tst.csv"),
                          ("train_all_sub_list.csv", "val_all_sub_list.csv", "test_all_sub_list.csv"))),
    "aircraft": ("images", (("trn.csv", "val.csv", "tst.csv"),)),
}
LAYOUTS = """\
  flower102/                   Flower102, official split lists      aircraft/        FGVC-Aircraft, official lists
    jpg/                         image_00001.jpg ...                  images/          0034309.jpg ...
    lists/                                                            lists/
      trn.csv    file_name,label  (or train_all_sub_list.csv,           trn.csv        file_name,label
      val.csv                      val_all_sub_list.csv,                val.csv        (optional)
      tst.csv                      test_all_sub_list.csv)               tst.csv
  cub200/                      ImageFolder: one folder per class (classes: the sorted folder names)
    train/
      001.Black_footed_Albatross/   Black_Footed_Albatross_0001_796111.jpg ...
      002.Laysan_Albatross/ ...
    val/                       (optional when test/ exists; the test split when it does not)
    test/                      the same class folders"""


class ImageData(NamedTuple):
    """What :func:`load` returns: the splits, the number of classes and of input channels (3)."""
    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    num_classes: int
    in_channels: int


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as (images [1797, 8, 8] in 0..16, labels [1797]), the values and order of
    ``sklearn.datasets.load_digits()``: read from the CSV that scikit-learn installs (64 pixel columns then
    the label), without importing scikit-learn (1.5-2 s of a short run's start); ``load_digits`` where the
    file is not found."""
    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None or spec.origin is None else \
        Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def digits(per_class: int = 20, seed: int = 0) -> tuple[TensorDataset, TensorDataset, int, int]:
    """scikit-learn's 8x8 digits (:func:`digits_arrays`): ``per_class`` training images per class, the rest
    for testing.

    Returns (train, test, num_classes, in_channels); images are 1x8x8 floats in [0, 1]. Raises DataError
    unless every class keeps at least one test image (``per_class`` <= DIGITS_MAX_PER_CLASS)."""
    images, labels = digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(labels, dtype=torch.int64)
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


def _open_sets(specs: list[tuple], size: int, root: Path, cache: bool, short_side: int | None,
               pooled: bool) -> list[ImageSet | None]:
    """ImageSets of (name, files, labels, classes, sources, train) specs (None passes through); every
    split's headers are read before any split is decoded."""
    sets = [None if spec is None else
            ImageSet(spec[1], spec[2], spec[3], size, spec[5] or pooled, root, _cache_dir(root, cache), spec[0],
                     short_side=short_side, sources=spec[4], defer=True) for spec in specs]
    decode_all([s for s in sets if s is not None])
    return sets


def image_folder(root: str | Path, size: int = 224, cache: bool = True, short_side: int | None = None,
                 pooled: bool = False) -> ImageData:
    """``root/train`` with ``root/test`` and/or ``root/val``, one sub-folder per class (classes: the sorted
    folder names, the same in every split). The test split is ``test/``, else ``val/``; the validation split
    is ``val/`` when ``test/`` exists too. See :func:`load` for the other arguments."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"data folder {str(root)!r} matches no layout; expected one of:\n{LAYOUTS}")
    val_dir = root / "val" if test_dir.name == "test" and (root / "val").is_dir() else None
    files, labels, classes = _folder_samples(root / "train")
    specs: list = [("train", files, labels, classes, None, True)]
    for d in (val_dir, test_dir):
        if d is None:
            specs.append(None)
            continue
        f, lab, other = _folder_samples(d)
        if other != classes:
            raise DataError(f"{str(d)!r} has the classes {other}, {str(root / 'train')!r} has {classes}")
        specs.append((d.name, f, lab, classes, None, False))
    train, val, test = _open_sets(specs, size, root, cache, short_side, pooled)
    return ImageData(train, val, test, len(classes), 3)


def _read_list(path: Path, images: Path) -> list[tuple[Path, str, str]]:
    """(image path, label, "where") rows of a split list: a CSV with the columns ``file_name`` and ``label``
    (others ignored). Raises DataError naming the file and the row of the first problem."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            names = [n.strip() for n in reader.fieldnames or []]
            if not {"file_name", "label"} <= set(names):
                raise DataError(f"split list {str(path)!r} row 1 (the header) must name the columns file_name and "
                                f"label, got {names}")
            reader.fieldnames = names
            rows = []
            for r in reader:
                where = f"{str(path)!r} row {len(rows) + 1} (line {reader.line_num})"
                name, label = (r.get("file_name") or "").strip(), (r.get("label") or "").strip()
                if not name or not label:
                    raise DataError(f"split list {where}: empty file_name or label")
                rows.append((images / name, label, where))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"split list {str(path)!r} is unreadable ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise DataError(f"split list {str(path)!r} names no images")
    for p, _, where in rows:
        if not p.is_file():
            raise DataError(f"split list {where} names {str(p)!r}, which does not exist")
    return rows


def _class_key(labels: set[str]):
    """Sort and identity of labels as the official pandas + np.unique reading gives them: numbers when all
    labels are integers (so "10" follows "2" and "02" is "2"), else strings."""
    if all(label.lstrip("+-").isdigit() for label in labels):
        return int
    return str


def split_lists(root: str | Path, size: int = 224, cache: bool = True, short_side: int | None = None,
                pooled: bool = False) -> ImageData:
    """The official split-list layouts (:data:`LAYOUTS`): Flower102 (``jpg/``) or Aircraft (``images/``) with
    ``lists/trn.csv``, ``tst.csv`` and, when present, ``val.csv`` (Flower102 also under the older names
    ``train_all_sub_list.csv``, ``test_all_sub_list.csv``, ``val_all_sub_list.csv``). Labels map through the
    training list's sorted unique labels to 0 .. C-1 (numerically when all are integers; strings such as
    ``707-320`` otherwise), as the official loaders do. Without a test list the validation list is the test
    split (and val None). Every list is checked (columns, rows, files, labels) before any image is read."""
    root = Path(root)
    found = None
    for image_dir, namings in SPLIT_LISTS.values():
        for names in namings:
            if (root / image_dir).is_dir() and (root / "lists" / names[0]).is_file():
                found = (root / image_dir, [root / "lists" / n for n in names])
                break
        if found:
            break
    if found is None:
        raise DataError(f"data folder {str(root)!r} matches no layout; expected one of:\n{LAYOUTS}")
    image_dir, (train_list, val_list, test_list) = found
    if not test_list.is_file():
        test_list, val_list = val_list, None
        if not test_list.is_file():
            raise DataError(f"{str(root / 'lists')!r} holds {train_list.name} but no {test_list.name} nor "
                            f"{found[1][2].name}")
    elif not val_list.is_file():
        val_list = None
    train_rows = _read_list(train_list, image_dir)
    other_rows = [None if p is None else _read_list(p, image_dir) for p in (val_list, test_list)]
    key = _class_key({label for _, label, _ in train_rows})
    classes = sorted({key(label) for _, label, _ in train_rows})
    index = {c: i for i, c in enumerate(classes)}
    for rows in other_rows:
        for _, label, where in rows or ():
            try:
                known = key(label) in index
            except ValueError:  # a string label where the training labels are integers
                known = False
            if not known:
                raise DataError(f"split list {where} has label {label!r}, which {str(train_list)!r} lacks")
    names = [str(c) for c in classes]
    specs = [None if rows is None else
             (path.stem if i else "train", [p for p, _, _ in rows], [index[key(lab)] for _, lab, _ in rows], names,
              [w for _, _, w in rows], i == 0)
             for i, (path, rows) in enumerate(zip((train_list, val_list, test_list), [train_rows, *other_rows]))]
    train, val, test = _open_sets(specs, size, root, cache, short_side, pooled)
    return ImageData(train, val, test, len(classes), 3)


def load(root: str | Path, size: int = 224, cache: bool = True, short_side: int | None = None,
         pooled: bool = False) -> ImageData:
    """An image data set in any layout of :data:`LAYOUTS`: the split lists when ``root/lists/`` exists and
    ``root/train/`` does not, else an ImageFolder tree.

    Args:
        root: the data folder.
        size: the side of the network's input (crops and centre views are ``size`` x ``size``).
        cache: keep the decoded images in ``root/.ke_fast_cache`` (a read-only folder: a warning, no cache).
        short_side: the training store's shorter side (images larger are resized down, never up); default
            ``2 * size``.
        pooled: every split keeps the ragged training store (for splits that are pooled and re-split by
            class, as metric learning does: any image may then be trained on with the full augmentation;
            the centre views of such a split are rendered from its store).
    Returns:
        :class:`ImageData` (train, val or None, test, num_classes, 3). Raises DataError (one line naming the
        file and row) for a missing file, an unknown label, an empty list, a list without the columns, an
        unreadable image, before any image is decoded; for a folder in no layout, the layouts drawn as trees.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist")
    if (root / "lists").is_dir() and not (root / "train").is_dir():
        return split_lists(root, size, cache, short_side, pooled)
    return image_folder(root, size, cache, short_side, pooled)


def images(root: str | Path, size: int = 224, cache: bool = True) -> tuple[ImageSet, ImageSet, int, int]:
    """(train, test, num_classes, 3) of :func:`load` (the validation split left out): the form the CLI reads."""
    data = load(root, size, cache)
    return data.train, data.test, data.num_classes, data.in_channels


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
