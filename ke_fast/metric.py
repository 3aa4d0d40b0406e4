"""Metric learning for KE: a class-disjoint split, the normalised-softmax loss and Recall@K.

The network's last layer is the embedding head (``num_classes=embedding_dim`` for the models of
:mod:`ke_fast.models`); its output is L2-normalised by :func:`embed`, in training and evaluation alike.
The loss is the normalised softmax of Zhai & Wu, "Classification is a Strong Baseline for Deep Metric
Learning", BMVC 2019 (the same as Proxy-NCA++ without its hyper-parameters, Teh et al., ECCV 2020): one
learnable proxy per training class, logits = cos(embedding, proxy) / T with T = 0.05, cross-entropy. The
proxies are no part of the network: they are not masked, never reset, and kept across generations.
Evaluation follows the usual protocol (e.g. CUB-200 / Cars-196): classes never seen in training, Recall@K =
the fraction of test images whose K nearest other test images (cosine) include one of their class.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from .data import ImageSet

RECALL_AT = (1, 4)
TEMPERATURE = 0.05


def __getattr__(name: str) -> object:
    """``TASKS`` moved to :data:`ke_fast.tasks.TASKS` (the registry of task classes); the old tuple of names
    stays readable here."""
    if name == "TASKS":
        from .tasks import TASKS
        return tuple(TASKS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def embed(out: torch.Tensor) -> torch.Tensor:
    """The L2-normalised embedding of a network output (fp32)."""
    return F.normalize(out.float().flatten(1), dim=1)


class NormSoftmaxLoss(nn.Module):
    """Normalised-softmax loss (Zhai & Wu, BMVC 2019): cross-entropy of cos(embedding, proxy) / temperature
    over one proxy per training class. The proxies are drawn from ``seed`` (torch's CPU generator)."""

    def __init__(self, num_classes: int, embedding_dim: int, seed: int = 0, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        g = torch.Generator().manual_seed(seed)
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim, generator=g))
        self.temperature = float(temperature)

    def forward(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if out.shape[-1] != self.proxies.shape[1]:
            raise ValueError(f"the network outputs {out.shape[-1]} features, the loss expects embeddings of "
                             f"{self.proxies.shape[1]}")
        logits = embed(out) @ F.normalize(self.proxies, dim=1).T / self.temperature
        return F.cross_entropy(logits, labels)


@torch.no_grad()
def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = RECALL_AT,
                chunk: int = 1024) -> dict[str, float]:
    """``{"recall1": ..., "recall4": ...}``: the fraction of rows whose ``k`` nearest other rows (by dot
    product: cosine for normalised embeddings) include one of the same label. Rows are compared ``chunk``
    at a time against all others (memory ``chunk x n``)."""
    n, kmax = len(embeddings), max(ks)
    if n <= kmax:
        raise ValueError(f"Recall@{kmax} needs more than {kmax} embeddings, got {n}")
    labels = labels.to(embeddings.device)
    hits = {k: 0 for k in ks}
    for start in range(0, n, chunk):
        sim = embeddings[start:start + chunk] @ embeddings.T
        rows = torch.arange(start, min(start + chunk, n), device=embeddings.device)
        sim[rows - start, rows] = -math.inf  # never oneself
        nearest = sim.topk(kmax, dim=1).indices
        same = labels[nearest] == labels[rows].unsqueeze(1)
        for k in ks:
            hits[k] += int(same[:, :k].any(dim=1).sum())
    return {f"recall{k}": hits[k] / n for k in ks}


# ---- class-disjoint data --------------------------------------------------------------------------

def labels_of(data: Dataset) -> torch.Tensor:
    """The int64 labels of a data set of (input, label), without decoding where they are at hand (a
    TensorDataset, a :class:`ke_fast.data.ImageSet`, a :class:`ClassSubset`, a Subset or ConcatDataset of those);
    otherwise by reading every item."""
    if isinstance(data, ClassSubset | ImageSet):
        return data.labels
    if isinstance(data, TensorDataset):
        return data.tensors[-1].to(torch.int64).reshape(-1)
    if isinstance(data, ConcatDataset):
        return torch.cat([labels_of(d) for d in data.datasets])
    if isinstance(data, Subset):
        return labels_of(data.dataset)[torch.as_tensor(list(data.indices), dtype=torch.int64)]
    return torch.tensor([int(data[i][1]) for i in range(len(data))], dtype=torch.int64)


class ClassSubset(Dataset):
    """The items of ``data`` whose label is one of ``classes``, relabelled 0 .. len(classes)-1 in that order.

    ``labels`` holds the new labels, ``indices`` the positions in ``data``, ``classes`` the original ones."""

    def __init__(self, data: Dataset, classes: Sequence[int]) -> None:
        self.data, self.classes = data, [int(c) for c in classes]
        original = labels_of(data)
        if len(set(self.classes)) != len(self.classes) or min(self.classes, default=0) < 0:
            raise ValueError(f"classes must be distinct labels >= 0, got {self.classes}")
        new = torch.full((max([*self.classes, *original.tolist(), -1]) + 1,), -1, dtype=torch.int64)
        new[torch.tensor(self.classes, dtype=torch.int64)] = torch.arange(len(self.classes))
        keep = torch.isin(original, torch.tensor(self.classes, dtype=torch.int64))
        self.indices = keep.nonzero().flatten()
        self.labels = new[original[self.indices]]

    def fingerprint(self) -> str:
        """The classes, the chosen positions and the parent's own fingerprint (see evolve.data_fingerprint)."""
        h = hashlib.sha256(f"{self.classes}".encode() + self.indices.numpy().tobytes())
        parent = getattr(self.data, "fingerprint", None)
        if callable(parent):
            h.update(parent().encode())
        elif isinstance(self.data, ConcatDataset):
            for d in self.data.datasets:
                h.update(d.fingerprint().encode() if callable(getattr(d, "fingerprint", None)) else b"")
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data[int(self.indices[i])][0]
        return x, self.labels[i]


def class_split(*parts: Dataset) -> tuple[ClassSubset, ClassSubset]:
    """Pool ``parts`` (e.g. a classification data set's train and test sets) and split them by class: the
    first half of the sorted classes (rounded down) trains, the rest is the test set, every image of them.
    Raises ValueError unless both halves hold 2 classes or more and every test class 2 images or more."""
    pool = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    labels = labels_of(pool)
    classes = torch.unique(labels).tolist()
    if len(classes) < 4:
        raise ValueError(f"a metric-learning split needs 4 classes or more (2 to train, 2 to test), got {len(classes)}")
    half = len(classes) // 2
    train, test = ClassSubset(pool, classes[:half]), ClassSubset(pool, classes[half:])
    counts = torch.bincount(test.labels, minlength=len(test.classes))
    if int(counts.min()) < 2:
        raise ValueError(f"test class {test.classes[int(counts.argmin())]} has {int(counts.min())} image(s); "
                         f"Recall@K needs 2 or more per class")
    return train, test
