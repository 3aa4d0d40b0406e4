"""What a KE run learns and how it is scored: one :class:`Task` per task (Lightning's LightningModule seam).

A Task owns its loss, the trainable parameters it adds beside the network (``criterion``: the metric
task's proxies; optimised with the network, never masked or reset, checkpointed with the run), the
evaluation of a model on batches, its headline metric and how metrics are shown (the command line's table,
the plots, what a study aggregates and whether higher or lower is better), the data it runs on by default
and the size of the model's output. The generation loop (:class:`ke_fast.evolve.Evolution`), the study and
the command line call these and never ask which task runs: a new task is one class here and one entry in
:data:`TASKS`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from . import metric

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Forward = Callable[[torch.Tensor], torch.Tensor]


def _output_size(model: nn.Module, example: torch.Tensor) -> int:
    """The number of features the model outputs per sample (one eval-mode forward of ``example``)."""
    was_training = model.training
    with torch.no_grad():
        size = model.eval()(example).flatten(1).shape[1]
    model.train(was_training)
    return size


class Task:
    """The base of every task; a subclass sets the class attributes and overrides :meth:`loss` and
    :meth:`evaluate` (and :meth:`setup` when it trains parameters of its own).

    Class attributes: ``name`` (its key in :data:`TASKS`); ``key`` / ``metric_name``: the headline metric
    (the history holds ``dense_<key>`` and ``fit_<key>``) and ``higher_is_better``; ``percent``: metrics are
    fractions shown x100 with "%"; ``label``: the caption of plots and tables; ``columns``: ``(history key,
    header)`` of the command line's table; ``plotted``: ``(metric, name)`` of the metrics the run's plot shows
    (one scale; the headline first); ``dataset``: the bundled data set it runs on by default and
    ``images``: whether it also runs on image folders; ``embedding_default``: not None when the model's
    output is an embedding of a chosen size; ``own_split``: not None (saying how) when it splits the pooled
    data by itself."""

    name: ClassVar[str] = ""
    key: ClassVar[str] = ""
    metric_name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    percent: ClassVar[bool] = True
    label: ClassVar[str] = ""
    columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    plotted: ClassVar[tuple[tuple[str, str], ...]] = ()
    dataset: ClassVar[str] = "digits"
    images: ClassVar[bool] = True
    embedding_default: ClassVar[int | None] = None
    own_split: ClassVar[str | None] = None

    def __init__(self, config: Any) -> None:
        self.config = config
        self.criterion: nn.Module | None = None  # the loss, where it has parameters of its own

    # -- data and model ---------------------------------------------------------------------------
    @classmethod
    def outputs(cls, classes: int, embedding_dim: int | None = None) -> int:
        """The model's output size for data of ``classes`` classes (or targets)."""
        return classes

    @classmethod
    def prepare(cls, train: Dataset, test: Dataset) -> tuple[Dataset, Dataset]:
        """The task's (train, test) from a data set's; raises ValueError when they do not suit the task."""
        return train, test

    @classmethod
    def describe(cls, train: Dataset, test: Dataset) -> str:
        """What the command line's header adds about the data (e.g. the classes of each side)."""
        return ""

    def check_data(self, train_set: Dataset, test_set: Dataset) -> None:
        """Raise ValueError when the data cannot be scored by this task."""

    def setup(self, model: nn.Module, train_set: Dataset, example: Callable[[], torch.Tensor],
              device: torch.device) -> None:
        """Before training: make the task's own parameters (``criterion``); ``example()`` is one test input."""

    # -- training ---------------------------------------------------------------------------------
    @property
    def pairs(self) -> bool:
        """Whether training batches are same-class pairs (:meth:`ke_fast.batches.Batches.epoch`'s ``pairs``)."""
        return False

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch; ``forward`` runs the network (a task whose loss needs more than one
        forward, as CS-KD's, overrides this)."""
        return self.loss(forward(x), y)

    def parameters(self) -> list[nn.Parameter]:
        """The task's trainable parameters, optimised with the network's."""
        return [] if self.criterion is None else list(self.criterion.parameters())

    def state_dict(self) -> dict | None:
        return None if self.criterion is None else self.criterion.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """Restore :meth:`state_dict`; raises ValueError when the task has state and ``state`` is None."""
        if self.criterion is None:
            return
        if state is None:
            raise ValueError(f"it holds no state of the {self.name} task's loss ({type(self.criterion).__name__})")
        self.criterion.load_state_dict(state)

    # -- scoring ----------------------------------------------------------------------------------
    def evaluate(self, forward: Forward, batches: Batches) -> dict[str, float]:
        """The task's metrics of ``forward`` (the model as it is) over ``batches`` of (input, target)."""
        raise NotImplementedError

    def scores(self, forward: Forward, splits: dict[str, Batches]) -> dict[str, float]:
        """:meth:`evaluate` on each split, its metrics prefixed by the split's key (``""``: the test set,
        ``"val_"``: the validation set)."""
        return {prefix + k: v for prefix, batches in splits.items()
                for k, v in self.evaluate(forward, batches).items()}

    def validate(self, scores: dict[str, float], generation: int, epoch: int) -> str:
        """The log line of an evaluation during training (the official code's test_interval): the headline
        metric on the validation and the test split."""
        shown = "   ".join(f"{name} {self.show(scores[key])}" for name, key in
                           (("val", f"val_{self.key}"), ("test", self.key)) if key in scores)
        return f"generation {generation:2d} epoch {epoch}: dense N_g {shown} ({self.metric_name})"

    def report(self, row: dict[str, Any]) -> str:
        """The log line of a generation's history row: the headline metric of N_g and H^F_g, the loss."""
        k, show = self.key, self.show
        return (f"generation {row['generation']:2d}: dense N_g {show(row['dense_' + k])}   fit H^F_g "
                f"{show(row['fit_' + k])} ({self.metric_name})   loss {row['train_loss']:.3f}")

    @classmethod
    def show(cls, value: float) -> str:
        """A metric value in a log line."""
        return f"{100 * value:5.1f} %" if cls.percent else f"{value:6.3f}"

    @classmethod
    def cell(cls, value: float) -> str:
        """A metric value in the command line's table (9 characters)."""
        return f"{100 * value:8.1f}%" if cls.percent else f"{value:9.3f}"

    @classmethod
    def table(cls, history: list[dict]) -> str:
        """The command line's table: the task's columns (metrics of N_g and H^F_g) per generation."""
        columns = [c for c in cls.columns if not history or c[0] in history[0]]  # e.g. val_: when there is one
        widths = [max(9, len(head)) for _, head in columns]
        lines = ["generation | " + " | ".join(head.rjust(w) for (_, head), w in zip(columns, widths))]
        lines += [f"{row['generation']:10d} | " + " | ".join(cls.cell(row[key]).rjust(w)
                                                             for (key, _), w in zip(columns, widths))
                  for row in history]
        return "\n".join(lines)

    @classmethod
    def headline(cls) -> dict[str, Any]:
        """The headline metric as a study's summary records it."""
        return dict(dense=f"dense_{cls.key}", fit=f"fit_{cls.key}", name=cls.metric_name, label=cls.label,
                    percent=cls.percent, higher_is_better=cls.higher_is_better)


CSKD_TEMPERATURE, CSKD_WEIGHT = 4.0, 3.0  # the official trainer: trainers/default_cls.py L16 KDLoss(4), L44-56 "3 *"


def cskd_loss(out: torch.Tensor, partner: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """CS-KD's loss (Yun et al., CVPR 2020; the official KE trainer, trainers/default_cls.py L44-56 with
    layers/CS_KD.py): cross-entropy of ``out`` (the batch's first half) plus 3 x the KL divergence from the
    softened predictions of ``partner`` (a same-class sample each, detached) to ``out``'s, temperature 4,
    summed, times T^2, over the half batch."""
    t = CSKD_TEMPERATURE
    ce = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(out.float() / t, 1), F.softmax(partner.detach().float() / t, 1), reduction="sum")
    return ce + CSKD_WEIGHT * kl * t * t / len(out)


class Classify(Task):
    """Classification: label-smoothed cross-entropy (``config.label_smoothing``), with ``config.regularizer
    == "cskd"`` plus CS-KD on same-class pairs (:func:`cskd_loss`); top-1 and top-5 accuracy, on the test
    and (when the run has one) the validation split."""

    name, key, metric_name, label = "classify", "acc", "top-1", "test top-1 (%)"
    columns = (("dense_acc", "dense N_g"), ("fit_acc", "fit H^F_g"), ("dense_top5", "dense top5"),
               ("fit_top5", "fit top5"), ("dense_val_acc", "val N_g"), ("fit_val_acc", "val H^F_g"),
               ("dense_val_top5", "val N top5"), ("fit_val_top5", "val H top5"))
    plotted = (("acc", "top-1"), ("top5", "top-5"))

    @property
    def pairs(self) -> bool:
        return self.config.regularizer == "cskd"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y, label_smoothing=self.config.label_smoothing)

    def forward_loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.pairs:
            return self.loss(forward(x), y)
        half = len(x) // 2  # the batch maker's pairs: anchors, then one partner of the same class each
        out = forward(x[:half])
        with torch.no_grad():  # as the official trainer: the partners' forward is a second one, without grad
            partner = forward(x[half:])
        return cskd_loss(out, partner, y[:half], self.config.label_smoothing)

    def evaluate(self, forward: Forward, batches: Batches) -> dict[str, float]:
        top1, top5, n = 0, 0, 0  # the counts stay on the device until the end
        for x, y in batches:
            hit1, hit5 = topk_hits(forward(x), y)
            top1, top5 = top1 + hit1.sum(), top5 + hit5.sum()
            n += len(y)
        if n:  # both counts in one read from the device
            top1, top5 = torch.stack([top1, top5]).tolist()
        return {"acc": top1 / max(1, n), "top5": top5 / max(1, n)}


def topk_hits(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (bool [B]): is the label the top-1 class of ``out`` [B, classes], and among its top 5 (all of
    them with fewer classes)? What :meth:`Classify.evaluate` and the graphed evaluation (ke_fast.step) count."""
    hit = out.topk(min(5, out.shape[1]), 1).indices == y[:, None]
    return hit[:, 0], hit.any(1)


class Metric(Task):
    """Metric learning (:mod:`ke_fast.metric`): the model's output is an embedding; the normalised-softmax
    loss over one proxy per training class (the task's parameters); Recall@1 / Recall@4 among the test
    images, whose classes training never saw (:func:`ke_fast.metric.class_split`)."""

    name, key, metric_name = "metric", "recall1", "Recall@1"
    label = "test Recall@1 (%) on classes unseen in training"
    columns = (("dense_recall1", "dense R@1"), ("fit_recall1", "fit R@1"), ("dense_recall4", "dense R@4"),
               ("fit_recall4", "fit R@4"))
    plotted = (("recall1", "Recall@1"), ("recall4", "Recall@4"))
    embedding_default = 64
    own_split = "trains on every image of the first half of the classes"

    @classmethod
    def outputs(cls, classes: int, embedding_dim: int | None = None) -> int:
        return cls.embedding_default if embedding_dim is None else embedding_dim

    @classmethod
    def prepare(cls, train: Dataset, test: Dataset) -> tuple[Dataset, Dataset]:
        return metric.class_split(train, test)

    @classmethod
    def describe(cls, train: Dataset, test: Dataset) -> str:
        return f" (classes {train.classes} / {test.classes})"

    def check_data(self, train_set: Dataset, test_set: Dataset) -> None:
        if len(test_set) <= max(metric.RECALL_AT):
            raise ValueError(f"test_set holds {len(test_set)} images; Recall@{max(metric.RECALL_AT)} needs more")

    def setup(self, model: nn.Module, train_set: Dataset, example: Callable[[], torch.Tensor],
              device: torch.device) -> None:
        classes = int(metric.labels_of(train_set).max()) + 1
        dim = _output_size(model, example())
        self.criterion = metric.NormSoftmaxLoss(classes, dim, seed=self.config.seed).to(device)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(out, y)

    def evaluate(self, forward: Forward, batches: Batches) -> dict[str, float]:
        embeddings, labels = [], []
        for x, y in batches:
            embeddings.append(metric.embed(forward(x)))
            labels.append(y)
        return metric.recall_at_k(torch.cat(embeddings), torch.cat(labels))


class Regression(Task):
    """Regression of one continuous target per sample (e.g. :func:`ke_fast.data.diabetes`, standardised):
    mean squared error; RMSE (headline, lower is better; in the target's units: 1.0 on a target
    standardised with the training statistics is about what predicting the training mean scores) and the
    coefficient of determination R² = 1 - SSE / SST on the test set."""

    name, key, metric_name = "regression", "rmse", "RMSE"
    higher_is_better, percent = False, False
    label = "test RMSE (standardised target; lower is better)"
    columns = (("dense_rmse", "dense RMSE"), ("fit_rmse", "fit RMSE"), ("dense_r2", "dense R²"),
               ("fit_r2", "fit R²"))
    plotted = (("rmse", "RMSE"),)  # R² is on another scale
    dataset, images = "diabetes", False

    def setup(self, model: nn.Module, train_set: Dataset, example: Callable[[], torch.Tensor],
              device: torch.device) -> None:
        size = _output_size(model, example())
        if size != 1:
            raise ValueError(f"task 'regression' predicts one target per sample: the model must output 1 value, "
                             f"it outputs {size}")

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.float().reshape(y.shape), y.float())

    def evaluate(self, forward: Forward, batches: Batches) -> dict[str, float]:
        predicted, targets = [], []
        for x, y in batches:  # fp64 sums: SST of a standardised target is a difference of similar numbers
            predicted.append(forward(x).double().reshape(y.shape))
            targets.append(y.double())
        p, t = torch.cat(predicted), torch.cat(targets)
        sse, sst = float(((p - t) ** 2).sum()), float(((t - t.mean()) ** 2).sum())
        return {"rmse": math.sqrt(sse / len(t)), "r2": 1 - sse / sst if sst > 0 else math.nan}


TASKS: dict[str, type[Task]] = {t.name: t for t in (Classify, Metric, Regression)}


def headline_metric(task: str) -> tuple[str, str]:
    """The headline metric of a task: (history key suffix, its name), e.g. ("acc", "top-1") for "classify",
    ("recall1", "Recall@1") for "metric", ("rmse", "RMSE") for "regression"; the history has
    ``dense_<suffix>`` and ``fit_<suffix>``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    return TASKS[task].key, TASKS[task].metric_name
