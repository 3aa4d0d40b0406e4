"""Several seeds of one KE configuration, the compute-matched baseline, and one table over them.

A :class:`Study` runs :class:`~ke_fast.evolve.Evolution` once per seed into ``<out>/seed-<n>/`` (each an
ordinary run folder, resumable on its own) and, with ``baseline="long"``, the compute-matched baseline of
each seed into ``<out>/seed-<n>/baseline/``: the same model, data, seed, learning rate, warm-up and batch
size, trained densely for generations x epochs epochs in one schedule, never split and never reset (an
Evolution run of :func:`baseline_config`). It then writes ``<out>/summary.json``, ``<out>/results.md`` and
``<out>/plot.png``: per generation the mean and the sample standard deviation over the seeds of the task's
metrics (summary.json's ``val``: of the evaluations on the validation list during training too); the plot:
the headline metric (:mod:`ke_fast.tasks`: top-1, Recall@1, or RMSE where lower is better) of the dense network
and the fit hypothesis, and the baseline beside KE's last generation. The folder follows the overwrite /
resume policy of :class:`ke_fast.rundir.StudyDir`.

std is the sample standard deviation (numpy's ``ddof=1``); with one seed it is undefined: ``null`` in
summary.json, "n/a" in results.md, no error band in the plot.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from .config import Config, ConfigError
from .evolve import Evolution
from .rundir import STUDY_FILES, StudyDir, write_text  # noqa: F401  (STUDY_FILES: re-exported)
from .tasks import TASKS

BASELINES = ("long",)
STD = "sample standard deviation over the seeds (numpy ddof=1); null with one seed"


def seed_dir(out: str | Path, seed: int) -> Path:
    """The run folder of one seed of a study in ``out`` (:meth:`ke_fast.rundir.StudyDir.seed`)."""
    return StudyDir(out).seed(seed)


def baseline_dir(out: str | Path, seed: int) -> Path:
    """The run folder of one seed's compute-matched baseline (:meth:`ke_fast.rundir.StudyDir.baseline`)."""
    return StudyDir(out).baseline(seed)


def baseline_config(config: Config) -> Config:
    """The compute-matched ("long") baseline of a KE config: one generation of every generation's epochs
    together (``generations x epochs``, or the sum of per-generation epochs), so one warm-up and one cosine
    schedule over the whole budget at the first generation's peak lr, with split rate 1.0: every weight
    is fit, so the masks select everything, fit == dense, and as there is no second generation nothing is
    ever reset. Everything else (lr, warm-up, batch size, seed, initial weights, data order) is unchanged;
    the layers train through their own forward (dense mode), so this is plain dense training."""
    return replace(config.validate(), split_rate=1.0, generations=1, epochs=config.total_epochs, lr=config.lr_in(1),
                   mask_criterion="random", resample_mask=False, reset_from=None)


def study_files(out: str | Path) -> list[Path]:
    """Every file in ``out`` that belongs to a run or a study (:meth:`ke_fast.rundir.StudyDir.files`)."""
    return StudyDir(out).files()


def remove_study(out: str | Path) -> list[Path]:
    """Delete :func:`study_files` of ``out`` and the seed folders left empty; returns the deleted files
    (:meth:`ke_fast.rundir.StudyDir.clear`)."""
    return StudyDir(out).clear()


def _stat(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else None, values=[float(x) for x in v])


def aggregate(histories: Mapping[int, list[dict]], baselines: Mapping[int, dict] | None = None,
              task: str = "classify") -> dict[str, Any]:
    """Mean and sample std (ddof=1) over the seeds of the task's headline metric (top-1 accuracy, Recall@1
    for ``task="metric"``, RMSE for ``task="regression"``: :mod:`ke_fast.tasks`) of the dense and the fit
    network, per generation.

    Args:
        histories: {seed: an Evolution history (one dict per generation)}; every seed needs the same
            generations.
        baselines: {seed: the baseline's last history row}, the same seeds, or None.

    Returns ``{"seeds", "std", "metric": {"dense", "fit", "name", "label", "percent", "higher_is_better"},
    "generations": [{"generation",
    "dense_acc": stat, "fit_acc": stat}], "final": {key: stat}, "baseline": {key: stat} or None}`` (the keys
    are the history's, e.g. ``dense_recall1`` for metric learning), where a stat is ``{"mean", "std",
    "values"}`` with the values in the order of the seeds."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    headline = TASKS[task].headline()
    metrics = (headline["dense"], headline["fit"])
    seeds = list(histories)
    if not seeds:
        raise ValueError("histories must hold at least one seed")
    gens = {s: [r["generation"] for r in h] for s, h in histories.items()}
    if any(g != gens[seeds[0]] or not g for g in gens.values()):
        raise ValueError(f"every seed needs the same, non-empty generations, got {gens}")
    first = histories[seeds[0]][0]  # and every other metric of N_g / H^F_g all seeds have (top-5, val_ ...)
    metrics += tuple(k for k in first if k.startswith(("dense_", "fit_")) and k not in metrics
                     and all(k in r for h in histories.values() for r in h))
    rows = [dict(generation=g, **{m: _stat([histories[s][i][m] for s in seeds]) for m in metrics})
            for i, g in enumerate(gens[seeds[0]])]
    base = None
    if baselines is not None:
        if list(baselines) != seeds:
            raise ValueError(f"baselines must hold the seeds of histories {seeds}, got {list(baselines)}")
        base = {m: _stat([baselines[s][m] for s in seeds]) for m in metrics if all(m in b for b in baselines.values())}
    return dict(seeds=seeds, std=STD, metric=headline, generations=rows,
                final={m: rows[-1][m] for m in metrics}, baseline=base)


def aggregate_val(vals: Mapping[int, list[dict]]) -> list[dict]:
    """The evaluations on the validation list during training (:attr:`ke_fast.evolve.Evolution.val_history`,
    {seed: rows}) as a study's summary.json keeps them: per (``generation``, ``epoch``, ``run_epoch``) the
    stat (mean, sample std, values in the order of the seeds) of every metric all seeds have there; [] when a
    seed has none or the seeds were evaluated at other epochs."""
    at = {s: [(r["generation"], r["epoch"], r["run_epoch"]) for r in rows] for s, rows in vals.items()}
    first = next(iter(at.values()), [])
    if not first or any(points != first for points in at.values()):
        return []
    keys = [k for k in next(iter(vals.values()))[0] if k.startswith("dense_")]
    return [dict(generation=g, epoch=e, run_epoch=r, **{k: _stat([rows[i][k] for rows in vals.values()])
                                                         for k in keys if all(k in rows[i] for rows in vals.values())})
            for i, (g, e, r) in enumerate(first)]


def _show(value: float, percent: bool) -> str:
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _pct(stat: dict, percent: bool = True) -> str:
    std = "n/a" if stat["std"] is None else _show(stat["std"], percent)
    return f"{_show(stat['mean'], percent)} ± {std}"


def _per_generation(value: Any) -> str:
    """A setting of a summary's config: one value, or one per generation joined by commas."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _epochs(cfg: Mapping[str, Any]) -> str:
    return _per_generation(cfg["epochs"])


def _total(cfg: Mapping[str, Any]) -> int:
    """The epochs of all generations of a summary's config (the long baseline's)."""
    e = cfg["epochs"]
    return sum(e) if isinstance(e, (list, tuple)) else cfg["generations"] * e


def results_markdown(summary: Mapping[str, Any]) -> str:
    """results.md: the per-generation table (mean ± std over the seeds, the baseline below KE's last
    generation) and the last generation and the baseline of every seed."""
    cfg, seeds, base, metric = summary["config"], summary["seeds"], summary["baseline"], summary["metric"]
    dense, fit, name = metric["dense"], metric["fit"], metric["name"]
    extra = [m for m in summary["generations"][0] if m not in ("generation", dense, fit)]  # top-5, val_ ...
    percent, label = metric.get("percent", True), metric.get("label", f"test {name} (%)")  # older summaries

    def pct(stat: dict) -> str:
        return _pct(stat, percent)

    g, e = cfg["generations"], _epochs(cfg)
    setup = ", ".join(f"{k} {v}" for k, v in (summary.get("identity") or {}).items() if v is not None)
    lines = [f"# KE {cfg['split'].upper()} {cfg['split_rate']}: {len(seeds)} seed(s) ({', '.join(map(str, seeds))})",
             "",
             f"{g} generations x {e} epochs, lr {_per_generation(cfg['lr'])}, batch {cfg['batch_size']}, warm-up "
             f"{cfg['warmup_epochs']} epochs, evolve mode {cfg['evolve_mode']}" + (f"; {setup}" if setup else "") + ".",
             f"{label[0].upper()}{label[1:]}, mean ± sample standard deviation over the seeds (ddof=1; n/a with one "
             f"seed)" + ("" if metric.get("higher_is_better", True) else f"; {name}: lower is better") + ".",
             "", "| generation | dense N_g | fit H^F_g |" + "".join(f" {m} |" for m in extra),
             "|---:|---:|---:|" + "---:|" * len(extra)]
    lines += [f"| {r['generation']} | {pct(r[dense])} | {pct(r[fit])} |" + "".join(f" {pct(r[m])} |" for m in extra)
              for r in summary["generations"]]
    if base is not None:
        lines.append(f"| long dense baseline, {_total(cfg)} epochs | {pct(base[dense])} | (no split) |"
                     + "".join(f" {pct(base[m])} |" if m.startswith("dense_") and m in base else " |" for m in extra))
    last = summary["generations"][-1]["generation"]
    lines += ["", f"Per seed (generation {last}" + (", and the baseline" if base else "") + "):", "",
              f"| seed | dense N_{last} | fit H^F_{last} |" + (" long baseline |" if base else ""),
              "|---:|---:|---:|" + ("---:|" if base else "")]
    for i, s in enumerate(seeds):
        cells = [summary["final"][m]["values"][i] for m in (dense, fit)] + ([base[dense]["values"][i]] if base else [])
        lines.append(f"| {s} | " + " | ".join(_show(v, percent) for v in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], path: str | Path) -> None:
    """plot.png: the mean dense and fit headline metric per generation with a ±std band, the baseline as a
    point with an error bar at the last generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    dense, name = summary["metric"]["dense"], summary["metric"]["name"]
    scale = 100 if summary["metric"].get("percent", True) else 1
    gens = np.array([r["generation"] for r in summary["generations"]])
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    curves = ((dense, "o-", "dense $N_g$"), (summary["metric"]["fit"], "s-", "fit hypothesis $H^F_g$"))
    for metric, style, label in curves:
        mean = scale * np.array([r[metric]["mean"] for r in summary["generations"]])
        (line,) = ax.plot(gens, mean, style, label=label)
        if len(summary["seeds"]) > 1:
            std = scale * np.array([r[metric]["std"] for r in summary["generations"]])
            ax.fill_between(gens, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    base = summary["baseline"]
    if base is not None:
        cfg = summary["config"]
        std = base[dense]["std"]
        ax.errorbar([gens[-1]], [scale * base[dense]["mean"]], yerr=None if std is None else [scale * std],
                    fmt="D", color="black", capsize=4,
                    label=f"long dense baseline ({_total(cfg)} epochs)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel(summary["metric"].get("label", f"test {name} (%)"))
    ax.set_title(f"KE {summary['config']['split'].upper()} {summary['config']['split_rate']}, "
                 f"{len(summary['seeds'])} seed(s), mean ± std")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Study:
    """KE on one configuration once per seed, optionally with the compute-matched baseline, and the
    aggregate over the seeds.

    Args:
        make: ``make(seed) -> (model, train_set, test_set)`` or ``(model, train_set, test_set, val_set)`` (None:
            no validation split): an unsplit model and the data of one seed.
            Called once per run (KE, and the baseline), right after ``torch.manual_seed(seed)``.
        config: the KE :class:`Config`; its ``seed`` is replaced by each seed.
        seeds: distinct seeds, 0 .. 2^64-1, run one after another in this order (under DDP every rank
            runs them together).
        out_dir: the study's folder: ``seed-<n>/`` (and ``seed-<n>/baseline/``) per seed, summary.json,
            results.md and plot.png (rank 0 only).
        baseline: None, or ``"long"``: per seed, the dense run of :func:`baseline_config`.
        device, progress, log, identity: as for :class:`Evolution` (identity also goes into summary.json).
        **options: further keywords of every :class:`Evolution` (``checkpoint_every``, ``device_fraction``,
            ``compile``, ``plot``: False draws neither the runs' nor the study's plot.png).

    ``current`` is the Evolution running now (None outside :meth:`run`): after an interrupt, the one
    whose checkpoint a resume continues from.
    """

    def __init__(self, make: Callable[[int], tuple[nn.Module, Dataset, Dataset]], config: Config,
                 seeds: Sequence[int], out_dir: str | Path, baseline: str | None = None,
                 device: str | torch.device | None = None, progress: bool | None = None,
                 log: Callable[[str], None] = print, identity: dict[str, Any] | None = None, **options: Any) -> None:
        self.config = config.validate()
        seeds = list(seeds)
        if not seeds:
            raise ValueError("seeds must be a non-empty list of ints in 0 .. 2^64-1, got []")
        try:  # the Config checks a seed
            for s in seeds:
                replace(self.config, seed=s)
        except ConfigError as exc:
            raise ValueError(f"seeds: {exc}") from None
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(f"baseline must be None or one of {BASELINES}, got {baseline!r}")
        self.make, self.seeds, self.out, self.baseline = make, seeds, Path(out_dir), baseline
        self.dir = StudyDir(self.out)
        self.device, self.progress, self.identity, self.options = device, progress, identity, options
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.log = log if self.rank == 0 else (lambda _: None)
        self._evolution_log = log
        self.current: Evolution | None = None

    def run(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Run (or, with ``resume``, continue) every seed in order, then write summary.json, results.md
        and plot.png; returns the summary. A resume continues each seed's runs from their checkpoints: a
        finished one is only read, an unfinished one continues where it stopped, a missing one starts.

        A folder holding a run or a study raises RunExistsError (a FileExistsError) and is left as it is,
        unless ``resume`` or ``overwrite`` (every run and study file in it is deleted once every check has
        passed; other files stay); see :meth:`ke_fast.rundir.StudyDir.check`."""
        self.dir.check(self.seeds, resume, overwrite)
        if overwrite and self.rank == 0 and (removed := self.dir.clear()):
            self.log(f"overwrite: deleted {len(removed)} files of the previous run(s) in {self.out}")
        if overwrite and dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank checks a seed's folder before rank 0 has cleared it
        histories: dict[int, list[dict]] = {}
        vals: dict[int, list[dict]] = {}  # each seed's evaluations during training
        baselines: dict[int, dict] | None = {} if self.baseline else None
        for i, seed in enumerate(self.seeds):
            self.log(f"seed {seed} ({i + 1}/{len(self.seeds)}): KE in {seed_dir(self.out, seed)}")
            histories[seed] = self._one(seed, self.config, seed_dir(self.out, seed), resume)
            vals[seed] = self.current.val_history
            if baselines is not None:
                cfg = baseline_config(self.config)
                self.log(f"seed {seed}: {self.baseline} baseline, {cfg.epochs} dense epochs, in "
                         f"{baseline_dir(self.out, seed)}")
                baselines[seed] = self._one(seed, cfg, baseline_dir(self.out, seed), resume)[-1]
        self.current = None
        summary = dict(aggregate(histories, baselines, self.config.task),
                       config={k: v for k, v in asdict(self.config).items() if k != "seed"}, identity=self.identity,
                       val=aggregate_val(vals))
        if self.baseline:
            summary["baseline"] = dict(kind=self.baseline, epochs=baseline_config(self.config).epochs,
                                       **summary["baseline"])
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "summary.json", json.dumps(summary, indent=2))
            write_text(self.out / "results.md", results_markdown(summary))
            if self.options.get("plot", True):
                plot(summary, self.out / "plot.png")
        return summary

    def _one(self, seed: int, config: Config, out: Path, resume: bool) -> list[dict]:
        torch.manual_seed(seed)
        model, train_set, test_set, *val = self.make(seed)  # (model, train, test) or (..., val set or None)
        self.current = Evolution(model, train_set, test_set, replace(config, seed=seed), out, device=self.device,
                                 progress=self.progress, log=self._evolution_log, identity=self.identity,
                                 val_set=val[0] if val else None, **self.options)
        return self.current.run(resume=resume)
