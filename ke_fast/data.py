"""Demo data: scikit-learn's bundled digits (no download) in KE's small-data regime, or an image folder."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# sklearn's digits: the smallest class (digit 8) has 174 images, and every class keeps one for testing
DIGITS_MAX_PER_CLASS = 173


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


class ImageFolder(Dataset):
    """Images in ``root/<class>/<file>`` (torchvision's ImageFolder layout), resized to ``size``x``size``.

    Opening checks every file's header (PIL ``verify``), so a file that is no image fails here, by name,
    not in the middle of training; one that decodes wrongly later raises DataError naming it too."""

    def __init__(self, root: str | Path, size: int = 64) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder {str(self.root)!r} does not exist")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples = [(f, i) for i, c in enumerate(self.classes) for f in sorted((self.root / c).rglob("*"))
                        if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise DataError(f"data folder {str(self.root)!r} holds no images in <class>/<file> layout")
        self.size = size
        from PIL import Image

        for path, _ in self.samples:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error ... by format
                raise DataError(f"image {str(path)!r} is corrupt or no image ({type(exc).__name__}: {exc})") from None

    def fingerprint(self) -> str:
        """The class and file names and file sizes, joined (see ke_fast.evolve.data_fingerprint): no decoding."""
        return "\n".join(f"{f.relative_to(self.root)}:{label}:{f.stat().st_size}" for f, label in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.size, self.size))
                x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except Exception as exc:  # e.g. a truncated JPEG, whose header verify() accepted
            raise DataError(f"image {str(path)!r} cannot be decoded ({type(exc).__name__}: {exc})") from None
        return x.view(self.size, self.size, 3).permute(2, 0, 1).float() / 255.0, label


def image_folder(root: str | Path, size: int = 64) -> tuple[Dataset, Dataset, int, int]:
    """``root/train`` and ``root/test`` (or ``val``) folders; (train, test, num_classes, 3)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"data folder {str(root)!r} must hold train/ and test/ (or val/) in ImageFolder layout")
    train, test = ImageFolder(root / "train", size), ImageFolder(test_dir, size)
    if train.classes != test.classes:
        raise DataError(f"train and test folders of {str(root)!r} have different classes")
    return train, test, len(train.classes), 3
