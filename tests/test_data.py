"""Real images and the device-side data path (ke_fast.data, ke_fast.batches) on the CPU: the image cache and
its invalidation, the official split-list layout, augmentation as a pure function of (seed, generation, epoch,
batch), bit-identical resume after a crash mid-epoch with augmentation on, the --checkpoint-every rule, one host
read of the loss per epoch, and a tiny image folder end to end through the CLI."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from ke_fast import cli
from ke_fast import evolve as E
from ke_fast.batches import Batches, crop_boxes
from ke_fast.data import CACHE_DIR, DataError, ImageSet, digits, image_folder, images, split_lists
from ke_fast.evolve import Config, Evolution, load_checkpoint
from ke_fast.models import build_model

CPU = torch.device("cpu")


def _png(path: Path, seed: int, size: tuple[int, int] = (20, 14)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)


def _folder(root: Path, classes=("a", "b"), train=6, test=2) -> Path:
    for split, n in (("train", train), ("test", test)):
        for ci, c in enumerate(classes):
            for i in range(n):
                _png(root / split / c / f"{i}.png", seed=hash((split, ci, i)) % 1000)
    return root


def _model(classes: int = 2) -> torch.nn.Module:
    return build_model("small_cnn", num_classes=classes, in_channels=3, width=4)


# ---- the image cache ----------------------------------------------------------------------------

def test_image_cache_is_reused_and_invalidated(tmp_path):
    root = _folder(tmp_path / "data")
    train, test, classes, channels = image_folder(root, size=16)
    assert (classes, channels, len(train), len(test)) == (2, 3, 12, 4)
    assert train.images.dtype == torch.uint8 and train.images.shape == (12, 3, 18, 18)  # round(16 * 256/224)
    assert test.images.shape == (4, 3, 16, 16) and not train.from_cache
    assert sorted(p.name for p in (root / CACHE_DIR).iterdir()) == ["test-16.pt", "train-18.pt"]

    again, _, _, _ = image_folder(root, size=16)
    assert again.from_cache and torch.equal(again.images, train.images)
    assert not image_folder(root, size=24)[0].from_cache  # another size: its own file

    def reload() -> ImageSet:
        return image_folder(root, size=16)[0]

    # modified (same name and size, new pixels and time), added, removed: each rebuilds the cache
    f = root / "train" / "a" / "0.png"
    _png(f, seed=999)
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = reload()
    assert not changed.from_cache and not torch.equal(changed.images[0], train.images[0])
    assert torch.equal(changed.images[1:], train.images[1:])
    assert reload().from_cache
    _png(root / "train" / "b" / "new.png", seed=5)
    added = reload()
    assert not added.from_cache and len(added) == 13
    (root / "train" / "b" / "new.png").unlink()
    removed = reload()
    assert not removed.from_cache and len(removed) == 12


def test_split_lists_layout(tmp_path):
    """The official KE Flower102 layout: jpg/ and lists/*.csv (file_name, label); labels sorted numerically."""
    root = tmp_path / "flower102"
    rows = {"train_all_sub_list.csv": [("1.jpg", 10), ("2.jpg", 2), ("3.jpg", 10), ("4.jpg", 2)],
            "val_all_sub_list.csv": [("5.jpg", 2)], "test_all_sub_list.csv": [("5.jpg", 10), ("6.jpg", 2)]}
    for i in range(1, 7):
        _png(root / "jpg" / f"{i}.jpg", seed=i)
    (root / "lists").mkdir()
    for name, items in rows.items():
        (root / "lists" / name).write_text("file_name,label\n" + "".join(f"{f},{c}\n" for f, c in items))
    train, test, classes, _ = images(root, size=16)
    assert classes == 2 and train.classes == ["2", "10"]  # 2 < 10: numeric order
    assert train.labels.tolist() == [1, 0, 1, 0] and test.labels.tolist() == [1, 0]
    assert test.cache_file.name == "test_all_sub_list-16.pt"

    (root / "lists" / "test_all_sub_list.csv").write_text("file_name,label\n6.jpg,7\n")
    with pytest.raises(DataError, match="label '7'"):
        split_lists(root, size=16)
    (root / "lists" / "test_all_sub_list.csv").write_text("file_name,label\nmissing.jpg,2\n")
    with pytest.raises(DataError, match="missing.jpg"):
        split_lists(root, size=16)
    (root / "lists" / "test_all_sub_list.csv").write_text("name,class\n6.jpg,2\n")
    with pytest.raises(DataError, match="file_name and label"):
        split_lists(root, size=16)


# ---- augmentation -------------------------------------------------------------------------------

def test_crop_boxes_follow_random_resized_crop():
    u = torch.rand(4096, 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = crop_boxes(u, side=64)
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    left, right = theta[:, 0, 2] - w, theta[:, 0, 2] + w
    top, bottom = theta[:, 1, 2] - h, theta[:, 1, 2] + h
    eps = 1e-6
    assert bool((left >= -1 - eps).all() and (right <= 1 + eps).all() and (top >= -1 - eps).all()
                and (bottom <= 1 + eps).all()), "a box leaves the image"
    area = w * h
    assert float(area.min()) >= 0.07 and float(area.max()) <= 1 + eps
    assert 0.45 < float((theta[:, 0, 0] < 0).float().mean()) < 0.55  # flips: half
    ratio = w / h
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.4


def test_augmentation_is_a_function_of_seed_generation_epoch_batch(tmp_path):
    train, _, _, _ = image_folder(_folder(tmp_path / "data"), size=16)
    b = Batches(train, CPU, train=True)

    def epoch(seed, g, e):
        return [(x.clone(), y.clone()) for x, y in b.epoch(4, seed, g, e)]

    torch.manual_seed(1)
    ref = epoch(0, 2, 3)
    assert len(ref) == 3 and ref[0][0].shape == (4, 3, 16, 16) and ref[0][0].dtype == torch.float32
    torch.manual_seed(2)  # the global RNG plays no part
    again = epoch(0, 2, 3)
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(ref, again))
    # a batch alone (as after a resume): the same as in the whole epoch
    it = b.epoch(4, 0, 2, 3)
    next(it)
    x1, _ = next(it)
    assert torch.equal(x1, ref[1][0])
    for other in ((1, 2, 3), (0, 1, 3), (0, 2, 4)):
        assert not torch.equal(epoch(*other)[0][0], ref[0][0]), other
    # evaluation batches are the centre crop, in order, unaugmented: ImageSet[i] exactly
    x, y = next(Batches(train, CPU, train=False).epoch(5))
    assert torch.allclose(x[2], train[2][0], atol=1e-6) and y.tolist() == train.labels[:5].tolist()


def test_prefetching_thread_gives_the_same_batches():
    """device_fraction 0 keeps the data in host memory behind the prefetching thread (the path of a data set too
    large for the GPU): the same batches as resident data, and the thread ends when the consumer stops early."""
    import threading

    g = torch.Generator().manual_seed(0)
    data = ImageSet.from_tensors(torch.randint(0, 256, (10, 3, 9, 9), generator=g, dtype=torch.uint8),
                                 torch.arange(10) % 3, 8, True)
    resident, streamed = Batches(data, CPU, True), Batches(data, CPU, True, device_fraction=0)
    assert resident.resident and not streamed.resident
    a, b = list(resident.epoch(4, 5, 1, 2)), list(streamed.epoch(4, 5, 1, 2))
    assert len(a) == len(b) == 3
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, b))
    it = streamed.epoch(1, 5, 1, 2)
    next(it)
    it.close()
    assert not any(t.name == "ke_fast-prefetch" for t in threading.enumerate())
    with pytest.raises(ValueError, match="uint8"):
        ImageSet.from_tensors(torch.zeros(2, 3, 8, 8), torch.zeros(2), 8, True)


def test_resume_after_crash_mid_epoch_with_augmentation_is_bit_identical(tmp_path, monkeypatch):
    """A crash in the middle of generation 2's second epoch; resuming from the last checkpoint (every epoch:
    --checkpoint-every 0) ends with the very weights and history of an uninterrupted run."""
    train, test, classes, _ = image_folder(_folder(tmp_path / "data"), size=8)
    cfg = Config(generations=2, epochs=2, batch_size=4, warmup_epochs=1)

    def make(out):
        torch.manual_seed(0)
        return Evolution(_model(classes), train, test, cfg, out, device="cpu", progress=False, log=lambda _: None,
                         checkpoint_every=0)

    ref = make(tmp_path / "ref")
    ref_history = ref.run()

    calls = {"n": 0}
    original = Batches._finish

    def crashing(self, x, seed, g, e, b):
        if self.augment:
            calls["n"] += 1
            if (g, e, b) == (2, 1, 1):
                raise KeyboardInterrupt("simulated kill")
        return original(self, x, seed, g, e, b)

    monkeypatch.setattr(Batches, "_finish", crashing)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "crash").run()
    monkeypatch.setattr(Batches, "_finish", original)
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


def test_loss_is_read_once_per_epoch(tmp_path, monkeypatch):
    """Host reads (Tensor.item) in an epoch do not grow with the number of steps."""
    reads = []
    real_item = torch.Tensor.item
    real_train = Evolution._train_epoch
    counting = {"on": False}

    def item(self):
        if counting["on"]:
            reads[-1] += 1
        return real_item(self)

    def train_epoch(self, *args):
        reads.append(0)
        counting["on"] = True
        try:
            return real_train(self, *args)
        finally:
            counting["on"] = False

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(Evolution, "_train_epoch", train_epoch)
    steps = {}
    for per_class in (1, 4):
        train, test, _, _ = digits(per_class=per_class)
        reads.clear()
        ev = Evolution(build_model("small_cnn", num_classes=10, in_channels=1, width=4), train,
                       torch.utils.data.Subset(test, range(20)), Config(generations=1, epochs=2, batch_size=2),
                       tmp_path / str(per_class), device="cpu", progress=False, log=lambda _: None)
        ev.run()
        steps[per_class] = ev._train.steps(2)
        assert reads == [1, 1], (per_class, reads)
    assert steps == {1: 5, 4: 20}


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
    assert sorted(p.name for p in (root / CACHE_DIR).iterdir()) == ["test-32.pt", "train-37.pt"]
    # the second run decodes nothing: the cache files are read, not rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in (root / CACHE_DIR).iterdir()}
    assert cli.main([*args[:-1], str(tmp_path / "run2")]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (root / CACHE_DIR).iterdir()} == stamps
    timeless = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in ckpt["history"]]
    assert [{k: v for k, v in r.items() if k != "epoch_time_s"}
            for r in load_checkpoint(tmp_path / "run2" / "last.pt")["history"]] == timeless  # deterministic
