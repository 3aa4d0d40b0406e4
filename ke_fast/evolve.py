"""The KE generation loop: train dense -> evaluate N_g and H^F_g -> checkpoint -> reset -> fresh optimizer.

Everything random is derived from the run seed and (generation, epoch): the initial weights, masks
and resets come from the counter RNG, the data order from a generator seeded per epoch and the augmentation
of each batch from one seeded per (generation, epoch, batch) (ke_fast.batches). A resumed run therefore
continues bit for bit, and every DDP rank draws the same masks and resets without talking.

The data are tensors on the device (ke_fast.batches.Batches); the loss is summed on the device and read once
per epoch; checkpoints are copied at a step boundary and written by a background thread.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from . import kernels as K
from . import metric, variants
from .batches import Batches, draw_seed
from .convert import fit_only, reinit_, reset_bn_, split
from .masks import layer_mask, masked_layers

EVOLVE_MODES = ("rand", "zero", "rewind")
CHECKPOINTS = ("last.pt", "prev.pt")
RUN_FILES = (*CHECKPOINTS, "history.csv", "summary.json", "plot.png")  # what a run writes into its folder


@dataclass
class Config:
    """One KE run. Defaults follow the paper (SGD 0.9, wd 1e-4, cosine with 5 warm-up epochs, label
    smoothing 0.1, KELS 0.5) except the sizes, which suit the bundled demo."""

    split: str = "kels"
    split_rate: float = 0.5
    generations: int = 8
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    label_smoothing: float = 0.1
    seed: int = 0
    evolve_mode: str = "rand"  # rand: re-draw H^R; zero: zero it; rewind: back to its generation-0 values
    init: str = "kaiming_normal"  # initial weights (drawn from the counter RNG, so "rewind" needs no copy)
    reset_init: str = "kaiming_uniform_a_sqrt5"  # the official KE reset
    resample_mask: bool = False  # WELS: a new mask every generation (drawn, or re-chosen by mask_criterion)
    reset_bn: bool = False  # reset BatchNorm affine/statistics of reset channels too
    task: str = "classify"  # or "metric": embeddings, normalised-softmax loss, Recall@K (ke_fast.metric)
    reset_from: str | None = None  # layer-threshold forgetting: keep the layers before it, reset it and after
    mask_criterion: str = "random"  # WELS fit mask: random, or the top-k by "magnitude" / "snip" (ke_fast.variants)
    amp: bool | None = None  # bf16 autocast; None = on for CUDA
    channels_last: bool | None = None  # None = on for CUDA

    def validate(self) -> "Config":
        if self.split not in ("kels", "wels"):
            raise ValueError(f"split must be 'kels' or 'wels', got {self.split!r}")
        K.check_split_rate(self.split_rate)
        for name in ("generations", "epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.evolve_mode not in EVOLVE_MODES:
            raise ValueError(f"evolve_mode must be one of {EVOLVE_MODES}, got {self.evolve_mode!r}")
        for name in ("init", "reset_init"):
            if getattr(self, name) not in K.SCHEMES:
                raise ValueError(f"{name} must be one of {K.SCHEMES}, got {getattr(self, name)!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.task not in metric.TASKS:
            raise ValueError(f"task must be one of {metric.TASKS}, got {self.task!r}")
        if self.reset_from is not None and (not isinstance(self.reset_from, str) or not self.reset_from):
            raise ValueError(f"reset_from must be None or a layer name / module prefix, got {self.reset_from!r}")
        variants.check_criterion(self.mask_criterion, self.split)
        return self


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


def save_atomic(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    """torch.save to a temporary file, fsync, then os.replace: a crash never leaves a truncated file.

    With ``keep_previous``, the old ``path`` is moved there once the new file is complete, so at every
    moment at least one of the two holds a whole checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)


def _snapshot(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts / lists / tuples) whose tensors are CPU copies owned by nobody else:
    what a background thread may write while training goes on. One device synchronisation at most."""
    cuda = []

    def copy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.device.type == "cuda":
                cuda.append(x.device)
                return x.detach().to("cpu", non_blocking=True)  # into pinned memory; synchronised below
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(obj)
    for device in set(cuda):
        torch.cuda.synchronize(device)
    return out


class _Writer:
    """Writes one checkpoint at a time in a background thread: :meth:`submit` waits for the previous write,
    :meth:`wait` for the current one; an error of the write (disk full ...) is raised by the next of either."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.done: Any = None  # the tag of the last write that completed

    def submit(self, obj: Any, path: Path, keep_previous: Path, tag: Any) -> None:
        self.wait()

        def write() -> None:
            try:
                save_atomic(obj, path, keep_previous)
                self.done = tag
            except BaseException as exc:  # raised in the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=write, name="ke_fast-checkpoint")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only=True``; a corrupt or truncated file raises CheckpointError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                              f"the previous checkpoint, if any, is {str(path.with_name('prev.pt'))!r}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "generation" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a ke_fast checkpoint")
    return ckpt


def _tensor_bytes(x: Any) -> bytes:
    """dtype, shape and raw bytes of a tensor (or of what torch.as_tensor makes of a label), on any device."""
    t = torch.as_tensor(x).detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def data_fingerprint(data: Dataset, samples: int = 8) -> str:
    """A cheap, deterministic identity of a data set: a hash of its size, its labels where they are at
    hand without decoding (a TensorDataset's last tensor, or the data set's own ``fingerprint()``, e.g.
    :class:`ke_fast.data.ImageFolder`'s file list) and ``samples`` evenly spaced items."""
    n = len(data)
    h = hashlib.sha256(str(n).encode())
    if callable(getattr(data, "fingerprint", None)):
        h.update(data.fingerprint().encode())
    elif isinstance(data, TensorDataset):
        h.update(_tensor_bytes(data.tensors[-1]))
    for i in sorted({k * (n - 1) // max(1, samples - 1) for k in range(samples)}) if n else ():
        for x in data[i]:
            h.update(_tensor_bytes(x))
    return h.hexdigest()[:16]


def architecture_fingerprint(model: nn.Module) -> str:
    """A hash of the names, shapes and dtypes of a model's state_dict: what load_state_dict must match."""
    entries = (f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items())
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def init_process_group(backend: str, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group`` such that ``destroy_process_group`` really ends the group.

    DistributedDataParallel imports ``torch._dynamo`` on first use, which imports
    ``torch.distributed.nn.functional``, whose functions bind ``group.WORLD`` as a default argument.
    Imported after the default group exists, those defaults keep it alive past ``destroy_process_group``:
    its gloo worker threads then run on into interpreter shutdown, and one that drops its last reference
    to a Python-owned tensor there needs the GIL, so CPython ends that thread (pthread_exit) inside a
    noexcept destructor and the process aborts ("terminate called without an active exception").
    Importing them before the group exists makes those defaults None."""
    import torch._dynamo  # noqa: F401  (for its side effect above)

    dist.init_process_group(backend, **kwargs)


def headline_metric(task: str) -> tuple[str, str]:
    """The headline metric of a task: (history key suffix, its name): ("acc", "top-1") for "classify",
    ("recall1", "Recall@1") for "metric"; the history has ``dense_<suffix>`` and ``fit_<suffix>``."""
    return ("recall1", "Recall@1") if task == "metric" else ("acc", "top-1")


def _lr_lambda(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    warm = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return f


def _fused_sgd_supported(device: torch.device) -> bool:
    """torch.optim.SGD(fused=True) runs on CUDA and (torch >= 2.4) on CPU."""
    return device.type in ("cuda", "cpu")


class Evolution:
    """Runs KE on a model with a built-in trainer for classification or metric learning (``config.task``).

    Args:
        model: an unsplit model (it is split here with ``config``) or one already split. For
            ``task="metric"`` its output is the embedding (e.g. ``num_classes=64`` for the models of
            :mod:`ke_fast.models`), L2-normalised by the loss and the evaluation.
        train_set, test_set: map-style data sets of (input, label): a :class:`ke_fast.data.ImageSet` (uint8
            images, augmented and normalised per batch on the device), a TensorDataset, or any other, read
            once into tensors (see :class:`ke_fast.batches.Batches`). For ``task="metric"`` with disjoint
            classes (:func:`ke_fast.metric.class_split`), the training labels 0 .. C-1.
        config: the run's :class:`Config`.
        out_dir: where checkpoints (last.pt / prev.pt), history.csv, summary.json and plot.png go
            (rank 0 only).
        device: default CUDA when available.
        progress: show a tqdm bar for the whole run, with images/s and its ETA (default: only when stdout is
            a terminal).
        identity: the caller's own description of the data and model (the CLI passes its flags, e.g.
            ``{"--per-class": 20, "--model": "resnet18"}``). Stored in every checkpoint with the sizes and
            fingerprints of both data sets and of the architecture; resuming refuses a checkpoint that
            differs in any of them.
        checkpoint_every: minutes between checkpoints within a generation (written at the end of the first
            epoch past that time); 0 = after every epoch. A checkpoint also closes every generation.
        device_fraction: keep a data set on a CUDA device when it takes at most this fraction of the device's
            memory (else pinned host memory, prefetched by a thread).
        compile: ``torch.compile`` the training step (forward and loss; the backward follows).

    Attributes set by :meth:`run`: ``start``, the (generation, epoch) it started from (a generation past
    ``config.generations`` when it found a finished run), and ``saved``, the (generation, epoch) of the last
    checkpoint it wrote (None before the first).
    """

    def __init__(self, model: nn.Module, train_set: Dataset, test_set: Dataset, config: Config,
                 out_dir: str | Path, device: str | torch.device | None = None, progress: bool | None = None,
                 log: Callable[[str], None] = print, identity: dict[str, Any] | None = None,
                 checkpoint_every: float = 10.0, device_fraction: float = 0.5, compile: bool = False) -> None:
        self.cfg = config.validate()
        if not (checkpoint_every >= 0 and math.isfinite(checkpoint_every)):
            raise ValueError(f"checkpoint_every must be a finite number of minutes >= 0, got {checkpoint_every}")
        if not 0 <= device_fraction <= 1:
            raise ValueError(f"device_fraction must be in [0, 1], got {device_fraction}")
        for name, data in (("train_set", train_set), ("test_set", test_set)):
            if len(data) == 0:  # an empty test set would report 0.0 accuracy as if measured
                raise ValueError(f"{name} is empty")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(out_dir)
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.amp = self.device.type == "cuda" if config.amp is None else config.amp
        self.channels_last = self.device.type == "cuda" if config.channels_last is None else config.channels_last
        self.progress = os.isatty(1) if progress is None else progress
        self.log = log if self.rank == 0 else (lambda _: None)
        self.model = model.to(self.device)
        if not masked_layers(self.model):
            split(self.model, config.split, config.split_rate, seed=config.seed)
            # Initial weights from the counter RNG: generation 0 can be regenerated ("rewind").
            reinit_(self.model, 0, init=config.init, purpose="init", ignore_mask=True)
        elif config.evolve_mode == "rewind":
            raise ValueError("evolve_mode='rewind' regenerates the initial weights, which ke_fast draws itself: "
                             "pass an unsplit model (Evolution splits it with the config)")
        # channels_last applies to the activations only: weights stay contiguous, the layout the masks
        # and the fused reset address (cuDNN converts a weight to the input's layout on the fly)
        self.train_set, self.test_set = train_set, test_set
        self.identity = dict(identity or {}, train_images=len(train_set), test_images=len(test_set),
                             train_data=data_fingerprint(train_set), test_data=data_fingerprint(test_set),
                             architecture=architecture_fingerprint(self.model))
        self.checkpoint_every = checkpoint_every
        self._train = Batches(train_set, self.device, True, device_fraction, self.rank, self.world,
                              self.channels_last)
        self._test = Batches(test_set, self.device, False, device_fraction, channels_last=self.channels_last)
        self._forward_loss = torch.compile(self._forward_loss_eager) if compile else self._forward_loss_eager
        if config.task == "metric" and len(test_set) <= max(metric.RECALL_AT):
            raise ValueError(f"test_set holds {len(test_set)} images; Recall@{max(metric.RECALL_AT)} needs more")
        # one input, as the model sees it: the forward order of the layers, the embedding size
        example = None if config.reset_from is None and config.task != "metric" else next(self._test.epoch(1))[0]
        # layer-threshold forgetting: {layer: "keep" | "reset"}, fixed for the run (forward order)
        self._whole = None if config.reset_from is None else \
            variants.forgetting_plan(self.model, config.reset_from, example)
        self.criterion: nn.Module | None = None  # the metric loss and its proxies (in the optimizer, checkpointed)
        if config.task == "metric":
            was_training = self.model.training
            with torch.no_grad():
                dim = self.model.eval()(example).flatten(1).shape[1]
            self.model.train(was_training)
            classes = int(metric.labels_of(train_set).max()) + 1
            self.criterion = metric.NormSoftmaxLoss(classes, dim, seed=config.seed).to(self.device)
            if self.world > 1:  # the proxies live outside DDP: average their gradient over the ranks as DDP does
                for p in self.criterion.parameters():
                    p.register_hook(self._mean_over_ranks)
        self.history: list[dict] = []
        self.start: tuple[int, int] = (1, 0)
        self._last_loss = float("nan")
        self._writer = _Writer()
        self._saved_at = time.monotonic()
        self._bar = None
        # seconds spent per part of the run, for benchmarks and the curious
        self.timings = dict(train=0.0, eval=0.0, checkpoint=0.0, reset=0.0)

    @property
    def saved(self) -> tuple[int, int] | None:
        """The (generation, epoch) of the last checkpoint completely written (None before the first)."""
        return self._writer.done

    # -- the loop ---------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict]:
        """Run (or resume) all generations; returns the history (one dict per generation)."""
        try:
            history = self._run(resume)
        except BaseException:
            try:  # the last checkpoint is on disk before run raises; the first error is the one reported
                self._writer.wait()
            except BaseException:
                pass
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        t0 = time.perf_counter()
        self._writer.wait()  # the last checkpoint is on disk before run returns
        self.timings["checkpoint"] += time.perf_counter() - t0
        return history

    def _run(self, resume: bool) -> list[dict]:
        start_gen, start_epoch, opt_state, sched_state = 1, 0, None, None
        if resume:
            path = self.out / "last.pt"
            if not path.exists() and (self.out / "prev.pt").exists():
                path = self.out / "prev.pt"  # a crash between the two renames of save_atomic
            if path.exists():
                ckpt = load_checkpoint(path)
                self._check_resumable(ckpt, path)
                try:
                    self.model.load_state_dict(ckpt["model"])
                except RuntimeError as exc:  # a checkpoint written before identities were stored
                    detail = " ".join(str(exc).split())  # one line: the error is printed as one
                    raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: "
                                          f"{detail[:300]}{'...' if len(detail) > 300 else ''}") from None
                if self.criterion is not None:
                    if ckpt.get("criterion") is None:
                        raise CheckpointError(f"checkpoint {str(path)!r} holds no metric loss (proxies) to resume")
                    self.criterion.load_state_dict(ckpt["criterion"])
                self.history = ckpt["history"]
                start_gen, start_epoch = ckpt["generation"], ckpt["epoch"]
                opt_state, sched_state = ckpt.get("optimizer"), ckpt.get("scheduler")
                self._last_loss = ckpt.get("train_loss", float("nan"))
                # trained and evaluated: start the next generation; trained only: just evaluate it
                if start_epoch >= self.cfg.epochs and len(self.history) >= start_gen:
                    start_gen, start_epoch, opt_state, sched_state = start_gen + 1, 0, None, None
                if start_gen > self.cfg.generations:
                    self.start = (start_gen, 0)
                    self.log(f"{path}: the run is finished ({len(self.history)} generations); nothing to train "
                             f"(a larger generations count continues it)")
                    return self.history
                self.log(f"resumed from {path}: generation {start_gen}, epoch {start_epoch}")
            else:
                self.log(f"no checkpoint ({' / '.join(CHECKPOINTS)}) in {self.out} to resume from: starting afresh")
        self.start = (start_gen, start_epoch)
        self._saved_at = time.monotonic()
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            epochs = (self.cfg.generations - start_gen + 1) * self.cfg.epochs - start_epoch
            self._bar = tqdm(total=epochs * len(self._train) // self.world, unit="img", unit_scale=True,
                             desc="KE", dynamic_ncols=True)
        for g in range(start_gen, self.cfg.generations + 1):
            if start_epoch == 0 and g > 1:
                t0 = time.perf_counter()
                self._evolve(g)
                self._sync()
                self.timings["reset"] += time.perf_counter() - t0
            self._generation(g, start_epoch, opt_state, sched_state)
            start_epoch, opt_state, sched_state = 0, None, None
        if self.rank == 0 and self.history:
            self._plot()  # once per run: matplotlib costs more than a small generation
        return self.history

    def _check_resumable(self, ckpt: dict, path: Path) -> None:
        """Raise CheckpointError, naming every difference, unless ``ckpt`` was written by this run: the same
        config (more generations aside), the same caller identity, data sets and architecture. Fields a
        checkpoint lacks (older files) are not compared."""
        saved = ckpt.get("config") or {}
        changed = [f"{k}={saved[k]!r} (now {v!r})" for k, v in asdict(self.cfg).items() if k in saved
                   and saved[k] != v and k not in ("amp", "channels_last", "generations")]  # more generations: fine
        ident = ckpt.get("identity") or {}
        computed = ("train_images", "test_images", "train_data", "test_data", "architecture")
        changed += [f"{k} {ident[k]} (now {v})" for k, v in self.identity.items()
                    if k not in computed and k in ident and ident[k] != v]
        if not changed:  # nothing the caller named differs: say which contents do
            what = dict(train_images="the number of training images", test_images="the number of test images",
                        train_data="the training data", test_data="the test data",
                        architecture="the architecture (state_dict names or shapes)")
            changed = [f"{what[k]} ({ident[k]} in the checkpoint, now {self.identity[k]})" for k in computed
                       if k in ident and ident[k] != self.identity[k]]
        if changed:
            raise CheckpointError(f"checkpoint {str(path)!r} was written by a different run: {', '.join(changed)}; "
                                  f"resume with the same settings or use another --out")

    def _evolve(self, g: int) -> None:
        """Between generations: keep H^F, reset H^R (one fused launch), optionally BN and masks."""
        cfg = self.cfg
        if cfg.resample_mask and cfg.split == "wels" and cfg.mask_criterion == "random":
            for _, m in masked_layers(self.model):
                m.set_fit_mask(layer_mask(m.weight.shape, "wels", cfg.split_rate, seed=m.ke_seed,
                                          layer_index=m.layer_index, generation=g, device=m.weight.device))
        if cfg.evolve_mode == "rewind":
            reinit_(self.model, 0, init=cfg.init, purpose="init", whole=self._whole)
        else:
            reinit_(self.model, g, init="zeros" if cfg.evolve_mode == "zero" else cfg.reset_init, whole=self._whole)
        if cfg.reset_bn:
            reset_bn_(self.model, whole=self._whole)

    def _choose_masks(self, g: int) -> None:
        """The fit masks by ``mask_criterion`` from the trained network (top-k per layer), the same on every
        rank (rank 0's are broadcast); SNIP sums over the first SNIP_BATCHES batches of a seeded order."""
        cfg = self.cfg
        if cfg.mask_criterion == "magnitude":
            scores = variants.magnitude_scores(self.model)
        else:
            # the training batches (augmented as in training) of an epoch past the last: a seeded order
            epoch = self._train.epoch(cfg.batch_size, cfg.seed, g, cfg.epochs)
            batches = (b for _, b in zip(range(variants.SNIP_BATCHES), epoch))

            def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    out = self.model(x)
                return self._loss(out, y)

            scores = variants.snip_scores(self.model, loss_fn, batches)
        variants.choose_masks_(self.model, scores, cfg.split_rate)
        if self.world > 1:
            for _, m in masked_layers(self.model):
                dist.broadcast(m.fit_mask, 0)
                m.set_fit_mask(m.fit_mask)

    def _generation(self, g: int, start_epoch: int, opt_state: dict | None, sched_state: dict | None) -> None:
        cfg = self.cfg
        model = self.model
        net = nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        params = [*model.parameters(), *(self.criterion.parameters() if self.criterion is not None else ())]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              fused=_fused_sgd_supported(self.device))
        steps = self._train.steps(cfg.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
        if opt_state is not None:
            opt.load_state_dict(opt_state)
            sched.load_state_dict(sched_state)
        t0 = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            t1 = time.perf_counter()
            self._last_loss = self._train_epoch(net, opt, sched, g, epoch)  # reads the device: synchronised
            self.timings["train"] += time.perf_counter() - t1
            if epoch + 1 < cfg.epochs and time.monotonic() - self._saved_at >= 60 * self.checkpoint_every:
                self._checkpoint(g, epoch + 1, opt, sched)
        loss = self._last_loss
        if cfg.mask_criterion != "random" and (g == 1 or cfg.resample_mask):
            self._choose_masks(g)  # before H^F_g is evaluated: the importance mask defines it
        t1 = time.perf_counter()
        dense = self.evaluate()
        with fit_only(model):
            fit = self.evaluate()
        self.timings["eval"] += time.perf_counter() - t1
        row = dict(generation=g, **{f"dense_{k}": v for k, v in dense.items()},
                   **{f"fit_{k}": v for k, v in fit.items()}, train_loss=loss,
                   epoch_time_s=(time.perf_counter() - t0) / max(1, cfg.epochs - start_epoch))
        self.history.append(row)
        self._checkpoint(g, cfg.epochs, None, None)
        self._write_metrics()
        key, name = self.metric_key
        self.log(f"generation {g:2d}: dense N_g {100 * row['dense_' + key]:5.1f} %   fit H^F_g "
                 f"{100 * row['fit_' + key]:5.1f} % ({name})   loss {loss:.3f}")

    def _mean_over_ranks(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / self.world

    @property
    def metric_key(self) -> tuple[str, str]:
        """The headline metric of the task: (history key suffix, its name), e.g. ("acc", "top-1")."""
        return headline_metric(self.cfg.task)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch: label-smoothed cross-entropy, or the metric loss (``self.criterion``)."""
        if self.criterion is not None:
            return self.criterion(out, y)
        return F.cross_entropy(out.float(), y, label_smoothing=self.cfg.label_smoothing)

    def _forward_loss_eager(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = net(x)
        return self._loss(out, y)

    def _train_epoch(self, net: nn.Module, opt, sched, g: int, epoch: int) -> float:
        """One epoch; returns the mean training loss, read from the device once."""
        # dropout & co.: a function of (seed, generation, epoch) only (the seed of the epoch's batch order)
        torch.manual_seed(draw_seed(self.cfg.seed, g, epoch))
        net.train()
        total, count = torch.zeros((), device=self.device), 0
        if self._bar is not None:
            self._bar.set_description(f"KE gen {g}/{self.cfg.generations} epoch {epoch + 1}/{self.cfg.epochs}")
        for x, y in self._train.epoch(self.cfg.batch_size, self.cfg.seed, g, epoch):
            loss = self._forward_loss(net, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(y)
            count += len(y)
            if self._bar is not None:
                self._bar.update(len(y))
        mean = total.item() / max(1, count)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{mean:.3f}")
        return mean

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def evaluate(self, data: Dataset | None = None) -> dict[str, float]:
        """The task's metrics of the model as it is (dense, or fit inside ``fit_only``) on ``data`` (default:
        the test set, kept on the device): ``{"acc": top-1}`` for classification, ``{"recall1": ...,
        "recall4": ...}`` (Recall@K among the test images, :func:`ke_fast.metric.recall_at_k`) for metric
        learning. Counts stay on the device until the end."""
        self.model.eval()
        batches = self._test if data is None else Batches(data, self.device, False, channels_last=self.channels_last)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        embeddings, labels = [], []
        for x, y in batches.epoch(256):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = self.model(x)
            if self.cfg.task == "metric":
                embeddings.append(metric.embed(out))
                labels.append(y)
            else:
                correct += (out.argmax(1) == y).sum()
        if self.cfg.task == "metric":
            return metric.recall_at_k(torch.cat(embeddings), torch.cat(labels))
        return {"acc": correct.item() / max(1, len(batches))}

    # -- files --------------------------------------------------------------------------------
    def _checkpoint(self, g: int, epoch: int, opt, sched) -> None:
        """Copy the state now (a step boundary) and write it in the background (last.pt, the one before it
        prev.pt); the previous write completes first."""
        self._saved_at = time.monotonic()
        if self.rank != 0:
            return
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = _snapshot(dict(model=self.model.state_dict(), generation=g, epoch=epoch, history=self.history,
                              config=asdict(self.cfg), identity=self.identity,
                              optimizer=None if opt is None else opt.state_dict(),
                              scheduler=None if sched is None else sched.state_dict(), train_loss=self._last_loss,
                              criterion=None if self.criterion is None else self.criterion.state_dict(),
                              rng=dict(torch=torch.get_rng_state())))
        self._writer.submit(ckpt, self.out / "last.pt", self.out / "prev.pt", (g, epoch))
        self.timings["checkpoint"] += time.perf_counter() - t0

    def _write_metrics(self) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        keys = list(self.history[0])
        tmp = self.out / "history.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        os.replace(tmp, self.out / "history.csv")
        final = {k: v for k, v in self.history[-1].items() if k.startswith(("dense_", "fit_"))}
        summary = dict(config=asdict(self.cfg), history=self.history, final=final)
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.out / "summary.json")

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        gens = [r["generation"] for r in self.history]
        key, name = self.metric_key
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(gens, [100 * r["dense_" + key] for r in self.history], "o-", label="dense $N_g$")
        ax.plot(gens, [100 * r["fit_" + key] for r in self.history], "s-", label="fit hypothesis $H^F_g$")
        ax.set_xlabel("generation")
        ax.set_ylabel(f"test {name} (%)" + (" on unseen classes" if self.cfg.task == "metric" else ""))
        ax.set_title(f"KE {self.cfg.split.upper()} {self.cfg.split_rate}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "plot.png", dpi=120)
        plt.close(fig)
