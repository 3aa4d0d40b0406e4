"""``make-data``: a generated image data set in an exact on-disk layout, for tests, benchmarks and a first try.

Each class has its own colour, shape (disc, square, triangle, bars, ring, cross), texture and background
tint; every image puts its class's shape at a random place, size and shade on a half-random background with
noise (and JPEG's), so the classes are learnable but not trivial. Sizes and aspect ratios are those of the
real data sets (``scale`` shrinks them for quick tests): Flower102 500 x 375..700 (portrait and landscape),
FGVC-Aircraft wide 1000..1400 x 1.3..1.8 : 1 (~1 MP), the ImageFolder tree CUB-200-like 500 x 333..500.
Everything is a function of the seed (one generator per image, seeded with (seed, split, class, index)), so
two runs write identical files.

Layouts (see ``ke_fast.data.LAYOUTS``): ``flower102`` (``jpg/`` + ``lists/trn.csv, val.csv, tst.csv``,
integer labels 1..C), ``aircraft`` (``images/`` + the same lists, variant names such as ``707-320`` as
labels), ``imagefolder`` (``train/``, ``val/``, ``test/``, one folder per class).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

KINDS = ("flower102", "aircraft", "imagefolder")
SPLITS = ("train", "val", "test")
# real FGVC-Aircraft variant names: their string order differs from any numeric one
AIRCRAFT_VARIANTS = ("707-320", "727-200", "737-200", "737-300", "747-100", "757-200", "767-200", "777-200",
                     "A300B4", "A310", "A318", "A320", "A330-200", "A340-300", "A380", "ATR-42", "BAE 146-200",
                     "CRJ-200", "DC-10", "DC-3", "DC-9-30", "Dash 8", "E-170", "F-16A/B", "Fokker 100", "MD-11")
SHAPES = ("disc", "square", "triangle", "bars", "ring", "cross")


def _size(kind: str, rng: np.random.Generator, scale: float) -> tuple[int, int]:
    """(width, height) of one image, as the real data set's."""
    if kind == "flower102":
        w, h = 500, int(rng.integers(375, 701))
        if rng.random() < 0.5:
            w, h = h, w
    elif kind == "aircraft":
        w = int(rng.integers(1000, 1401))
        h = int(w / rng.uniform(1.3, 1.8))
    else:
        w, h = 500, int(rng.integers(333, 501))
    return max(8, round(w * scale)), max(8, round(h * scale))


def _image(kind: str, label: int, classes: int, rng: np.random.Generator, scale: float):
    from PIL import Image, ImageDraw

    w, h = _size(kind, rng, scale)
    hue = label / classes
    colour = np.array([np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)]) * 100 + 140
    # the background: half the class's opposite hue, half random
    background = 0.5 * rng.integers(0, 256, 3) + 0.5 * (np.array([np.cos(2 * np.pi * (hue + 0.5 + k / 3))
                                                                   for k in range(3)]) * 100 + 128)
    pixels = np.broadcast_to(background, (h, w, 3)).astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels += 25 * np.sin(xx / (3 + label % 5) + yy / 7)[..., None]  # a class-dependent texture
    im = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    r = min(w, h) * rng.uniform(0.2, 0.4)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    fill = tuple(int(v) for v in (colour * rng.uniform(0.8, 1.2)).clip(0, 255))
    shape = SHAPES[label % len(SHAPES)]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "bars":
        for k in range(4):
            draw.rectangle((cx - r + k * r / 2, cy - r, cx - r + k * r / 2 + r / 4, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, int(r / 4)))
    else:
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=fill)
        draw.rectangle((cx - r / 4, cy - r, cx + r / 4, cy + r), fill=fill)
    noisy = np.asarray(im).astype(np.float64) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def _label_names(kind: str, classes: int) -> list[str]:
    if kind == "flower102":
        return [str(c + 1) for c in range(classes)]
    if kind == "aircraft":
        return [AIRCRAFT_VARIANTS[c] if c < len(AIRCRAFT_VARIANTS) else f"{AIRCRAFT_VARIANTS[c % 26]}-{c // 26}"
                for c in range(classes)]
    return [f"{c + 1:03d}.Class_{c + 1}" for c in range(classes)]


def make(kind: str, root: str | Path, classes: int = 5, per_class: int = 4, seed: int = 0, scale: float = 1.0
         ) -> Path:
    """Write a generated data set of ``kind`` into ``root`` (which must be absent or empty): ``per_class``
    images per class in each of the train, val and test splits. Returns ``root``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for name, v, lo in (("classes", classes, 2), ("per_class", per_class, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not 0 < scale <= 4:
        raise ValueError(f"scale must be in (0, 4], got {scale}")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{str(root)!r} exists and is not an empty folder; make-data writes a new data set")
    names = _label_names(kind, classes)
    image_dir = root / {"flower102": "jpg", "aircraft": "images"}.get(kind, "")
    number = 0
    for s, split in enumerate(SPLITS):
        rows = []
        for c in range(classes):
            for i in range(per_class):
                rng = np.random.default_rng([seed, s, c, i])
                number += 1
                if kind == "imagefolder":
                    path = root / split / names[c] / f"{names[c].split('.')[1]}_{i:04d}.jpg"
                else:
                    name = f"image_{number:05d}.jpg" if kind == "flower102" else f"{number + 34300:07d}.jpg"
                    path = image_dir / name
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(kind, c, classes, rng, scale).save(path, quality=90)
                rows.append((path.name, names[c]))
        if kind != "imagefolder":
            (root / "lists").mkdir(exist_ok=True)
            with open(root / "lists" / f"{('trn', 'val', 'tst')[s]}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["file_name", "label"])
                writer.writerows(rows)
    return root


def main(argv: list[str] | None = None) -> int:
    """``make-data KIND DIR [--classes C] [--per-class N] [--seed S] [--scale F]``; exit code 0, or 2 on bad
    arguments."""
    p = argparse.ArgumentParser(prog="python -m ke_fast make-data", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("dir")
    p.add_argument("--classes", type=int, default=5, help="number of classes (default 5)")
    p.add_argument("--per-class", type=int, default=4, help="images per class and split (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="image sides times this (default 1: realistic sizes)")
    args = p.parse_args(argv)
    try:
        make(args.kind, args.dir, args.classes, args.per_class, args.seed, args.scale)
    except ValueError as exc:
        print(f"make-data: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.kind} data set: {args.classes} classes x {args.per_class} images x 3 splits in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
