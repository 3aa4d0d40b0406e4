"""Real images on the CPU (ke_fast.data, ke_fast.imageset, ke_fast.synth): the official layouts (Flower102 with
its current and older list names, Aircraft with string labels, ImageFolder trees) and their bad inputs, colour
modes, the image cache (reuse, invalidation, a read-only folder), the make-data generator; and through the
loop: bit-identical resume after a crash mid-epoch with augmentation on, the --checkpoint-every rule, one host
read of the loss per epoch, and a tiny image folder end to end through the CLI. Every image is drawn from a
seeded generator (no hash(): string hashes change per process)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ke_fast import cli, synth
from ke_fast import evolve as E
from ke_fast.batches import Batches
from ke_fast.data import CACHE_DIR, LAYOUTS, DataError, ImageSet, digits, image_folder, images, load, split_lists
from ke_fast.evolve import Config, Evolution, load_checkpoint
from ke_fast.models import build_model

CPU = torch.device("cpu")


def _png(path: Path, seed: int, size: tuple[int, int] = (20, 14), mode: str = "RGB") -> np.ndarray:
    """A seeded random image of ``size`` (w, h) saved at ``path``; returns its RGB pixels."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return pixels


def _folder(root: Path, classes=("a", "b"), train=6, test=2) -> Path:
    for s, (split, n) in enumerate((("train", train), ("test", test))):
        for ci, c in enumerate(classes):
            for i in range(n):
                _png(root / split / c / f"{i}.png", seed=1000 * s + 100 * ci + i, size=(20 + i, 14 + 2 * ci))
    return root


def _lists(root: Path, image_dir: str, rows: dict[str, list[tuple[str, object]]], files: int = 6) -> Path:
    for i in range(1, files + 1):
        _png(root / image_dir / f"{i}.jpg", seed=i, size=(16 + i, 30 - i))
    (root / "lists").mkdir(parents=True, exist_ok=True)
    for name, items in rows.items():
        (root / "lists" / name).write_text("file_name,label\n" + "".join(f"{f},{c}\n" for f, c in items))
    return root


def _model(classes: int = 2) -> torch.nn.Module:
    return build_model("small_cnn", num_classes=classes, in_channels=3, width=4)


# ---- the official layouts -------------------------------------------------------------------------

FLOWER = {"trn.csv": [("1.jpg", 10), ("2.jpg", 2), ("3.jpg", 10), ("4.jpg", 2)],
          "val.csv": [("5.jpg", 2)], "tst.csv": [("5.jpg", 10), ("6.jpg", 2)]}


def test_flower102_layout(tmp_path):
    """jpg/ + lists/trn.csv, val.csv, tst.csv (file_name, label): labels sorted numerically, a validation split,
    the test list's cache named after it; the training split stores whole images (aspect kept)."""
    root = _lists(tmp_path / "flower102", "jpg", FLOWER)
    data = load(root, size=16)
    assert data.num_classes == 2 and data.in_channels == 3 and data.train.classes == ["2", "10"]  # 2 < 10
    assert data.train.labels.tolist() == [1, 0, 1, 0] and data.test.labels.tolist() == [1, 0]
    assert data.val is not None and data.val.labels.tolist() == [0] and data.val.images.shape == (1, 3, 16, 16)
    assert data.test.cache_file.name == "tst-16.pt" and data.val.cache_file.name == "val-16.pt"
    assert data.train.shapes.tolist() == [[29, 17], [28, 18], [27, 19], [26, 20]]  # (h, w) of 1..4.jpg, < 32
    train, test, classes, channels = images(root, size=16)  # the CLI's form: no validation split
    assert (classes, channels, len(train), len(test)) == (2, 3, 4, 2)


def test_flower102_older_list_names(tmp_path):
    rows = {"train_all_sub_list.csv": FLOWER["trn.csv"], "test_all_sub_list.csv": FLOWER["tst.csv"]}
    data = split_lists(_lists(tmp_path / "flower102", "jpg", rows), size=16)
    assert data.val is None and len(data.test) == 2 and data.test.cache_file.name == "test_all_sub_list-16.pt"


def test_aircraft_layout_with_string_labels(tmp_path):
    """images/ + lists/*.csv; variant names as labels, sorted as strings; no tst.csv: val.csv is the test."""
    rows = {"trn.csv": [("1.jpg", "A300B4"), ("2.jpg", "707-320"), ("3.jpg", "DC-3"), ("4.jpg", "707-320")],
            "val.csv": [("5.jpg", "DC-3"), ("6.jpg", "A300B4")]}
    data = load(_lists(tmp_path / "aircraft", "images", rows), size=16)
    assert data.train.classes == ["707-320", "A300B4", "DC-3"]
    assert data.train.labels.tolist() == [1, 0, 2, 0] and data.test.labels.tolist() == [2, 1] and data.val is None


def test_image_folder_with_val_and_test(tmp_path):
    root = _folder(tmp_path / "data")
    for ci, c in enumerate(("a", "b")):
        _png(root / "val" / c / "v.png", seed=50 + ci)
    data = image_folder(root, size=16)
    assert len(data.train) == 12 and len(data.val) == 2 and len(data.test) == 4
    (root / "test").rename(tmp_path / "elsewhere")
    data = image_folder(root, size=16)
    assert data.val is None and len(data.test) == 2  # val/ alone is the test split


def test_colour_modes_become_rgb(tmp_path):
    """Grayscale, palette, CMYK, RGBA and LA files decode to RGB exactly as PIL's convert('RGB') (the official
    loader's), in the training store and in the evaluation views."""
    from PIL import Image

    modes = ("L", "P", "CMYK", "RGBA", "LA", "RGB")
    for i, mode in enumerate(modes):
        ext = "jpg" if mode == "CMYK" else "png"  # PNG cannot hold CMYK
        _png(tmp_path / "d" / "train" / "c" / f"{i}.{ext}", seed=i, size=(9, 7), mode=mode)
        _png(tmp_path / "d" / "test" / "c" / f"{i}.{ext}", seed=i, size=(16, 16), mode=mode)
    data = image_folder(tmp_path / "d", size=16)
    for i, f in enumerate(data.train.files):
        want = np.asarray(Image.open(f).convert("RGB"))
        o = int(data.train.offsets[i])
        got = data.train.pixels[o:o + want.size].numpy().reshape(want.shape)
        assert np.array_equal(got, want), modes[i]
    for i, f in enumerate(data.test.files):
        want = np.asarray(Image.open(f).convert("RGB").resize((18, 18), Image.BILINEAR).crop((1, 1, 17, 17)))
        assert np.array_equal(data.test.images[i].permute(1, 2, 0).numpy(), want), modes[i]


# ---- bad input: one line naming the file and the row, before any decoding ---------------------------

def _bad(root: Path, name: str, text: str) -> None:
    (root / "lists" / name).write_text(text)


@pytest.mark.parametrize("name,text,match", [
    ("tst.csv", "file_name,label\n6.jpg,7\n", r"tst.csv' row 1 \(line 2\) has label '7'"),
    ("tst.csv", "file_name,label\n6.jpg,2\nmissing.jpg,2\n", r"tst.csv' row 2 \(line 3\) names .*missing.jpg"),
    ("val.csv", "file_name,label\n", r"val.csv' names no images"),
    ("tst.csv", "name,class\n6.jpg,2\n", r"tst.csv' row 1 \(the header\) must name the columns file_name"),
    ("trn.csv", "file_name,label\n1.jpg,\n", r"trn.csv' row 1 \(line 2\): empty file_name or label"),
])
def test_bad_lists(tmp_path, name, text, match):
    root = _lists(tmp_path / "flower102", "jpg", FLOWER)
    _bad(root, name, text)
    with pytest.raises(DataError, match=match) as err:
        load(root, size=16)
    assert "\n" not in str(err.value)
    assert not (root / CACHE_DIR).exists()  # nothing decoded


def test_unreadable_image_is_named_before_any_decoding(tmp_path):
    """A test image that is no image stops the load with its list and row, before the training split (whose
    files are fine) is decoded: no cache file is written."""
    root = _lists(tmp_path / "flower102", "jpg", FLOWER)
    (root / "jpg" / "6.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"tst.csv' row 2 \(line 3\): image .*6.jpg' is unreadable"):
        load(root, size=16)
    assert not (root / CACHE_DIR).exists()
    _png(root / "jpg" / "6.jpg", seed=6)
    (root / "jpg" / "5.jpg").write_bytes((root / "jpg" / "5.jpg").read_bytes()[:60])  # truncated JPEG
    with pytest.raises(DataError, match=r"5.jpg' is (corrupt|unreadable)"):
        load(root, size=16)


def test_cli_exits_2_on_a_bad_list(tmp_path, capsys):
    root = _lists(tmp_path / "flower102", "jpg", FLOWER)
    _bad(root, "tst.csv", "file_name,label\nnope.jpg,2\n")
    assert cli.main(["run", "--dataset", str(root), "--image-size", "16", "--device", "cpu", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "tst.csv' row 1 (line 2) names" in err and "nope.jpg" in err, err
    assert not (tmp_path / "run").exists()


def test_folder_in_no_layout_shows_the_layouts_as_trees(tmp_path):
    (tmp_path / "stuff" / "lists").mkdir(parents=True)
    for root in (tmp_path / "stuff", tmp_path / "stuff" / "lists"):
        with pytest.raises(DataError, match="matches no layout") as err:
            load(root, size=16)
        for line in ("jpg/", "images/", "lists/", "trn.csv", "tst.csv", "train_all_sub_list.csv", "train/", "test/"):
            assert line in str(err.value), line
    assert LAYOUTS in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nowhere")


# ---- the image cache ----------------------------------------------------------------------------

def test_image_cache_is_reused_and_invalidated(tmp_path):
    root = _folder(tmp_path / "data")
    train, _, test, classes, channels = image_folder(root, size=16)
    assert (classes, channels, len(train), len(test)) == (2, 3, 12, 4)
    assert train.pixels.dtype == torch.uint8 and train.shapes[0].tolist() == [14, 20]  # (h, w): smaller than 32
    assert test.images.shape == (4, 3, 16, 16) and not train.from_cache
    assert sorted(p.name for p in (root / CACHE_DIR).iterdir()) == ["test-16.pt", "train-store32.pt"]  # 32 = 2 * 16

    again = image_folder(root, size=16).train
    assert again.from_cache and torch.equal(again.pixels, train.pixels) and torch.equal(again.shapes, train.shapes)
    assert not image_folder(root, size=24).train.from_cache  # another size: its own file
    assert not image_folder(root, size=16, short_side=12).train.from_cache  # another store side: its own file

    def reload() -> ImageSet:
        return image_folder(root, size=16).train

    # modified (same name and size, new pixels and time), added, removed: each rebuilds the cache
    f = root / "train" / "a" / "0.png"
    _png(f, seed=999)
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = reload()
    n0 = 3 * 14 * 20
    assert not changed.from_cache and not torch.equal(changed.pixels[:n0], train.pixels[:n0])
    assert torch.equal(changed.pixels[n0:], train.pixels[n0:])
    assert reload().from_cache
    _png(root / "train" / "b" / "new.png", seed=5)
    added = reload()
    assert not added.from_cache and len(added) == 13
    (root / "train" / "b" / "new.png").unlink()
    removed = reload()
    assert not removed.from_cache and len(removed) == 12


def test_read_only_cache_warns_and_runs(tmp_path):
    """A cache folder that cannot be written (here a file where the folder should be: even root cannot create
    it) gives one warning per split and the same images, decoded again next time."""
    root = _folder(tmp_path / "data")
    (root / CACHE_DIR).write_text("in the way")
    with pytest.warns(UserWarning, match="cannot write the image cache .*decoded again on the next run"):
        data = image_folder(root, size=16)
    assert not data.train.from_cache and len(data.train) == 12
    with pytest.warns(UserWarning, match="cannot write the image cache"):
        assert not image_folder(root, size=16).train.from_cache
    reference = image_folder(root, size=16, cache=False)
    assert torch.equal(reference.train.pixels, data.train.pixels) and torch.equal(reference.test.images,
                                                                                   data.test.images)


def test_store_side_keeps_aspect_and_never_upscales(tmp_path):
    for i, size in enumerate(((90, 40), (30, 70), (10, 12))):
        _png(tmp_path / "d" / "train" / "c" / f"{i}.png", seed=i, size=size)
    _png(tmp_path / "d" / "test" / "c" / "t.png", seed=9)
    train = image_folder(tmp_path / "d", size=8, short_side=20).train
    # 90 x 40 -> 45 x 20 (floor(20 * 90 / 40)), 30 x 70 -> 20 x 46, 10 x 12 kept
    assert train.shapes.tolist() == [[20, 45], [46, 20], [12, 10]]


# ---- make-data --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", synth.KINDS)
def test_make_data_writes_the_layout_deterministically(tmp_path, kind):
    a, b = tmp_path / "a", tmp_path / "b"
    assert synth.main([kind, str(a), "--classes", "3", "--per-class", "2", "--seed", "4", "--scale", "0.1"]) == 0
    synth.make(kind, b, classes=3, per_class=2, seed=4, scale=0.1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) >= 18
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    data = load(a, size=8)
    assert data.num_classes == 3 and len(data.train) == len(data.val) == len(data.test) == 6
    if kind == "aircraft":
        assert data.train.classes == ["707-320", "727-200", "737-200"]
    assert synth.main([kind, str(a)]) == 2  # not an empty folder: refused


def test_make_data_sizes_are_realistic(tmp_path):
    """Full-scale images have the real data sets' sizes (headers only: nothing decoded)."""
    from PIL import Image

    for kind, check in (("flower102", lambda w, h: 500 in (w, h) and 375 <= min(w, h) and max(w, h) <= 700),
                        ("aircraft", lambda w, h: 1000 <= w <= 1400 and 1.3 <= w / h <= 1.8),
                        ("imagefolder", lambda w, h: w == 500 and 333 <= h <= 500)):
        root = synth.make(kind, tmp_path / kind, classes=2, per_class=1, seed=1)
        sizes = [Image.open(p).size for p in root.rglob("*.jpg")]
        assert len(sizes) == 6 and all(check(w, h) for w, h in sizes), (kind, sizes)


def test_make_data_classes_are_learnable(tmp_path):
    """Nearest class mean of colour histograms (4 levels per channel) of the centre views beats chance (1/6) by
    far on the test split: the classes carry signal a network can learn (shapes add more)."""
    data = load(synth.make("flower102", tmp_path / "f", classes=6, per_class=6, seed=0, scale=0.15), size=24)

    def histograms(v: torch.Tensor) -> torch.Tensor:
        q = v.long() // 64
        code = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).flatten(1)
        return torch.stack([torch.bincount(c, minlength=64) for c in code]).float() / code.shape[1]

    train, test = histograms(data.train.images), histograms(data.test.images)
    means = torch.stack([train[data.train.labels == c].mean(0) for c in range(6)])
    accuracy = float((torch.cdist(test, means).argmin(1) == data.test.labels).float().mean())
    assert accuracy > 0.5, accuracy  # 0.67 with this seed


# ---- through the loop -------------------------------------------------------------------------------

def test_resume_after_crash_mid_epoch_with_augmentation_is_bit_identical(tmp_path, monkeypatch):
    """A crash in the middle of generation 2's second epoch; resuming from the last checkpoint (every epoch:
    --checkpoint-every 0) ends with the very weights and history of an uninterrupted run."""
    data = image_folder(_folder(tmp_path / "data"), size=8)
    cfg = Config(generations=2, epochs=2, batch_size=4, warmup_epochs=1)

    def make(out):
        torch.manual_seed(0)
        return Evolution(_model(data.num_classes), data.train, data.test, cfg, out, device="cpu", progress=False,
                         log=lambda _: None, checkpoint_every=0)

    ref = make(tmp_path / "ref")
    ref_history = ref.run()

    original = Batches.epoch

    def crashing(self, batch_size, seed=0, generation=0, epoch=0, pairs=False):
        for b, item in enumerate(original(self, batch_size, seed, generation, epoch, pairs)):
            if self.augment and (generation, epoch, b) == (2, 1, 1):
                raise KeyboardInterrupt("simulated kill")
            yield item

    monkeypatch.setattr(Batches, "epoch", crashing)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "crash").run()
    monkeypatch.setattr(Batches, "epoch", original)
    saved = load_checkpoint(tmp_path / "crash" / "last.pt")
    assert (saved["generation"], saved["epoch"]) == (2, 1)
    resumed = make(tmp_path / "crash")
    history = resumed.run(resume=True)
    assert resumed.start == (2, 1)
    assert [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history] == \
           [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in ref_history]
    a, b = load_checkpoint(tmp_path / "crash" / "last.pt"), load_checkpoint(tmp_path / "ref" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# ---- checkpoints and host reads ---------------------------------------------------------------

def test_checkpoint_every_minutes(tmp_path, monkeypatch):
    """With a clock that advances 4 minutes per epoch, --checkpoint-every 10 writes a checkpoint at the end of
    every third epoch (the first past 10 minutes) plus one per generation, and resume continues from it."""
    clock = {"t": 0.0}
    monkeypatch.setattr(E.time, "monotonic", lambda: clock["t"])
    real_train = Evolution._train_epoch

    def train_epoch(self, *args):
        clock["t"] += 240
        return real_train(self, *args)

    monkeypatch.setattr(Evolution, "_train_epoch", train_epoch)
    written = []
    real_submit = E._Writer.submit
    monkeypatch.setattr(E._Writer, "submit", lambda self, obj, path, prev, tag: written.append(tag) or
                        real_submit(self, obj, path, prev, tag))
    train, test, _, _ = digits(per_class=2)
    ev = Evolution(build_model("small_cnn", num_classes=10, in_channels=1, width=4), train,
                   torch.utils.data.Subset(test, range(20)),
                   Config(generations=2, epochs=5, batch_size=20), tmp_path, device="cpu", progress=False,
                   log=lambda _: None, checkpoint_every=10)
    ev.run()
    # epochs end at 4, 8, 12 (write; the clock restarts), 16, 20 (g1 end: write), 24, 28, 32 (write), ...
    assert written == [(1, 3), (1, 5), (2, 3), (2, 5)]
    assert ev.saved == (2, 5)


# host reads per epoch and per evaluation: tests/test_host_reads.py (every read path, augmentation and bar on)


# ---- end to end ---------------------------------------------------------------------------------

def test_cli_image_folder_end_to_end(tmp_path, capsys):
    root = _folder(tmp_path / "data", classes=("cat", "dog", "eel"), train=4, test=2)
    out = tmp_path / "run"
    args = ["run", "--dataset", str(root), "--image-size", "32", "--model", "resnet18", "--width", "4",
            "--generations", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "12 train / 6 test images" in printed and "generation  2:" in printed, printed
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["generation"] == 2 and len(ckpt["history"]) == 2
    assert ckpt["identity"]["--image-size"] == 32
    assert ckpt["model"]["fc.weight"].shape[0] == 3
    assert sorted(p.name for p in (root / CACHE_DIR).iterdir()) == ["test-32.pt", "train-store64.pt"]
    # the second run decodes nothing: the cache files are read, not rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in (root / CACHE_DIR).iterdir()}
    assert cli.main([*args[:-1], str(tmp_path / "run2")]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (root / CACHE_DIR).iterdir()} == stamps
    timeless = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in ckpt["history"]]
    assert [{k: v for k, v in r.items() if k != "epoch_time_s"}
            for r in load_checkpoint(tmp_path / "run2" / "last.pt")["history"]] == timeless  # deterministic


def test_digits_read_without_sklearn_equal_load_digits(monkeypatch):
    """The digits come from scikit-learn's installed CSV without importing scikit-learn; the same images,
    labels and order as load_digits(), and load_digits() itself where the CSV is not found."""
    import importlib.util
    import sys

    from sklearn.datasets import load_digits

    from ke_fast import data

    want = load_digits()
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)  # it must not be imported again
    images, labels = data.digits_arrays()
    assert "sklearn.datasets" not in sys.modules
    assert images.shape == (1797, 8, 8) and np.array_equal(images, want.images)
    assert labels.dtype == np.int64 and np.array_equal(labels, want.target)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no CSV to be found: the fallback
    images, labels = data.digits_arrays()
    assert np.array_equal(images, want.images) and np.array_equal(labels, want.target)
