"""Batches cut from tensors with batched tensor ops: no DataLoader, no per-item Python work per step.

A data set is turned into tensors once (:class:`Batches`). Images (an :class:`ke_fast.imageset.ImageSet`, or a
Subset, ConcatDataset or class subset of ImageSets, e.g. metric learning's ``ClassSubset``) keep their uint8
form: training batches come from the ragged store (an evaluation split's centre views count as square
images), evaluation batches from the centre views. A TensorDataset keeps its tensors; any other map-style data
set is read item by item once and stacked (so an item that is random is drawn once). The tensors live on the
training device when they fit in ``device_fraction`` of its memory (on CPU: unless ``device_fraction`` is 0),
else in host memory (pinned for CUDA) with a background thread that gathers the next batches while the
current one trains.

Every batch is a pure function of (seed, generation, epoch, batch index): the order is a permutation drawn
per epoch from a generator seeded with ``draw_seed(seed, generation, epoch)``; the random-resized crops and
flips of a training batch are drawn on the device from the counter-based key ``draw_seed(seed, generation,
epoch, batch)`` (stream: the DDP rank), by the fused Triton kernel on CUDA (``ke_fast.kernels.augment``) and by
its batched PyTorch twin elsewhere, with no host work and no host read per step. A resumed run therefore
sees the very batches it would have seen. ``epoch(..., pairs=True)`` makes CS-KD batches (Yun et al., CVPR
2020): the first half from the epoch's order, the second half one random image of the same class for each.
"""
from __future__ import annotations

import itertools
import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from . import kernels as K
from .imageset import IMAGENET_MEAN, IMAGENET_STD, ImageSet
from .kernels import augment as A
from .kernels import reference
from .kernels.augment import CROP_RATIO, CROP_SCALE, CROP_TRIES  # noqa: F401  (their old home)

_M62 = (1 << 62) - 1
PAIR_STREAM = 1 << 32  # Philox stream of the CS-KD partners (augmentation uses the streams 0 .. world-1)


def draw_seed(seed: int, generation: int, epoch: int, batch: int = -1) -> int:
    """The seed of one epoch's order (``batch`` -1) or of one batch's augmentation: counter-based, from the
    same splitmix64 streams as the masks and resets."""
    s = K.stream_id(seed & _M62, generation, epoch)
    return s & _M62 if batch < 0 else K.stream_id(s & _M62, batch, 0) & _M62


@dataclass
class _Items:
    """Items of a data set of images: item i is image ``index[i]`` of ``parts[part[i]]``, label ``labels[i]``."""
    parts: list[ImageSet]
    part: torch.Tensor
    index: torch.Tensor
    labels: torch.Tensor

    def select(self, idx: torch.Tensor, labels: torch.Tensor | None = None) -> "_Items":
        return _Items(self.parts, self.part[idx], self.index[idx], self.labels[idx] if labels is None else labels)


@dataclass
class EpochPlan:
    """An epoch as device tensors (:meth:`Batches.plan`, :func:`eval_plan`): ``order`` int64 [steps,
    width] (row b: batch b's positions, then padding), ``keys`` int64 [steps], ``sizes`` the length of each batch
    (host ints, known without reading the device), ``valid`` bool [steps, width] (evaluation plans)."""
    order: torch.Tensor
    keys: torch.Tensor
    sizes: list[int]
    valid: torch.Tensor | None = None


def image_items(data: Dataset) -> _Items | None:
    """The images behind ``data`` (an ImageSet, or a Subset / ConcatDataset / class subset of them: any data
    set with ``data``, ``indices`` and ``labels`` tensors), or None when it is not made of ImageSets."""
    if isinstance(data, ImageSet):
        n = len(data)
        return _Items([data], torch.zeros(n, dtype=torch.int64), torch.arange(n), data.labels)
    if isinstance(data, Subset):
        inner = image_items(data.dataset)
        return None if inner is None else inner.select(torch.as_tensor(list(data.indices), dtype=torch.int64))
    if isinstance(data, ConcatDataset):
        inner = [image_items(d) for d in data.datasets]
        if any(i is None for i in inner):
            return None
        parts, shift, out = [], 0, []
        for i in inner:
            parts += i.parts
            out.append(i.part + shift)
            shift += len(i.parts)
        return _Items(parts, torch.cat(out), torch.cat([i.index for i in inner]), torch.cat([i.labels for i in inner]))
    indices, labels = getattr(data, "indices", None), getattr(data, "labels", None)
    if hasattr(data, "data") and isinstance(indices, torch.Tensor) and isinstance(labels, torch.Tensor):
        inner = image_items(data.data)  # e.g. ke_fast.metric.ClassSubset: its own labels
        return None if inner is None else inner.select(indices.to(torch.int64), labels.to(torch.int64))
    return None


def _store(parts: list[ImageSet]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ragged store of every part (evaluation splits' centre views as square images): (pixels, offsets,
    shapes, first image of each part). A single training split is used as it is, without a copy."""
    pix, offs, shapes, starts, base, count = [], [], [], [], 0, 0
    for p in parts:
        if p.pixels is not None:
            x, o, s = p.pixels, p.offsets, p.shapes
        else:
            v = p.images
            x = torch.cat([v.permute(0, 2, 3, 1).reshape(-1), torch.zeros(A.tail_bytes(p.size), dtype=torch.uint8)])
            o = torch.arange(len(v), dtype=torch.int64) * (3 * p.size * p.size)
            s = torch.full((len(v), 2), p.size, dtype=torch.int64)
        pix.append(x)
        offs.append(o + base)
        shapes.append(s)
        starts.append(count)
        base, count = base + len(x), count + len(o)
    if len(parts) == 1:
        return pix[0], offs[0], shapes[0], torch.zeros(1, dtype=torch.int64)
    shapes = torch.cat(shapes)
    tail = torch.zeros(A.tail_bytes(int(shapes[:, 1].max())), dtype=torch.uint8)  # for the widest image of all
    return torch.cat([*pix, tail]), torch.cat(offs), shapes, torch.tensor(starts, dtype=torch.int64)


def _as_tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of a map-style data set of anything but images, as two tensors."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    if isinstance(data, Subset):
        x, y = _as_tensors(data.dataset)
        idx = torch.as_tensor(data.indices, dtype=torch.int64)
        return x[idx], y[idx]
    items = [data[i] for i in range(len(data))]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def _prefetch(cuts: list[torch.Tensor], gather: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
              device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """Host-resident data: a thread gathers each batch (``gather``: into pinned memory for CUDA) two batches
    ahead; the copy to the device is asynchronous (the caching host allocator keeps a buffer until its copy is
    done). The thread ends with the epoch, or as soon as the consumer stops early."""
    ready: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def work() -> None:
        try:
            for pos in cuts:
                item = gather(pos)
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            ready.put(exc)

    thread = threading.Thread(target=work, name="ke_fast-prefetch", daemon=True)
    thread.start()
    try:
        for _ in cuts:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield tuple(t.to(device, non_blocking=True) for t in item)
    finally:
        stop.set()
        thread.join()


def _class_index(y: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """(labels, items sorted by class, count and first position of each class) on the host, or None when the
    labels are no class labels (floats, negative integers)."""
    labels = y.cpu()
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return None
    labels = labels.to(torch.int64)
    try:
        count = torch.bincount(labels, minlength=1)
    except RuntimeError:  # negative labels
        return None
    return labels, torch.argsort(labels, stable=True), count, count.cumsum(0) - count


def eval_plan(b: "Batches", chunk: int) -> EpochPlan:
    """Every item of evaluation batches ``b`` (resident on the device) in order, in rows of ``chunk`` positions
    (the last row padded with position 0): what a graphed evaluation reads; ``valid`` marks the real ones."""
    if b.train or not b.resident:
        raise ValueError("eval_plan needs evaluation batches (train=False) resident on the device")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    rows = math.ceil(len(b) / chunk)
    flat = torch.arange(rows * chunk, dtype=torch.int64)
    valid = flat < len(b)
    order = torch.where(valid, flat, 0).view(rows, chunk)
    sizes = [min(chunk, len(b) - r * chunk) for r in range(rows)]
    return EpochPlan(b._to_device(order), b._to_device(torch.zeros(rows, dtype=torch.int64)), sizes,
                     b._to_device(valid.view(rows, chunk)))


def _gather_host(b: "Batches", pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host data: the items ``pos`` copied out (pinned for CUDA); images as a compact store of their own."""
    y = torch.empty(len(pos), dtype=b.y.dtype, pin_memory=b._pin)
    torch.index_select(b.y, 0, pos, out=y)
    if b.augment:
        ids = b.items[pos]
        offs, shapes = b.offsets[ids], b.shapes[ids]
        sizes = 3 * shapes[:, 0] * shapes[:, 1]
        pixels = torch.zeros(int(sizes.sum()) + A.tail_bytes(b.max_width), dtype=torch.uint8,
                             pin_memory=b._pin)
        start = 0
        for o, n in zip(offs.tolist(), sizes.tolist()):
            pixels[start:start + n] = b.pixels[o:o + n]
            start += n
        new_offs = sizes.cumsum(0) - sizes
        return pixels, new_offs, shapes, torch.arange(len(pos)), y
    ids = pos if b.items is None else b.items[pos]
    x = torch.empty((len(ids), *b.x.shape[1:]), dtype=b.x.dtype, pin_memory=b._pin)
    torch.index_select(b.x, 0, ids, out=x)
    return x, y


class Batches:
    """One data set as tensors, cut into batches on ``device``.

    Args:
        data: the data set (see the module docstring for what becomes of it).
        device: where batches are used.
        train: training batches (shuffled; images get the random-resized crop and flip) or evaluation
            batches (in order; images: their centre views).
        device_fraction: keep the tensors on a CUDA device when they take at most this fraction of its memory;
            0: never (on CPU too: the prefetching thread then runs, as for a data set too large for the GPU).
        rank, world: this process's share of every epoch (DistributedSampler's rule: the permutation padded by
            wrapping to a multiple of ``world``, every ``world``-th index from ``rank``).
        channels_last: 4-d batches in channels_last memory format.
    """

    def __init__(self, data: Dataset, device: torch.device, train: bool, device_fraction: float = 0.5,
                 rank: int = 0, world: int = 1, channels_last: bool = False) -> None:
        if not (0 <= rank < world):
            raise ValueError(f"rank must be in 0 .. world-1, got rank {rank} of world {world}")
        self.device, self.train, self.rank, self.world = torch.device(device), train, rank, world
        self.channels_last = channels_last
        items = image_items(data)
        self.image = items is not None
        self.augment = self.image and train
        if self.image:
            sizes = {p.size for p in items.parts}
            if len(sizes) != 1:
                raise ValueError(f"the images of one data set must share one size, got {sorted(sizes)}")
            self.size, self.resize = items.parts[0].size, items.parts[0].resize
            y = items.labels
            if self.augment:
                pixels, offsets, shapes, starts = _store(items.parts)
                A.check_store(pixels, offsets, shapes)
                self.max_side, self.max_width = int(shapes.max()), int(shapes[:, 1].max())
                tensors = [pixels, offsets, shapes, starts[items.part] + items.index]
            else:
                parts = [p.images for p in items.parts]
                starts = torch.tensor([0, *torch.tensor([len(v) for v in parts]).cumsum(0)[:-1].tolist()])
                tensors = [parts[0] if len(parts) == 1 else torch.cat(parts), starts[items.part] + items.index]
        else:
            self.size = None
            x, y = _as_tensors(data)
            tensors = [x]
        nbytes = sum(t.numel() * t.element_size() for t in (*tensors, y))
        if self.device.type == "cuda":
            self.resident = nbytes <= device_fraction * torch.cuda.get_device_properties(self.device).total_memory
        else:
            self.resident = device_fraction > 0
        self._pin = self.device.type == "cuda" and not self.resident
        if self.resident:
            tensors, y = [t.to(self.device) for t in tensors], y.to(self.device)
        elif self._pin:
            tensors, y = [t.contiguous().pin_memory() for t in tensors], y.pin_memory()
        self.y = y
        if self.augment:
            self.pixels, self.offsets, self.shapes, self.items = tensors
        elif self.image:
            self.x, self.items = tensors
        else:
            self.x, self.items = tensors[0], None
        if self.image:
            mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
            self._scale, self._shift = 1 / (255 * std), -mean / std
            self._norm = (tuple(1 / (255 * s) for s in IMAGENET_STD),
                          tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)))
        self._classes = _class_index(y) if train else None  # for CS-KD pairs
        if self.augment and self.device.type == "cuda":
            from .kernels import augment_triton
            augment_triton.constants(self.device)  # made now: never inside a captured graph

    def __len__(self) -> int:
        return len(self.y)

    def steps(self, batch_size: int) -> int:
        """Batches per epoch on this rank."""
        return math.ceil(math.ceil(len(self) / self.world) / batch_size)

    def _order(self, seed: int, generation: int, epoch: int, pairs: bool) -> torch.Tensor:
        """This rank's items of an epoch, in order: int64 [n] (or [n, 2]: anchor and CS-KD partner)."""
        n = len(self)
        if not self.train:
            return torch.arange(n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(draw_seed(seed, generation, epoch)))
        if self.world > 1:
            total = math.ceil(n / self.world) * self.world
            order = torch.cat([order, order[: total - n]])
        if pairs:
            if self._classes is None:
                raise ValueError("pairs=True (CS-KD) needs class labels (integers >= 0)")
            labels, by_class, count, start = self._classes
            u = reference.random_bits(0, len(order), draw_seed(seed, generation, epoch), PAIR_STREAM)
            label = labels[order]
            pick = ((u >> 8) * count[label]) >> 24  # floor(uniform * count), exact in int64
            order = torch.stack([order, by_class[start[label] + pick]], 1)
        return order[self.rank::self.world]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device, copied asynchronously (pinned first on CUDA: no host sync)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _cuts(self, batch_size: int, seed: int, generation: int, epoch: int, pairs: bool
              ) -> tuple[list[torch.Tensor], list[int] | None]:
        """An epoch's batches as host positions (pairs: anchors, then partners) and, for augmented batches,
        their keys ``draw_seed(seed, generation, epoch, b)``."""
        if pairs and not self.train:
            raise ValueError("pairs=True makes CS-KD training batches; these are evaluation batches (train=False)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = self._order(seed, generation, epoch, pairs)
        cuts = [order[s:s + batch_size].t().reshape(-1) for s in range(0, len(order), batch_size)]
        keys = [draw_seed(seed, generation, epoch, b) for b in range(len(cuts))] if self.augment else None
        return cuts, keys

    def plan(self, batch_size: int, seed: int = 0, generation: int = 0, epoch: int = 0, pairs: bool = False
             ) -> EpochPlan:
        """The epoch of :meth:`epoch` as device tensors a captured graph reads (resident data only): row b of
        ``order`` holds batch b's positions (``sizes[b]`` of them, the rest 0), ``keys[b]`` its augmentation
        key (0 where batches are not augmented). :meth:`make` of row b's first ``sizes[b]`` positions and key b
        is batch b of :meth:`epoch`. Two host-to-device copies, no host read."""
        if not self.resident:
            raise ValueError("Batches.plan needs data resident on the device (device_fraction large enough)")
        cuts, keys = self._cuts(batch_size, seed, generation, epoch, pairs)
        sizes = [len(c) for c in cuts]
        order = pad_sequence(cuts, batch_first=True) if cuts else torch.zeros(0, 0, dtype=torch.int64)  # 0-padded
        keys_t = torch.tensor(keys if keys is not None else [0] * len(cuts), dtype=torch.int64)
        return EpochPlan(self._to_device(order), self._to_device(keys_t), sizes)

    def make(self, positions: torch.Tensor, key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of the items at device ``positions`` (resident data), training images augmented with
        the key in ``key`` (int64 [1] on the device): device ops only, no host read (a CUDA graph captures it),
        equal to :meth:`epoch`'s batch of those items and key (the CPU path draws with the key as a tensor)."""
        g = self._gather(positions)
        if self.augment and key is None:
            raise ValueError("training images need their augmentation key (an int64 [1] device tensor)")
        return self._finish(g, None if key is None else (key, key)), g[-1]

    def epoch(self, batch_size: int, seed: int = 0, generation: int = 0, epoch: int = 0, pairs: bool = False
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches (inputs, labels) of one epoch on the device, ready for the model.

        ``pairs`` (training only; CS-KD): each batch holds up to ``batch_size`` items of the epoch's order and
        then, in the same order, one item of the same class for each (drawn with key ``draw_seed(seed,
        generation, epoch)``; possibly the item itself, as CS-KD's sampler), so batches are twice as large."""
        cuts, keys = self._cuts(batch_size, seed, generation, epoch, pairs)
        device_keys = self._to_device(torch.tensor(keys, dtype=torch.int64)) \
            if keys and self.device.type == "cuda" else None
        if self.resident:
            order = self._to_device(torch.cat(cuts)) if cuts else torch.zeros(0, dtype=torch.int64)
            bounds = [0, *itertools.accumulate(len(c) for c in cuts)]
            gathered = (self._gather(order[bounds[b]:bounds[b + 1]]) for b in range(len(cuts)))
        else:
            gathered = _prefetch(cuts, lambda pos: _gather_host(self, pos), self.device)
        for b, g in enumerate(gathered):
            key = None if keys is None else (keys[b], None if device_keys is None else device_keys[b:b + 1])
            yield self._finish(g, key), g[-1]

    def batch(self, positions: torch.Tensor, seed: int = 0, generation: int = 0, epoch: int = 0, batch: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the items at ``positions`` (int64 indices into the data set), augmented (training
        images) with the key of (seed, generation, epoch, batch): what :meth:`epoch` yields for those items."""
        positions = torch.as_tensor(positions, dtype=torch.int64)
        g = self._gather(positions.to(self.device)) if self.resident else _gather_host(self, positions)
        if not self.resident:
            g = tuple(t.to(self.device) for t in g)
        key = draw_seed(seed, generation, epoch, batch)
        device_key = torch.tensor([key], device=self.device) if self.augment and self.device.type == "cuda" else None
        return self._finish(g, (key, device_key) if self.augment else None), g[-1]

    def _gather(self, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Resident data: (store tensors, image ids, labels) or (inputs, labels) of the items ``pos``."""
        y = self.y.index_select(0, pos)
        if self.augment:
            return self.pixels, self.offsets, self.shapes, self.items.index_select(0, pos), y
        ids = pos if self.items is None else self.items.index_select(0, pos)
        return self.x.index_select(0, ids), y

    def _finish(self, g: tuple[torch.Tensor, ...], key: tuple[int, torch.Tensor | None] | None) -> torch.Tensor:
        """Gathered items -> model inputs: training images cropped, resized, flipped and normalised (one Triton
        launch on CUDA), evaluation images normalised; other inputs pass unchanged."""
        if self.augment:
            pixels, offsets, shapes, ids, _ = g
            if self.device.type == "cuda":
                fmt = torch.channels_last if self.channels_last else torch.contiguous_format
                out = torch.empty(len(ids), 3, self.size, self.size, device=self.device, memory_format=fmt)
                return A.augment_triton(out, pixels, offsets, shapes, ids, key[1], self.rank, self.size,
                                        self.resize, *self._norm)
            x = A.random_resized_crop(pixels, offsets, shapes, ids, key[0], self.rank, self.size, self.max_side,
                                      self.max_width)
            x = torch.addcmul(self._shift, x, self._scale)
        elif self.image:
            x = torch.addcmul(self._shift, g[0].float(), self._scale)
        else:
            x = g[0]
        if x.dim() == 4 and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
