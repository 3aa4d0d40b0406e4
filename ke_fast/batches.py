"""Batches cut from tensors with batched tensor ops: no DataLoader, no per-item Python work per step.

A data set is turned into tensors once (:class:`Batches`): an :class:`ke_fast.data.ImageSet` keeps its uint8
images, a TensorDataset its tensors, any other map-style data set is read item by item once and stacked
(so an item that is random is drawn once). The tensors live on the training device when they fit in
``device_fraction`` of its memory (on CPU: unless ``device_fraction`` is 0), else in host memory (pinned for
CUDA) with a background thread that gathers the next batches while the current one trains.

Every batch is a pure function of (seed, generation, epoch, batch index): the order is a permutation drawn
per epoch from a generator seeded with (seed, generation, epoch), and the random-resized crop and flip of a
training ImageSet come from one draw per batch seeded with (seed, generation, epoch, batch). A resumed run
therefore sees the very batches it would have seen, on any device.
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from . import kernels as K
from .data import IMAGENET_MEAN, IMAGENET_STD, ImageSet

_M62 = (1 << 62) - 1
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults: area fraction and aspect ratio
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10


def draw_seed(seed: int, generation: int, epoch: int, batch: int = -1) -> int:
    """The seed of one epoch's order (``batch`` -1) or of one batch's augmentation: counter-based, from the
    same splitmix64 streams as the masks and resets."""
    s = K.stream_id(seed & _M62, generation, epoch)
    return s & _M62 if batch < 0 else K.stream_id(s & _M62, batch, 0) & _M62


def crop_boxes(u: torch.Tensor, side: int) -> torch.Tensor:
    """Random-resized-crop boxes and flips from uniform draws ``u`` [B, 2 * CROP_TRIES + 3] (float64):
    [B, 2, 3] affine matrices for ``F.affine_grid`` on a ``side`` x ``side`` image.

    torchvision's rule, batched: CROP_TRIES (area fraction, log aspect ratio) candidates per image, the first
    whose box fits is taken, else the whole (square) image; the box's position is uniform; flip with p 1/2."""
    b = u.shape[0]
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, :CROP_TRIES]
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(lo + (hi - lo) * u[:, CROP_TRIES:2 * CROP_TRIES])
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # fractions of the side
    fits = (w <= 1) & (h <= 1)
    first = torch.where(fits.any(1), fits.int().argmax(1), 0)
    ok = fits.any(1)
    w = torch.where(ok, w.gather(1, first[:, None])[:, 0], torch.ones(b, dtype=u.dtype))
    h = torch.where(ok, h.gather(1, first[:, None])[:, 0], torch.ones(b, dtype=u.dtype))
    # quantise to whole pixels, as torchvision does, then place the box uniformly
    w, h = (w * side).round().clamp(1, side) / side, (h * side).round().clamp(1, side) / side
    left, top = u[:, -3] * (1 - w), u[:, -2] * (1 - h)
    flip = torch.where(u[:, -1] < 0.5, -1.0, 1.0).to(u.dtype)
    theta = torch.zeros(b, 2, 3, dtype=u.dtype)
    theta[:, 0, 0] = w * flip  # affine_grid maps the output's [-1, 1] onto the box; a negative scale mirrors
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    return theta.float()


def _as_tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of a map-style data set as two tensors, without decoding an ImageSet again."""
    if isinstance(data, ImageSet):
        return data.images, data.labels
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    if isinstance(data, Subset):
        x, y = _as_tensors(data.dataset)
        idx = torch.as_tensor(data.indices, dtype=torch.int64)
        return x[idx], y[idx]
    items = [data[i] for i in range(len(data))]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


class Batches:
    """One data set as tensors, cut into batches on ``device``.

    Args:
        data: the data set (see the module docstring for what becomes of it).
        device: where batches are used.
        train: training batches (shuffled; a training ImageSet is augmented) or evaluation batches (in order).
        device_fraction: keep the tensors on a CUDA device when they take at most this fraction of its memory;
            0: never (on CPU too: the prefetching thread then runs, as for a data set too large for the GPU).
        rank, world: this process's share of every epoch (DistributedSampler's rule: the permutation padded by
            wrapping to a multiple of ``world``, every ``world``-th index from ``rank``).
        channels_last: 4-d batches in channels_last memory format.
    """

    def __init__(self, data: Dataset, device: torch.device, train: bool, device_fraction: float = 0.5,
                 rank: int = 0, world: int = 1, channels_last: bool = False) -> None:
        self.device, self.train, self.rank, self.world = torch.device(device), train, rank, world
        self.channels_last = channels_last
        x, y = _as_tensors(data)
        self.image = isinstance(data, ImageSet) or (isinstance(data, Subset) and isinstance(data.dataset, ImageSet))
        base = data.dataset if isinstance(data, Subset) else data
        self.augment = self.image and base.train and train
        self.size = base.size if self.image else None
        nbytes = x.numel() * x.element_size() + y.numel() * y.element_size()
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            self.resident = nbytes <= device_fraction * total
        else:
            self.resident = device_fraction > 0
        self._pin = self.device.type == "cuda" and not self.resident
        if self.resident:
            self.x, self.y = x.to(self.device), y.to(self.device)
        elif self._pin:
            self.x, self.y = x.contiguous().pin_memory(), y.pin_memory()
        else:
            self.x, self.y = x.contiguous(), y
        if self.image:
            mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
            self._scale, self._shift = 1 / (255 * std), -mean / std

    def __len__(self) -> int:
        return len(self.y)

    def steps(self, batch_size: int) -> int:
        """Batches per epoch on this rank."""
        return math.ceil(math.ceil(len(self) / self.world) / batch_size)

    def _order(self, seed: int, generation: int, epoch: int) -> torch.Tensor:
        n = len(self)
        if not self.train:
            return torch.arange(n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(draw_seed(seed, generation, epoch)))
        if self.world > 1:
            total = math.ceil(n / self.world) * self.world
            order = torch.cat([order, order[: total - n]])[self.rank::self.world]
        return order

    def epoch(self, batch_size: int, seed: int = 0, generation: int = 0, epoch: int = 0
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches (inputs, labels) of one epoch on the device, ready for the model."""
        order = self._order(seed, generation, epoch)
        starts = range(0, len(order), batch_size)
        if self.resident:
            order = order.to(self.device, non_blocking=True)
            gathered = ((self.x.index_select(0, order[s:s + batch_size]),
                         self.y.index_select(0, order[s:s + batch_size])) for s in starts)
        else:
            gathered = self._prefetch([order[s:s + batch_size] for s in starts])
        for b, (x, y) in enumerate(gathered):
            yield self._finish(x, seed, generation, epoch, b), y

    def _prefetch(self, indices: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Host-resident data: a thread gathers each batch (into pinned memory for CUDA) two batches ahead; the
        copy to the device is asynchronous (the caching host allocator keeps a buffer until its copy is done).
        The thread ends with the epoch, or as soon as the consumer stops early."""
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def gather() -> None:
            try:
                for idx in indices:
                    xb = torch.empty((len(idx), *self.x.shape[1:]), dtype=self.x.dtype, pin_memory=self._pin)
                    yb = torch.empty(len(idx), dtype=self.y.dtype, pin_memory=self._pin)
                    torch.index_select(self.x, 0, idx, out=xb)
                    torch.index_select(self.y, 0, idx, out=yb)
                    while not stop.is_set():
                        try:
                            ready.put((xb, yb), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:  # handed to the consumer, which raises it
                ready.put(exc)

        thread = threading.Thread(target=gather, name="ke_fast-prefetch", daemon=True)
        thread.start()
        try:
            for _ in indices:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield item[0].to(self.device, non_blocking=True), item[1].to(self.device, non_blocking=True)
        finally:
            stop.set()
            thread.join()

    def _finish(self, x: torch.Tensor, seed: int, generation: int, epoch: int, batch: int) -> torch.Tensor:
        """uint8 images -> augmented (training) and normalised floats; other inputs pass unchanged."""
        if self.image:
            if self.augment:
                g = torch.Generator().manual_seed(draw_seed(seed, generation, epoch, batch))
                u = torch.rand(len(x), 2 * CROP_TRIES + 3, generator=g, dtype=torch.float64)
                theta = crop_boxes(u, x.shape[-1]).to(self.device, non_blocking=True)
                grid = F.affine_grid(theta, [len(x), 3, self.size, self.size], align_corners=False)
                x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
            else:  # in order, e.g. a training ImageSet evaluated: its centre ``size`` crop
                o = (x.shape[-1] - self.size) // 2
                x = x[:, :, o:o + self.size, o:o + self.size].float()
            x = torch.addcmul(self._shift, x, self._scale)
        if x.dim() == 4 and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
