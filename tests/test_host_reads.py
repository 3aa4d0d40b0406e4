"""Host reads in the training loop, counted through every path a read can take (tests/host_reads.py: item,
float/int/bool/index/format of a tensor, tolist, numpy, cpu, the scalar-read kernel, device-to-host copies,
value-sized operators), with the paper's augmentation on (an ImageSet training set) and the progress bar on.

A training epoch reads exactly one value (its mean loss, at the end), an evaluation exactly one (its count of
correct predictions), whatever the number of steps or batches. The tests at the end break the loop on
purpose (a read per step, by each path) and show that the same check fails: the count can catch what it
claims to catch. On CUDA the same epoch runs under ``torch.cuda.set_sync_debug_mode("error")``."""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from ke_fast.data import ImageSet
from ke_fast.evolve import Config, Evolution
from ke_fast.models import build_model
from ke_fast.tasks import TASKS

from host_reads import count_host_reads


def _images(n: int, train: bool, seed: int) -> ImageSet:
    """n random 3-channel images of 3 classes: training images larger than the 8x8 crop (augmented)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 11, 13) if train else (n, 3, 8, 8)
    return ImageSet.from_tensors(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
                                 torch.arange(n) % 3, 8, train)


def _evolution(tmp_path, train: int, test: int = 6, device: str = "cpu") -> Evolution:
    return Evolution(build_model("small_cnn", num_classes=3, in_channels=3, width=4), _images(train, True, 0),
                     _images(test, False, 1), Config(generations=1, epochs=2, batch_size=2), tmp_path,
                     device=device, progress=True, log=lambda _: None)


def _reads_per_epoch(ev: Evolution, monkeypatch) -> tuple[list[dict], list[str]]:
    """Runs ``ev`` (one generation of two epochs); the host reads made inside each training epoch."""
    per_epoch, where = [], []
    real = Evolution._train_epoch
    with count_host_reads(monkeypatch) as reads:
        reads.on = False

        def train_epoch(self, *args):
            assert self._bar.bar is not None and self._train.augment  # the bar and the augmentation are on
            reads.counts.clear()
            reads.on = True
            try:
                return real(self, *args)
            finally:
                reads.on = False
                per_epoch.append(dict(reads.counts))
                where.append(reads.report())

        monkeypatch.setattr(Evolution, "_train_epoch", train_epoch)
        ev.run()
    return per_epoch, where


def _check_one_read_per_epoch(per_epoch: list[dict], where: list[str]) -> None:
    assert per_epoch == [{"item": 1}, {"item": 1}], where


@pytest.mark.parametrize("train", [4, 12])
def test_a_training_epoch_reads_the_loss_once(tmp_path, monkeypatch, train):
    """Epochs of 2 and of 6 augmented steps, progress bar on: one host read each (the mean loss at the end)."""
    ev = _evolution(tmp_path, train)
    per_epoch, where = _reads_per_epoch(ev, monkeypatch)
    assert ev._train.steps(2) == train // 2
    _check_one_read_per_epoch(per_epoch, where)


def test_an_evaluation_reads_one_count(tmp_path, monkeypatch):
    """Evaluations of 1 and of 2 batches (256 images a batch), dense and fit: one host read each. The first
    fit evaluation builds and caches its launch table (a value-sized repeat_interleave), so each evaluation
    is counted on its second call."""
    from ke_fast import fit_only

    for test in (6, 300):
        ev = _evolution(tmp_path / str(test), 4, test)
        for fit in (False, True):
            with fit_only(ev.model) if fit else contextlib.nullcontext():
                ev.evaluate()  # warm: one-time caches
                with count_host_reads(monkeypatch) as reads:
                    ev.evaluate()
            assert sum(reads.counts.values()) == 1, (test, fit, reads.report())  # top-1 and top-5 in one read


# ---- the counter itself ------------------------------------------------------------------------------

READS = {
    "item": lambda t: t.sum().item(),
    "__float__": lambda t: float(t.sum()),
    "__int__": lambda t: int(t.sum()),
    "__bool__": lambda t: bool(t.sum() > 0),
    "__index__": lambda t: [0, 1][t[:1].long().clamp(0, 1).squeeze()],
    "__format__": lambda t: f"{t.sum():.3f}",
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "cpu": lambda t: t.cpu(),
    "aten::nonzero": lambda t: t.nonzero(),
    "index with a boolean mask": lambda t: t[t > 0],
}


@pytest.mark.parametrize("name, thread", [(name, False) for name in sorted(READS)] +
                         [(name, True) for name in sorted(READS) if not name.startswith(("aten::", "index"))])
def test_the_counter_sees_each_kind_of_read(monkeypatch, name, thread):
    """Each path a value can take to the host is counted once, under its name; the Python-level reads in
    another thread too (ke_fast prefetches host-resident batches in a thread). Not seen in another thread:
    value-sized operators and C++-internal scalar reads (a torch mode is thread-local); the prefetching
    thread only gathers host tensors by index."""
    t = torch.arange(4.0) - 1
    with count_host_reads(monkeypatch) as reads:
        if thread:
            worker = threading.Thread(target=READS[name], args=(t,))
            worker.start()
            worker.join()
        else:
            READS[name](t)
    assert dict(reads.counts) == {name: 1}, reads.report()


# ---- a deliberately broken loop: a read per step ------------------------------------------------------

BROKEN = {
    "item": lambda loss: loss.detach().item(),
    "__float__": lambda loss: float(loss.detach()),
    "__bool__": lambda loss: bool(loss > 100),  # `if loss > 100: ...`, a divergence check per step
    "tolist": lambda loss: loss.detach().tolist(),
    "cpu": lambda loss: loss.detach().cpu(),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_read_per_step_fails_the_check(tmp_path, monkeypatch, name):
    """The shown-to-fail proof: a loss function that reads its value at every step (as a per-step `.item()`
    for logging, `float(loss)`, `if loss > 100` would) makes each epoch read 1 + steps values, and the check of
    test_a_training_epoch_reads_the_loss_once fails."""
    task = TASKS["classify"]
    real_loss = task.loss

    def loss(self, out, y):
        value = real_loss(self, out, y)
        BROKEN[name](value)
        return value

    monkeypatch.setattr(task, "loss", loss)
    ev = _evolution(tmp_path, 6)
    per_epoch, where = _reads_per_epoch(ev, monkeypatch)
    steps = ev._train.steps(2)
    expected = {"item": 1 + steps} if name == "item" else {"item": 1, name: steps}
    assert per_epoch == [expected, expected], where
    with pytest.raises(AssertionError):
        _check_one_read_per_epoch(per_epoch, where)


# ---- CUDA: the driver's own sync detector -------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode watches "
                    "the CUDA runtime's synchronising calls")
def test_a_cuda_epoch_synchronises_only_for_its_one_read(tmp_path, monkeypatch):
    """Under set_sync_debug_mode("error") any synchronising CUDA call raises, except the designed reads (the
    epoch's mean loss, the evaluation's count), let through here and counted: one per epoch."""
    allowed = []

    def let_through(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args):
            allowed.append(name)
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return real(self, *args)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return read

    for name in ("item", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, let_through(name))
    ev = _evolution(tmp_path, 12, device="cuda")
    epochs = []
    real = Evolution._train_epoch

    def train_epoch(self, *args):
        allowed.clear()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            epochs.append(list(allowed))

    monkeypatch.setattr(Evolution, "_train_epoch", train_epoch)
    ev.run()
    assert epochs == [["item"], ["item"]]
