"""Device batches (ke_fast.batches.Batches) on the CPU: augmentation as a pure function of (seed, generation,
epoch, batch) checked one argument at a time with the order held fixed, DDP sharding across ranks, CS-KD pair
batches, the prefetching thread, class subsets of image sets (metric learning) augmented like any training
set, and no host read of a tensor value while batches are made."""
from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset
from torch.utils._python_dispatch import TorchDispatchMode

from ke_fast import batches as B
from ke_fast.batches import Batches, draw_seed
from ke_fast.data import ImageSet
from ke_fast.metric import class_split

CPU = torch.device("cpu")


def _images(n: int = 12, classes: int = 3, train: bool = True, seed: int = 0, side: tuple[int, int] = (21, 30),
            size: int = 8) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, *side) if train else (n, 3, size, size)
    return ImageSet.from_tensors(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
                                 torch.arange(n) % classes, size, train)


# ---- purity -----------------------------------------------------------------------------------------

def _unchanged_by(b: Batches) -> list[str]:
    """The arguments among (seed, generation, epoch, batch) whose change alone leaves a batch of the same
    items unchanged (empty when the crops depend on all four); also checks that the same tuple gives the
    same batch whatever the global generator's state."""
    pos = torch.tensor([3, 1, 4, 1, 5])
    ref = (7, 2, 3, 1)
    torch.manual_seed(1)
    x, y = b.batch(pos, *ref)
    torch.manual_seed(2)
    x2, y2 = b.batch(pos, *ref)
    assert torch.equal(x, x2) and torch.equal(y, y2) and y.tolist() == (pos % 3).tolist()
    unchanged = []
    for k, name in enumerate(("seed", "generation", "epoch", "batch")):
        other = list(ref)
        other[k] += 1
        if torch.equal(b.batch(pos, *other)[0], x):
            unchanged.append(name)
    return unchanged


def test_augmentation_depends_on_each_argument_alone():
    b = Batches(_images(), CPU, train=True)
    assert _unchanged_by(b) == []


def test_the_purity_check_catches_a_draw_that_ignores_the_batch_index(monkeypatch):
    """A deliberately broken build (the crop key ignores the batch index) fails the check above."""
    real = B.draw_seed
    monkeypatch.setattr(B, "draw_seed", lambda seed, g, e, batch=-1: real(seed, g, e, -1 if batch < 0 else 0))
    assert _unchanged_by(Batches(_images(), CPU, train=True)) == ["batch"]


def test_epoch_crops_vary_with_each_argument_with_the_order_held_fixed(monkeypatch):
    """Through epoch(): a fixed order in which batches 0 and 1 hold the same items. Batch 1 differs from batch
    0 (the batch index alone), and batch 0 changes with seed, generation or epoch alone."""
    data = _images(n=4)
    monkeypatch.setattr(Batches, "_order", lambda self, seed, g, e, pairs: torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    b = Batches(data, CPU, train=True)
    first = list(b.epoch(4, 5, 1, 2))
    assert len(first) == 2 and torch.equal(first[0][1], first[1][1])
    assert not torch.equal(first[0][0], first[1][0])
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(first, b.epoch(4, 5, 1, 2)))
    for args in ((6, 1, 2), (5, 2, 2), (5, 1, 3)):
        assert not torch.equal(next(b.epoch(4, *args))[0], first[0][0]), args
    # the batch of epoch() is batch() of the same items and tuple
    assert torch.equal(b.batch(torch.tensor([0, 1, 2, 3]), 5, 1, 2, 1)[0], first[1][0])


LEVEL = 1 / (255 * 0.225)  # one uint8 level after normalisation (the largest of the three)


def test_evaluation_batches_are_centre_views_in_order():
    """Evaluation batches of a training set: its centre views, in order, as ``set[i]`` gives them (rendered in
    one batch vs one by one: equal, but for a rare tie rounded the other way)."""
    data = _images()
    x, y = next(Batches(data, CPU, train=False).epoch(5))
    assert y.tolist() == data.labels[:5].tolist()
    single = torch.stack([data[i][0] for i in range(5)])
    assert torch.allclose(x, single, atol=LEVEL * 1.01) and float((x - single).abs().gt(1e-5).float().mean()) < 0.01


# ---- sharding ---------------------------------------------------------------------------------------

def test_ranks_share_every_epoch():
    """world = 3 over 10 items: DistributedSampler's rule (the permutation wrapped to 12, every 3rd from the
    rank), so the ranks' items together are the permutation plus its first two, none of a rank's repeated; the
    same number of steps on each; another epoch, another permutation."""
    data = TensorDataset(torch.arange(10).float()[:, None], torch.arange(10))
    ranks = [Batches(data, CPU, True, rank=r, world=3) for r in range(3)]
    assert {b.steps(2) for b in ranks} == {2}
    seen = [torch.cat([y for _, y in b.epoch(2, 4, 1, 0)]) for b in ranks]
    assert [len(s) for s in seen] == [4, 4, 4]
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(draw_seed(4, 1, 0)))
    padded = torch.cat([perm, perm[:2]])
    assert [s.tolist() for s in seen] == [padded[r::3].tolist() for r in range(3)]
    assert sorted(torch.cat(seen).tolist()) == sorted(padded.tolist())
    assert torch.cat([y for _, y in ranks[0].epoch(2, 4, 1, 1)]).tolist() != seen[0].tolist()
    with pytest.raises(ValueError, match="rank must be in 0 .. world-1"):
        Batches(data, CPU, True, rank=3, world=3)


def test_ranks_crop_differently():
    """The crops' Philox stream is the rank: two ranks cropping the same items do not crop them alike."""
    data = _images()
    pos = torch.tensor([0, 1, 2])
    a = Batches(data, CPU, True, rank=0, world=2).batch(pos, 1, 1, 1, 1)[0]
    b = Batches(data, CPU, True, rank=1, world=2).batch(pos, 1, 1, 1, 1)[0]
    assert not torch.equal(a, b)


# ---- CS-KD pairs ------------------------------------------------------------------------------------

def test_cskd_pair_batches():
    """pairs=True: every batch is its anchors (the epoch's order) then one item of the same class each; the
    partners are a function of (seed, generation, epoch), drawn over the whole class, and follow their anchors
    onto their rank."""
    n, classes = 30, 4
    data = TensorDataset(torch.arange(n).float()[:, None], torch.arange(n) % classes)
    b = Batches(data, CPU, True)
    plain = [y for _, y in b.epoch(8, 3, 1, 2)]
    paired = list(b.epoch(8, 3, 1, 2, pairs=True))
    assert [len(y) for _, y in paired] == [2 * len(y) for y in plain]
    for (x, y), anchors in zip(paired, plain):
        k = len(anchors)
        assert torch.equal(y[:k], anchors) and torch.equal(y[k:], anchors)  # the same classes, in order
        assert torch.equal(x[:k, 0].long() % classes, x[k:, 0].long() % classes)
    again = list(b.epoch(8, 3, 1, 2, pairs=True))
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(paired, again))
    partners = torch.cat([x[len(x) // 2:, 0] for e in range(40) for x, _ in b.epoch(8, 3, 1, e, pairs=True)])
    assert sorted(set(partners.long().tolist())) == list(range(n))  # every member of every class is drawn
    # sharded: each rank's pairs are its share of the single-process pairs
    whole = torch.cat([torch.stack([x[:len(x) // 2, 0], x[len(x) // 2:, 0]], 1)
                       for x, _ in Batches(data, CPU, True).epoch(100, 3, 1, 2, pairs=True)])
    shards = [torch.cat([torch.stack([x[:len(x) // 2, 0], x[len(x) // 2:, 0]], 1)
                         for x, _ in Batches(data, CPU, True, rank=r, world=2).epoch(100, 3, 1, 2, pairs=True)])
              for r in range(2)]
    assert torch.equal(shards[0], whole[0::2]) and torch.equal(shards[1], whole[1::2])
    with pytest.raises(ValueError, match="CS-KD"):
        next(Batches(data, CPU, False).epoch(8, pairs=True))
    targets = Batches(TensorDataset(torch.zeros(5, 1), torch.linspace(0, 1, 5)), CPU, True)  # regression
    assert len(list(targets.epoch(2))) == 3
    with pytest.raises(ValueError, match="needs class labels"):
        next(targets.epoch(2, pairs=True))


def test_cskd_pairs_of_images_are_augmented_each():
    data = _images(n=9, classes=3)
    x, y = next(Batches(data, CPU, True).epoch(4, 0, 1, 0, pairs=True))
    assert x.shape == (8, 3, 8, 8) and torch.equal(y[:4], y[4:])
    assert len({tuple(v.flatten()[:5].tolist()) for v in x}) == 8  # no two views alike


# ---- prefetching, metric subsets, host reads --------------------------------------------------------

@pytest.mark.parametrize("pairs", [False, True])
def test_prefetching_thread_gives_the_same_batches(pairs):
    """device_fraction 0 keeps the data in host memory behind the prefetching thread (the path of a data set too
    large for the GPU; images then travel as a compact store of their own): the same batches as resident data,
    and the thread ends when the consumer stops early."""
    data = _images(n=10)
    resident, streamed = Batches(data, CPU, True), Batches(data, CPU, True, device_fraction=0)
    assert resident.resident and not streamed.resident
    a, b = list(resident.epoch(4, 5, 1, 2, pairs)), list(streamed.epoch(4, 5, 1, 2, pairs))
    assert len(a) == len(b) == 3
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, b))
    it = streamed.epoch(1, 5, 1, 2)
    next(it)
    it.close()
    assert not any(t.name == "ke_fast-prefetch" for t in threading.enumerate())
    with pytest.raises(ValueError, match="uint8"):
        ImageSet.from_tensors(torch.zeros(2, 3, 8, 8), torch.zeros(2), 8, True)


def test_metric_class_subsets_are_augmented():
    """metric.class_split pools a training and an evaluation image set and splits them by class: its training
    subset gets random-resized crops (from whole stored images, the evaluation split's centre views counting as
    square images), its test subset the centre views of whatever it pooled."""
    train, test = _images(n=12, classes=4), _images(n=8, classes=4, train=False, seed=1)
    fit, held = class_split(train, test)
    b = Batches(fit, CPU, True)
    assert b.augment and len(b) == len(fit) == 10
    e0, e1 = [torch.cat([x for x, _ in b.epoch(4, 0, 1, e)]) for e in (0, 1)]
    assert e0.shape == (10, 3, 8, 8) and not torch.equal(e0, e1)
    x, y = next(Batches(held, CPU, False).epoch(100))
    assert torch.equal(y, held.labels)
    expected = torch.stack([held[i][0] for i in range(len(held))])
    assert torch.allclose(x, expected, atol=LEVEL * 1.01)
    concat = ConcatDataset([Subset(train, [0, 5]), test])  # any nesting resolves to the images
    assert Batches(concat, CPU, True).augment and len(Batches(concat, CPU, False)) == 10


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (item, int(), float(), bool(), tolist)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pairs", [False, True])
def test_making_batches_reads_nothing_back(pairs, monkeypatch):
    """Augmented epochs of 2 and of 6 steps: no tensor value is read into Python while their batches are made
    (tolist is counted too)."""
    data = _images(n=12, side=(11, 13), size=6)
    b = Batches(data, CPU, True)
    calls = {"tolist": 0}
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.__setitem__("tolist", calls["tolist"] + 1)
                        or real(self))
    for batch_size in (6, 2):
        with _HostReads() as mode:
            steps = sum(1 for _ in b.epoch(batch_size, 1, 1, 1, pairs))
        assert steps == 12 // batch_size and mode.reads == 0 and calls["tolist"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fused Triton kernel makes CUDA batches")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_batches_match_the_cpu_path(channels_last):
    """On CUDA one Triton launch per batch: the same crops as the CPU path (boxes bit for bit, values within the
    kernel tolerance of test_augment), in the requested memory format; evaluation batches identical."""
    data = _images(n=10)
    cpu = list(Batches(data, CPU, True).epoch(4, 3, 1, 2, pairs=True))
    gpu = list(Batches(data, torch.device("cuda"), True, channels_last=channels_last).epoch(4, 3, 1, 2, pairs=True))
    for (x, y), (xg, yg) in zip(cpu, gpu):
        assert xg.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.equal(y, yg.cpu()) and torch.allclose(x, xg.cpu(), atol=1e-4)
    e, eg = (next(Batches(data, d, False).epoch(10))[0] for d in (CPU, torch.device("cuda")))
    assert torch.allclose(e, eg.cpu(), atol=1e-6)


# ---- the epoch as device tensors: what a captured step reads (ke_fast.step.GraphStep) -----------------

def _rows_of(b: Batches, plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch of a plan made by Batches.make from its row and its key as a tensor, as a graph does."""
    return [b.make(plan.order[r, :size], plan.keys[r:r + 1] if b.augment else None)
            for r, size in enumerate(plan.sizes)]


@pytest.mark.parametrize("pairs", [False, True])
def test_plan_and_make_are_the_epoch_bit_for_bit(pairs):
    """Batches.make of each row of Batches.plan (positions and the key as device tensors; 10 items in batches
    of 4: the last one partial, padded in its row) equals Batches.epoch's batch bit for bit: the same
    order, CS-KD partners and crops and flips drawn from the tensor key as from the host int."""
    b = Batches(_images(10), CPU, train=True)
    plan = b.plan(4, 7, 2, 3, pairs)
    width = 8 if pairs else 4
    assert plan.sizes == [width, width, width // 2] and tuple(plan.order.shape) == (3, width)
    assert plan.keys.tolist() == [draw_seed(7, 2, 3, r) for r in range(3)]
    made, epoch = _rows_of(b, plan), list(b.epoch(4, 7, 2, 3, pairs))
    assert len(made) == len(epoch) == 3
    for (x, y), (ex, ey) in zip(made, epoch):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_eval_plan_covers_every_item_once_padded_and_masked():
    b = Batches(_images(10, train=False), CPU, train=False)
    plan = B.eval_plan(b, 4)
    assert plan.sizes == [4, 4, 2] and plan.order[plan.valid].tolist() == list(range(10))
    assert plan.valid.sum() == 10 and plan.order[~plan.valid].tolist() == [0, 0]
    x, y = b.make(plan.order[0])
    ex, ey = next(b.epoch(4))
    assert torch.equal(x, ex) and torch.equal(y, ey)


def test_plan_make_and_eval_plan_refuse_what_they_cannot_do():
    train = Batches(_images(6), CPU, train=True)
    with pytest.raises(ValueError, match="resident"):
        Batches(_images(6), CPU, train=True, device_fraction=0).plan(2)
    with pytest.raises(ValueError, match="key"):
        train.make(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="train=False"):
        B.eval_plan(train, 4)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        B.eval_plan(Batches(_images(6, train=False), CPU, train=False), 0)
    with pytest.raises(ValueError, match="batch_size"):
        train.plan(0)
