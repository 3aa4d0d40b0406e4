"""The KE generation loop: train dense -> evaluate N_g and H^F_g (the Task) -> checkpoint (the RunDir) ->
reset -> fresh optimizer.

Everything random is derived from the run seed and (generation, epoch): the initial weights, masks
and resets come from the counter RNG, the data order from a generator seeded per epoch and the augmentation
of each batch from one seeded per (generation, epoch, batch) (ke_fast.batches). A resumed run therefore
continues bit for bit, and every DDP rank draws the same random masks and resets without talking (masks
chosen by magnitude / SNIP are computed on rank 0 and broadcast).

The data are tensors on the device (ke_fast.batches.Batches); the loss is summed on the device and read once
per epoch; checkpoints are copied at a step boundary and written by a background thread (ke_fast.rundir).
What is learnt and how it is scored is the task's (ke_fast.tasks); the options are checked by the Config
(ke_fast.config). Their names stay importable from here.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from . import variants
from .batches import Batches, draw_seed
from .config import EVOLVE_MODES, Config, ConfigError, Opt  # noqa: F401  (re-exported)
from .convert import fit_only, reinit_, reset_bn_, split
from .masks import layer_mask, masked_layers
from .processes import init_process_group  # noqa: F401  (re-exported)
from .rundir import (CHECKPOINTS, RUN_FILES, CheckpointError, RunDir, RunExistsError, _snapshot,  # noqa: F401
                     _Writer, architecture_fingerprint, check_resumable, data_fingerprint, load_checkpoint,
                     run_identity, save_atomic)
from .step import (EagerStep, GraphEval, GraphStep, _fused_sgd_supported, _lr_lambda, _optimizer,  # noqa: F401
                   build_step, use_graphs)
from .tasks import TASKS, Classify, headline_metric  # noqa: F401  (re-exported)

# the names users and tests import from here, wherever they live now (_Writer and _snapshot too, privately)
__all__ = ["Evolution", "reset_generation_", "choose_run_masks_", "check_run_options", "Config", "ConfigError",
           "EVOLVE_MODES", "CheckpointError", "RunExistsError", "save_atomic", "load_checkpoint", "data_fingerprint",
           "architecture_fingerprint", "check_resumable", "init_process_group", "headline_metric", "CHECKPOINTS",
           "RUN_FILES"]

def _mean_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    """A gradient averaged over the DDP ranks, as DDP does for the parameters it wraps."""
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def reset_generation_(model: nn.Module, cfg: Config, g: int, whole: dict[str, str] | None = None) -> None:
    """Between generations g-1 and g: keep H^F, reset H^R (one fused launch) as ``cfg.evolve_mode`` says;
    with ``cfg.resample_mask`` (WELS) first a new random mask, with ``cfg.reset_bn`` BatchNorm of the reset
    channels too; ``whole``: layer-threshold forgetting (:func:`ke_fast.variants.forgetting_plan`)."""
    if cfg.resample_mask and cfg.mask_criterion == "random":  # resample_mask implies WELS (Config)
        for _, m in masked_layers(model):
            m.set_fit_mask(layer_mask(m.weight.shape, "wels", cfg.split_rate, seed=m.ke_seed,
                                      layer_index=m.layer_index, generation=g, device=m.weight.device))
    if cfg.evolve_mode == "rewind":
        reinit_(model, 0, init=cfg.init, purpose="init", whole=whole)
    else:
        reinit_(model, g, init="zeros" if cfg.evolve_mode == "zero" else cfg.reset_init, whole=whole)
    if cfg.reset_bn:
        reset_bn_(model, whole=whole)


def choose_run_masks_(model: nn.Module, cfg: Config, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The fit masks by ``cfg.mask_criterion`` from the trained network (top-k per layer), the same on every
    DDP rank (rank 0's are broadcast); SNIP sums ``loss_fn``'s saliencies over the first SNIP_BATCHES
    ``batches``."""
    if cfg.mask_criterion == "magnitude":
        scores = variants.magnitude_scores(model)
    else:
        scores = variants.snip_scores(model, loss_fn, (b for _, b in zip(range(variants.SNIP_BATCHES), batches)))
    variants.choose_masks_(model, scores, cfg.split_rate)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for _, m in masked_layers(model):
            dist.broadcast(m.fit_mask, 0)
            m.set_fit_mask(m.fit_mask)


def check_run_options(checkpoint_every: float, device_fraction: float) -> None:
    """Check the :class:`Evolution` keywords that are not part of the Config; raises ConfigError."""
    if not (isinstance(checkpoint_every, (int, float)) and checkpoint_every >= 0 and math.isfinite(checkpoint_every)):
        raise ConfigError("checkpoint_every", Opt("checkpoint_every"), " must be a finite number of minutes >= 0, "
                                                                       f"got {checkpoint_every}")
    if not (isinstance(device_fraction, (int, float)) and 0 <= device_fraction <= 1):
        raise ConfigError("device_fraction", Opt("device_fraction"),
                          f" must be a fraction in [0, 1], got {device_fraction}")


def _check_data(train_set: Dataset, test_set: Dataset) -> None:
    for name, data in (("train_set", train_set), ("test_set", test_set)):
        if len(data) == 0:  # an empty test set would report 0.0 accuracy as if measured
            raise ValueError(f"{name} is empty")


def _split(model: nn.Module, config: Config) -> nn.Module:
    """``model`` split by ``config`` with initial weights drawn from the counter RNG (so generation 0 can be
    regenerated: "rewind"), or as it is when it is split already."""
    if not masked_layers(model):
        split(model, config.split, config.split_rate, seed=config.seed)
        reinit_(model, 0, init=config.init, purpose="init", ignore_mask=True)
    elif config.evolve_mode == "rewind":
        raise ValueError("evolve_mode='rewind' regenerates the initial weights, which ke_fast draws itself: "
                         "pass an unsplit model (Evolution splits it with the config)")
    return model


def _start_of(ckpt: dict, cfg: Config) -> tuple[int, int, dict | None, dict | None]:
    """Where a resume from ``ckpt`` starts: (generation, epoch, optimizer state, scheduler state); trained
    and evaluated: the next generation; trained only: just its evaluation."""
    g, epoch, opt_state, sched_state = ckpt["generation"], ckpt["epoch"], ckpt.get("optimizer"), ckpt.get("scheduler")
    if epoch >= cfg.epochs_in(g) and len(ckpt["history"]) >= g:
        return g + 1, 0, None, None
    return g, epoch, opt_state, sched_state


def _choose_masks(ev: "Evolution", g: int, epochs: int) -> None:
    """The fit masks by ``mask_criterion`` at the end of generation ``g`` (``epochs`` long); SNIP scores the
    training batches (augmented as in training) of an epoch past the last, a seeded order."""
    choose_run_masks_(ev.model, ev.cfg, lambda x, y: ev._forward_loss_eager(ev.model, x, y),
                  ev._train.epoch(ev.cfg.batch_size, ev.cfg.seed, g, epochs, pairs=ev.task.pairs))


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics of N_g (``dense_``) or H^F_g (``fit_``) as the history row names them."""
    return {prefix + k: v for k, v in metrics.items()}


def _validate(ev: "Evolution", g: int, epoch: int) -> None:
    """An evaluation during training after ``epoch`` epochs of generation ``g`` (the official test_interval,
    KE_model.py: val top-1 / top-5 of the dense network): a row of ``ev.val_history`` (``generation``,
    ``epoch``, ``run_epoch`` over the run, the ``dense_`` metrics on the validation and the test list), kept
    in every checkpoint, written to val.csv now, and logged."""
    scores = ev.evaluate()
    run_epoch = sum(map(ev.cfg.epochs_in, range(1, g))) + epoch
    ev.val_history.append(dict(generation=g, epoch=epoch, run_epoch=run_epoch, **_prefixed("dense_", scores)))
    ev.dir.write_val(ev.val_history)
    ev.log(ev.task.validate(scores, g, epoch))


def _restore(ev: "Evolution", ckpt: dict, path: Path) -> tuple[int, int, dict | None, dict | None]:
    """Load a checkpoint found by ``ev.dir.latest()`` into ``ev`` (model, task, history, validations: older
    checkpoints kept none); returns the (generation, epoch, optimizer state, schedule state) to start from."""
    ev.dir.restore(ckpt, path, asdict(ev.cfg), ev.identity, ev.model, ev.task)
    ev.history, ev._last_loss = ckpt["history"], ckpt.get("train_loss", float("nan"))
    ev.val_history = ckpt.get("val_history", [])
    return _start_of(ckpt, ev.cfg)


def _scores(ev: "Evolution") -> dict[str, float]:
    """The metrics of N_g (``dense_``) and of H^F_g (``fit_``) at the end of a generation, timed as evaluation."""
    t0 = time.perf_counter()
    row = _prefixed("dense_", ev.evaluate())
    with fit_only(ev.model):
        row.update(_prefixed("fit_", ev.evaluate()))
    ev.timings["eval"] += time.perf_counter() - t0
    return row


class _Progress:
    """The run's tqdm bar (images, images/s, ETA), or nothing when off."""

    def __init__(self, on: bool, images: int) -> None:
        self.bar = None
        if on:
            from tqdm import tqdm

            self.bar = tqdm(total=images, unit="img", unit_scale=True, desc="KE", dynamic_ncols=True)

    def epoch(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def loss(self, value: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{value:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Evolution:
    """Runs KE on a model with a built-in trainer for the task of ``config.task`` (:mod:`ke_fast.tasks`).

    Args:
        model: an unsplit model (split here with ``config``) or one already split; its output as the task
            wants it (classes; an embedding for ``"metric"``; one value for ``"regression"``).
        train_set, test_set: map-style data sets of (input, target): a :class:`ke_fast.data.ImageSet`, a
            TensorDataset, or any other, read once into tensors (:class:`ke_fast.batches.Batches`).
        config: the run's :class:`Config`.
        out_dir: the run folder (:class:`ke_fast.rundir.RunDir`; rank 0 writes): last.pt / prev.pt,
            history.csv, summary.json, plot.png.
        device: default CUDA when available. progress: a tqdm bar (default: when stdout is a terminal).
        identity: the caller's description of data and model (the CLI's flags), kept in every checkpoint with
            the data's and the architecture's sizes and fingerprints; a resume must match them all.
        checkpoint_every: minutes between checkpoints in a generation (0: every epoch; each generation ends
            with one). device_fraction: keep a data set on a CUDA device up to this fraction of its memory.
        compile: ``torch.compile`` the training step's forward and loss: True (default mode) or a mode name
            (``ke_fast.step.COMPILE_MODES``; "reduce-overhead": not with ``graphs``).
        val_set: a validation split (``val_`` metrics; evaluated every ``config.val_every`` epochs too).
        plot: draw plot.png at the end of :meth:`run` (matplotlib: about 1 s per process on a 2-core CPU).

    :meth:`run` sets ``start``, the (generation, epoch) it started from (past ``config.generations`` for a
    finished run); ``saved`` is the (generation, epoch) of the last checkpoint written (None before one).
    """

    def __init__(self, model: nn.Module, train_set: Dataset, test_set: Dataset, config: Config,
                 out_dir: str | Path, device: str | torch.device | None = None, progress: bool | None = None,
                 log: Callable[[str], None] = print, identity: dict[str, Any] | None = None,
                 checkpoint_every: float = 10.0, device_fraction: float = 0.5, compile: bool | str = False,
                 val_set: Dataset | None = None, plot: bool = True) -> None:
        self.cfg = config.validate()
        check_run_options(checkpoint_every, device_fraction)
        _check_data(train_set, test_set)
        self.task = TASKS[config.task](config)
        self.task.check_data(train_set, test_set)
        self.device, self.out = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), Path(out_dir)
        ddp = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
        cuda = self.device.type == "cuda"  # None: automatic, on for CUDA
        self.amp, self.channels_last = (cuda if v is None else v for v in (config.amp, config.channels_last))
        self.progress = os.isatty(1) if progress is None else progress
        self.log = log if self.rank == 0 else (lambda _: None)
        # the step the loop calls: eager or one CUDA graph (and a classifier's graphed evaluation), ke_fast.step;
        # built before any work: an unknown compile mode, or one that cannot go with graphs, is refused here
        self._forward_loss, self._step, self._eval_graph = build_step(self._forward_loss_eager, config, self.device,
                                                                      self.amp, self.world, compile,
                                                                      isinstance(self.task, Classify))
        self.model = _split(model.to(self.device), config)
        # channels_last applies to the activations only: weights stay contiguous, the layout the masks
        # and the fused reset address (cuDNN converts a weight to the input's layout on the fly)
        self.train_set, self.test_set, self.checkpoint_every, self.plot = train_set, test_set, checkpoint_every, plot
        self.identity = dict(identity or {}, **run_identity(train_set, test_set, self.model))
        self._train = Batches(train_set, self.device, True, device_fraction, self.rank, self.world, self.channels_last)
        self._test = Batches(test_set, self.device, False, device_fraction, channels_last=self.channels_last)
        self._val = None if val_set is None else \
            Batches(val_set, self.device, False, device_fraction, channels_last=self.channels_last)
        example = functools.cache(lambda: next(self._test.epoch(1))[0])  # one input, as the model sees it
        # layer-threshold forgetting: {layer: "keep" | "reset"}, fixed for the run (forward order)
        self._whole = None if config.reset_from is None else \
            variants.forgetting_plan(self.model, config.reset_from, example())
        self.task.setup(self.model, train_set, example, self.device)
        if self.world > 1:  # the task's parameters live outside DDP: average their gradient as DDP does
            for p in self.task.parameters():
                p.register_hook(_mean_over_ranks)
        self.dir = RunDir(self.out, self.rank)
        self.history, self.val_history = [], []  # rows: per generation / per validation in training (_validate)
        self.start: tuple[int, int] = (1, 0)
        self._last_loss, self._saved_at, self._bar = float("nan"), time.monotonic(), _Progress(False, 0)
        self.timings = dict(train=0.0, eval=0.0, checkpoint=0.0, reset=0.0)  # seconds per part, for benchmarks

    @property
    def saved(self) -> tuple[int, int] | None:
        """The (generation, epoch) of the last checkpoint completely written (None before the first)."""
        return self.dir.saved

    @property
    def criterion(self) -> nn.Module | None:
        """The task's loss module where it has parameters (the metric task's proxies), else None."""
        return self.task.criterion

    # -- the loop ---------------------------------------------------------------------------
    def run(self, resume: bool = False, overwrite: bool = False) -> list[dict]:
        """Run all generations (``resume``: continue from the folder's checkpoint); returns the history, one
        dict per generation. A folder holding a run raises RunExistsError (a FileExistsError) and is left as
        it is, unless ``resume`` or ``overwrite`` (its run files are deleted once every check has passed)."""
        self.dir.check(resume, overwrite)
        if overwrite and (removed := self.dir.clear()):
            self.log(f"overwrite: deleted {', '.join(removed)} of the previous run in {self.out}")
        try:
            with self.dir.writing():  # the last checkpoint is on disk before run returns or raises
                history = self._run(resume)
                t0 = time.perf_counter()
        finally:
            self._bar.close()
        self.timings["checkpoint"] += time.perf_counter() - t0  # the wait for the last write
        return history

    def _run(self, resume: bool) -> list[dict]:
        start_gen, start_epoch, opt_state, sched_state = 1, 0, None, None
        found = self.dir.latest() if resume else None  # a corrupt last.pt: prev.pt, with a warning
        if resume and found is None:
            self.log(f"no checkpoint ({' / '.join(CHECKPOINTS)}) in {self.out} to resume from: starting afresh")
        if found is not None:
            path = found[1]
            start_gen, start_epoch, opt_state, sched_state = _restore(self, *found)
            if start_gen > self.cfg.generations:
                self.start = (start_gen, 0)
                self.log(f"{path}: the run is finished ({len(self.history)} generations); nothing to train "
                         f"(a larger generations count continues it)")
                return self.history
            self.log(f"resumed from {path}: generation {start_gen}, epoch {start_epoch}")
        self.start, self._saved_at = (start_gen, start_epoch), time.monotonic()
        epochs = sum(map(self.cfg.epochs_in, range(start_gen, self.cfg.generations + 1))) - start_epoch
        self._bar = _Progress(self.progress and self.rank == 0, epochs * len(self._train) // self.world)
        for g in range(start_gen, self.cfg.generations + 1):
            if start_epoch == 0 and g > 1:
                t0 = time.perf_counter()
                self._evolve(g)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.timings["reset"] += time.perf_counter() - t0
            self._generation(g, start_epoch, opt_state, sched_state)
            start_epoch, opt_state, sched_state = 0, None, None
        if self.history and self.plot:  # once per run: matplotlib costs more than a small generation
            self.dir.write_plot(self.history, self.task, f"KE {self.cfg.split.upper()} {self.cfg.split_rate}",
                                self.val_history)
        return self.history

    def _evolve(self, g: int) -> None:
        reset_generation_(self.model, self.cfg, g, self._whole)

    def _generation(self, g: int, start_epoch: int, opt_state: dict | None, sched_state: dict | None) -> None:
        cfg, model = self.cfg, self.model
        net = nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        opt, sched = self._step.optimizer([*model.parameters(), *self.task.parameters()],
                                          self._train.steps(cfg.batch_size), opt_state, sched_state, g)
        t0, epochs = time.perf_counter(), cfg.epochs_in(g)
        for epoch in range(start_epoch, epochs):
            t1 = time.perf_counter()
            self._last_loss = self._train_epoch(net, opt, sched, g, epoch)  # reads the device: synchronised
            self.timings["train"] += time.perf_counter() - t1
            if self._val is not None and cfg.val_every and (epoch + 1) % cfg.val_every == 0:  # the official
                _validate(self, g, epoch + 1)  # test_interval
            if epoch + 1 < epochs and time.monotonic() - self._saved_at >= 60 * self.checkpoint_every:
                self._checkpoint(g, epoch + 1, opt, sched)
        if cfg.mask_criterion != "random" and (g == 1 or cfg.resample_mask):  # before H^F_g: the mask defines it
            _choose_masks(self, g, epochs)
        row = dict(generation=g, **_scores(self))
        row.update(train_loss=self._last_loss, epoch_time_s=(time.perf_counter() - t0) / max(1, epochs - start_epoch))
        self.history.append(row)
        self._checkpoint(g, epochs, None, None)
        self.dir.write_results(self.history, asdict(cfg), self.val_history)
        self.log(self.task.report(row))

    def _forward(self, x: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return (self.model if net is None else net)(x)

    def _forward_loss_eager(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task.forward_loss(functools.partial(self._forward, net=net), x, y)

    def _train_epoch(self, net: nn.Module, opt, sched, g: int, epoch: int) -> float:
        """One epoch; returns the mean training loss, read from the device once."""
        # dropout & co.: a function of (seed, generation, epoch) only (the seed of the epoch's batch order)
        torch.manual_seed(draw_seed(self.cfg.seed, g, epoch))
        net.train()
        total = torch.zeros((), device=self.device)
        self._bar.epoch(f"KE gen {g}/{self.cfg.generations} epoch {epoch + 1}/{self.cfg.epochs_in(g)}")
        # eager, or one CUDA graph replay per batch, the batch making included (ke_fast.step)
        count = self._step.train_epoch(net, opt, sched, self._train, self.cfg.batch_size, self.cfg.seed, g, epoch,
                                       self.task.pairs, total, self._bar.update)
        mean = total.item() / max(1, count)
        self._bar.loss(mean)
        return mean

    @torch.no_grad()
    def evaluate(self, data: Dataset | None = None) -> dict[str, float]:
        """The task's metrics of the model as it is (dense, or fit inside ``fit_only``) on ``data``, e.g. ``{"acc":
        top-1, "top5": top-5}``; default: the test set's and, prefixed ``val_``, the validation set's (if any)."""
        self.model.eval()
        if data is None:
            sets = {k: b for k, b in (("", self._test), ("val_", self._val)) if b is not None}  # Task.scores' prefixes
            if self._eval_graph is not None and all(b.resident for b in sets.values()):
                return {p + k: v for p, b in sets.items()
                        for k, v in self._eval_graph.accuracy(self._forward, self.model, b).items()}
            return self.task.scores(self._forward, {k: b.epoch(256) for k, b in sets.items()})
        batches = Batches(data, self.device, False, channels_last=self.channels_last)
        return self.task.evaluate(self._forward, batches.epoch(256))

    def _checkpoint(self, g: int, epoch: int, opt, sched) -> None:
        """Copy the state now (a step boundary) and write it in the background (ke_fast.rundir.RunDir.save)."""
        self._saved_at = time.monotonic()
        t0 = time.perf_counter()
        self.dir.save(dict(model=self.model.state_dict(), generation=g, epoch=epoch, history=self.history,
                           config=asdict(self.cfg), identity=self.identity, train_loss=self._last_loss,
                           optimizer=None if opt is None else opt.state_dict(),
                           scheduler=None if sched is None else sched.state_dict(), task=self.task.state_dict(),
                           rng=dict(torch=torch.get_rng_state()), val_history=self.val_history), (g, epoch))
        self.timings["checkpoint"] += time.perf_counter() - t0
