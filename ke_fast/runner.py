"""What ``ke-fast run`` does once its flags are checked (ke_fast.cli): build the data and the model, run KE
or a study, print the table; the flags' Config and identity."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from . import recipes
from .config import Config
from .data import DataError, diabetes, digits, load
from .evolve import Evolution
from .processes import launcher
from .models import build_model, model_options
from .rundir import CHECKPOINTS, CheckpointError, StudyDir
from .study import Study, results_markdown
from .tasks import TASKS

VECTOR_MODELS = ("mlp",)  # registry models of feature vectors (the others take images)
VECTOR_DATASETS = ("diabetes",)  # bundled data sets of feature vectors (the others hold images)


def _build(args: argparse.Namespace, outputs: int, inputs: int, small: bool = True) -> torch.nn.Module:
    """The network of --model (a registry name or MODULE:FUNCTION) with ``outputs`` outputs (the task's: classes,
    --embedding-dim, targets) and ``inputs`` input channels (features for an MLP); ``stem`` and ``width`` are
    passed where the factory takes them (small: the small-image stem)."""
    if args.model in VECTOR_MODELS:
        return build_model(args.model, in_features=inputs, num_classes=outputs)
    options = model_options(args.model)
    extra = dict(stem="small" if small else "imagenet") if "stem" in options else {}
    if args.width is not None:
        extra["width"] = args.width
    return build_model(args.model, num_classes=outputs, in_channels=inputs, **extra)


def _error(message: str) -> int:
    """Print one error line (not a usage error: no usage line) and return exit code 2."""
    print(f"ke-fast run: error: {message}", file=sys.stderr)
    return 2


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: the options the user gave, --out and --resume."""
    words = [*launcher(), "run"]
    for dest, value in getattr(args, "given", {}).items():  # every option's dest is its flag with "_" for "-"
        if dest in ("out", "resume", "overwrite"):
            continue
        words += [f"--{dest.replace('_', '-')}"] + ([] if value is True else list(map(str, value))
                                                    if isinstance(value, list) else [",".join(map(str, value))]
                                                    if isinstance(value, tuple) else [str(value)])  # per generation
    command = shlex.join([*words, "--out", args.out, "--resume"])
    nodes = "--nnodes=" in command
    return command + (" (on every node, with the rendezvous options it was started with)" if nodes else "")


def _config(args: argparse.Namespace, seed: int) -> Config:
    """The run's Config from the arguments (it checks them: ConfigError)."""
    return Config(split=args.split, split_rate=args.split_rate, generations=args.generations, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                  warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, seed=seed,
                  evolve_mode=args.evolve_mode, reset_bn=args.reset_bn, resample_mask=args.resample_mask,
                  task=args.task, reset_from=args.reset_from, mask_criterion=args.mask_criterion,
                  amp=False if args.no_amp else None, schedule=args.schedule, regularizer=args.regularizer,
                  val_every=args.val_every, recipe=args.recipe, graphs=args.graphs)


def _study_seeds(args: argparse.Namespace) -> list[int] | None:
    """The seeds of a study (--seeds, or --seed with --baseline), None for a single run."""
    if args.seeds is None and args.baseline is None:
        return None
    return args.seeds or [args.seed]


def _recipe_line(args: argparse.Namespace) -> str:
    """The one line stating the effective recipe (printed at the start, stored in summary.json's config)."""
    return recipes.describe(args.recipe, {k: getattr(args, k) for k in recipes.RECIPES[args.recipe]
                                          if k != "image_size" or args.image_size is not None}
                            | dict(regularizer=args.regularizer))


def _identity(args: argparse.Namespace) -> dict:
    """The flags that choose data and model: a resume with other ones is refused (with the data's and the
    architecture's fingerprints, which Evolution adds)."""
    return {"--dataset": args.dataset, "--model": args.model, "--per-class": args.per_class,
            "--image-size": args.image_size, "--width": args.width, "--embedding-dim": args.embedding_dim}


def _run_options(args: argparse.Namespace) -> dict:
    """The Evolution keywords of the run options that are not part of the Config (how, not what, it trains)."""
    return dict(checkpoint_every=args.checkpoint_every, device_fraction=args.data_on_device,
                compile=args.compile_mode or args.compile, plot=not args.no_plot)


def _data_and_model(args: argparse.Namespace, seed: int) -> tuple[torch.nn.Module, Dataset, Dataset, Dataset | None]:
    """The unsplit model and (train, test, val or None) of one seed (the digits and diabetes splits depend on
    it), as the task wants them; raises DataError."""
    task, small, val = TASKS[args.task], True, None
    if args.dataset == "digits":  # a task with a split of its own pools every image: any per_class gives them all
        train, test, classes, channels = digits(args.per_class or 1, seed=seed)
    elif args.dataset == "diabetes":
        train, test, classes, channels = diabetes(seed)
    else:  # a task that re-splits by class pools the splits: each keeps the training store (its augmentation)
        train, val, test, classes, channels = load(args.dataset, args.image_size, pooled=task.own_split is not None)
        small = args.image_size < 64
        val = None if task.own_split else val
    try:
        train, test = task.prepare(train, test)
    except ValueError as exc:
        raise DataError(f"--task {args.task} on {args.dataset}: {exc}") from None
    torch.manual_seed(seed)
    return _build(args, task.outputs(classes, args.embedding_dim), channels, small), train, test, val


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _run(args: argparse.Namespace, device: str) -> int:
    """Load the data, build the model and run KE on ``device``; returns the exit code."""
    if _study_seeds(args) is not None:
        return _run_study(args, device)
    task, ev = TASKS[args.task], None
    try:
        try:
            model, train, test, val = _data_and_model(args, args.seed)
        except DataError as exc:
            return _error(str(exc))
        cfg = _config(args, args.seed)
        ev = Evolution(model, train, test, cfg, args.out, device=device, progress=False if args.no_progress else None,
                       identity=_identity(args), val_set=val, **_run_options(args))
        if _rank() == 0:
            unit = "samples" if args.dataset in VECTOR_DATASETS else "images"
            print(f"KE {cfg.split.upper()} {cfg.split_rate} | {args.model} | {args.dataset}: {len(train)} train / "
                  + (f"{len(val)} val / " if val is not None else "") + f"{len(test)} test {unit}"
                  f"{task.describe(train, test)} | {ev.device}\n{_recipe_line(args)}")
        try:
            history = ev.run(resume=args.resume, overwrite=args.overwrite)
        except (CheckpointError, DataError) as exc:
            return _error(str(exc))
    except KeyboardInterrupt:
        if _rank() == 0:
            _interrupted(args, ev)
        return 130
    if _rank() == 0:
        print("\n" + task.table(history))
        if ev.start[0] > cfg.generations:
            print(f"\nthe run in {args.out} is finished: nothing trained, no file changed")
        else:
            print(f"\nwrote {Path(args.out) / 'history.csv'}, summary.json{'' if args.no_plot else ', plot.png'} "
                  f"and the checkpoint last.pt")
    return 0


def _run_study(args: argparse.Namespace, device: str) -> int:
    """Run KE once per seed (and the baseline) into OUT/seed-<n>/, then the table over the seeds."""
    seeds = _study_seeds(args)
    study = Study(lambda seed: _data_and_model(args, seed), _config(args, seeds[0]), seeds, args.out,
                  baseline=args.baseline, device=device, progress=False if args.no_progress else None,
                  identity=_identity(args), **_run_options(args))
    try:
        if _rank() == 0:
            print(f"KE {args.split.upper()} {args.split_rate} | {args.model} | {args.dataset} | seeds "
                  f"{' '.join(map(str, seeds))}" + (f" | {args.baseline} baseline" if args.baseline else "")
                  + f" | {device}\n{_recipe_line(args)}")
        try:
            summary = study.run(resume=args.resume, overwrite=args.overwrite)
        except (CheckpointError, DataError) as exc:
            return _error(str(exc))
    except KeyboardInterrupt:
        if _rank() == 0:
            _interrupted(args, study.current)
        return 130
    if _rank() == 0:
        print("\n" + results_markdown(summary))
        print(f"wrote {Path(args.out) / 'summary.json'}, results.md{'' if args.no_plot else ', plot.png'} "
              f"and seed-<n>/ run folders")
    return 0


def _interrupted(args: argparse.Namespace, ev: Evolution | None) -> None:
    """After Ctrl-C: one line saying where the last checkpoint is and the command that continues from it."""
    out = Path(args.out) if ev is None else ev.out  # a study: the folder of the run that was interrupted
    ckpt = next((out / name for name in CHECKPOINTS if (out / name).exists()), None)
    if ckpt is None and not StudyDir(args.out).files():
        print("ke-fast run: interrupted before the first checkpoint; nothing to resume", file=sys.stderr)
        return
    if ckpt is None:  # a study whose earlier runs are finished
        where = f"{out} had no checkpoint yet"
    else:
        when = f" (generation {ev.saved[0]}, epoch {ev.saved[1]})" if ev is not None and ev.saved else ""
        where = f"the last checkpoint is {ckpt}{when}"
    print(f"ke-fast run: interrupted; {where}; continue with: {_resume_command(args)}", file=sys.stderr)
