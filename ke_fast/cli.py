"""Command line: ``python -m ke_fast run`` (or ``ke-fast run``) — KE on the bundled digits by default."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from .data import DIGITS_MAX_PER_CLASS, DataError, digits, images
from .evolve import CHECKPOINTS, RUN_FILES, CheckpointError, Config, Evolution, init_process_group
from .metric import TASKS, class_split
from .models import build_model
from .study import BASELINES, Study, baseline_dir, remove_study, results_markdown, seed_dir, study_files
from .variants import MASK_CRITERIA, layers_matching

RESNETS = ("resnet18", "resnet50")  # the models --width applies to


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to options with a real default; an on/off flag is off unless given, and an
    option whose default depends on other options (default None) says so in its own help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:  # nargs 0: an on/off flag
            return action.help
        return super()._get_help_string(action)


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``run`` subcommand (whose ``error`` prints the ``run`` usage line)."""
    d = Config()
    p = argparse.ArgumentParser(prog="ke-fast", description="Knowledge Evolution with ke_fast")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run KE (default: sklearn digits, 20 images per class, small ResNet-18)",
                       description="Run KE. OUT must not hold another run: continue it with --resume (which "
                                   "checks that settings, data and model match) or replace it with --overwrite.",
                       formatter_class=_HelpFormatter)
    r.add_argument("--dataset", default="digits",
                   help="'digits' (bundled, no download), a folder with train/ and test/ (or val/) in ImageFolder "
                        "layout, or one in the official KE split-list layout (jpg/ or images/ and lists/*.csv); "
                        "images are decoded once and cached in <folder>/.ke_fast_cache")
    r.add_argument("--per-class", type=int, default=None,
                   help=f"digits only: training images per class, 1 .. {DIGITS_MAX_PER_CLASS} (every class keeps at "
                        f"least one test image; default: 20)")
    r.add_argument("--image-size", type=int, default=None,
                   help="image folders only: training crops and test images are this size, square; below 64 "
                        "the ResNets take the small-input stem (default: 224)")
    r.add_argument("--model", default="resnet18", choices=[*RESNETS, "small_cnn", "densenet_tiny"],
                   help="the network")
    r.add_argument("--width", type=int, default=None,
                   help="resnet18 / resnet50 only: base width (64 = the standard ResNet; default: 16)")
    r.add_argument("--split", choices=["kels", "wels"], default=d.split,
                   help="kels: whole kernels (channels) are fit or reset; wels: single weights, drawn at random")
    r.add_argument("--split-rate", type=float, default=d.split_rate, help="fraction of the weights that is fit, (0, 1]")
    r.add_argument("--generations", type=int, default=d.generations, help="number of generations")
    r.add_argument("--epochs", type=int, default=d.epochs, help="epochs per generation")
    r.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size (per process under torchrun)")
    r.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of SGD (cosine schedule, warm-up)")
    r.add_argument("--weight-decay", type=float, default=d.weight_decay, help="SGD weight decay, >= 0")
    # several seeds and the compute-matched baseline (ke_fast.study)
    seeding = r.add_mutually_exclusive_group()
    seeding.add_argument("--seed", type=int, default=None,
                         help=f"run seed, 0 .. 2^64-1: data split and order, weights, masks and resets "
                              f"(default: {d.seed})")
    seeding.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                         help="run the same configuration once per seed, one after another, into OUT/seed-<n>/ (each "
                              "a run folder of its own) and write OUT/summary.json, results.md and plot.png: per "
                              "generation the mean and sample std (ddof=1) over the seeds (default: one run, --seed)")
    r.add_argument("--baseline", choices=BASELINES, default=None,
                   help="long: per seed, also train the same model densely (no split, no reset) for generations x "
                        "epochs epochs in one schedule (same lr, warm-up, batch size, data, seed) into "
                        "OUT/seed-<n>/baseline/, reported beside KE's last generation; writes the --seeds layout "
                        "(with --seed: that one seed) (default: none)")
    r.add_argument("--evolve-mode", choices=["rand", "zero", "rewind"], default=d.evolve_mode,
                   help="reset weights between generations: rand = re-drawn, zero = zeroed, rewind = back to "
                        "their generation-0 values")
    r.add_argument("--reset-bn", action="store_true", help="also reset BatchNorm of reset channels")
    r.add_argument("--resample-mask", action="store_true", help="--split wels only: a new mask every generation")
    # KE variants and metric learning (ke_fast.variants, ke_fast.metric)
    r.add_argument("--reset-from", default=None, metavar="LAYER",
                   help="layer-threshold forgetting (Zhou et al., ICLR 2022): between generations keep every weight "
                        "of the layers before LAYER (forward order) and re-draw every weight from it on; LAYER is a "
                        "conv/linear module name (layer3.0.conv1) or a module prefix (layer3); the split masks "
                        "still define the fit hypothesis (default: off, the split masks decide)")
    r.add_argument("--mask-criterion", choices=MASK_CRITERIA, default=d.mask_criterion,
                   help="--split wels only: the fit mask drawn at random, or the top-k weights per layer by "
                        "|W| (magnitude) or SNIP saliency |W*dL/dW| (Lee et al., ICLR 2019), chosen from the "
                        "trained network at the end of generation 1 (with --resample-mask: of every generation)")
    r.add_argument("--task", choices=TASKS, default=d.task,
                   help="classify: cross-entropy, top-1; metric: an embedding head, the normalised-softmax loss "
                        "(Zhai & Wu, BMVC 2019) on the first half of the classes, Recall@1/4 on the other half")
    r.add_argument("--embedding-dim", type=int, default=None,
                   help="--task metric only: embedding size of the head (default: 64)")
    r.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    r.add_argument("--out", default="runs/ke", help="output folder (checkpoints, history.csv, summary.json, plot.png)")
    again = r.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from last.pt (prev.pt if last.pt is missing); refused if its "
                            "settings, data or model differ; starts afresh if OUT holds no run")
    again.add_argument("--overwrite", action="store_true",
                       help="start afresh although OUT holds a run: its last.pt, prev.pt, history.csv, summary.json "
                            "and plot.png are deleted once every check has passed, just before training")
    r.add_argument("--checkpoint-every", type=float, default=10.0, metavar="MIN",
                   help="minutes between checkpoints within a generation (0: after every epoch); every generation "
                        "ends with one")
    r.add_argument("--data-on-device", type=float, default=0.5, metavar="FRACTION",
                   help="keep a data set on the GPU when it takes at most this fraction of its memory (0: never); "
                        "else pinned host memory with prefetching")
    r.add_argument("--compile", action="store_true", help="torch.compile the training step")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar with images/s and the run's ETA on a terminal)")
    return p, r


def _check(r: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, through ``r.error`` (exit 2), every value and combination that cannot work or would do
    nothing, and an OUT that is no writable folder or holds a run we were not told to resume or replace;
    then fill in the defaults that depend on other options. Touches nothing."""
    digits_data = args.dataset == "digits"
    for flag, value, applies, scope, given in (
            ("--per-class", args.per_class, digits_data, "--dataset digits", f"--dataset {args.dataset}"),
            ("--image-size", args.image_size, not digits_data, "image folders", "--dataset digits"),
            ("--width", args.width, args.model in RESNETS, "--model resnet18 / resnet50", f"--model {args.model}")):
        if value is not None and not applies:
            r.error(f"{flag} applies to {scope} only, not to {given}")
    if args.resample_mask and args.split != "wels":
        r.error("--resample-mask applies to --split wels only (KELS masks follow the channels and never change)")
    if args.mask_criterion != "random" and args.split != "wels":
        r.error(f"--mask-criterion {args.mask_criterion} applies to --split wels only (KELS masks are whole "
                f"channels, fixed by the graph)")
    metric = args.task == "metric"
    if metric and args.per_class is not None:
        r.error("--per-class applies to --task classify only (--task metric trains on every image of the first "
                "half of the classes)")
    if not metric and args.embedding_dim is not None:
        r.error("--embedding-dim applies to --task metric only")
    if metric and args.embedding_dim is None:
        args.embedding_dim = 64
    if args.embedding_dim is not None and args.embedding_dim < 1:
        r.error(f"--embedding-dim must be >= 1, got {args.embedding_dim}")
    # the defaults of the options that apply; the others stay None
    if digits_data and args.per_class is None and not metric:
        args.per_class = 20
    if not digits_data and args.image_size is None:
        args.image_size = 224
    if args.model in RESNETS and args.width is None:
        args.width = 16
    for name in ("generations", "epochs", "batch_size", "per_class", "image_size", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            r.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if digits_data and args.per_class is not None and args.per_class > DIGITS_MAX_PER_CLASS:
        r.error(f"--per-class must be at most {DIGITS_MAX_PER_CLASS} for digits (the smallest class has "
                f"{DIGITS_MAX_PER_CLASS + 1} images and keeps at least one for testing), got {args.per_class}")
    if not 0 < args.split_rate <= 1:
        r.error(f"--split-rate must be in (0, 1], got {args.split_rate}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        r.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        r.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not (args.checkpoint_every >= 0 and math.isfinite(args.checkpoint_every)):
        r.error(f"--checkpoint-every must be a finite number of minutes >= 0, got {args.checkpoint_every}")
    if not 0 <= args.data_on_device <= 1:
        r.error(f"--data-on-device must be a fraction in [0, 1], got {args.data_on_device}")
    if args.seed is None and args.seeds is None:
        args.seed = Config().seed
    for seed in args.seeds or [args.seed]:
        if not 0 <= seed < 2 ** 64:
            r.error(f"--seed{'s' if args.seeds else ''} must be in 0 .. 2^64-1, got {seed}")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        r.error(f"--seeds must be distinct, got {' '.join(map(str, args.seeds))}")
    if args.reset_from is not None:  # the layer names do not depend on the data: a model on "meta" tells them
        with torch.device("meta"):
            names = [n for n, m in _build(args, 2, 3).named_modules()
                     if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Linear)]
        try:
            layers_matching(names, args.reset_from)
        except ValueError as exc:
            r.error(f"--reset-from: {exc}")
    _check_out(r, args)


def _build(args: argparse.Namespace, outputs: int, channels: int, small: bool = True) -> torch.nn.Module:
    """The network of --model with ``outputs`` outputs (classes, or --embedding-dim for --task metric)."""
    if args.model in RESNETS:
        return build_model(args.model, num_classes=outputs, in_channels=channels, stem="small" if small else "imagenet",
                           width=args.width)
    return build_model(args.model, num_classes=outputs, in_channels=channels)


def _check_out(r: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--out must be (or be creatable as) a writable folder and hold no run unless --resume / --overwrite."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        r.error(f"--out {args.out!r} is a file, expected a folder")
    parent = next(q for q in (out, *out.parents) if q.exists())  # the folder that is (or will hold) OUT
    if not parent.is_dir():
        r.error(f"--out {args.out!r}: {str(parent)!r} is a file, expected a folder")
    try:  # a nameless file that is gone when closed: permissions, read-only mounts, /proc ... all answer
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        r.error(f"--out {args.out!r}: cannot write into {str(parent)!r} ({exc.strerror or exc})")
    if _study_seeds(args) is not None:
        _check_study_out(r, args, out)
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (args.resume or args.overwrite):
        r.error(f"--out {args.out!r} holds a run ({', '.join(found)}): continue it with --resume, or start "
                f"afresh and replace it with --overwrite")
    if args.resume and found and not any(name in found for name in CHECKPOINTS):
        r.error(f"--resume: --out {args.out!r} holds {', '.join(found)} but no checkpoint ({' / '.join(CHECKPOINTS)}) "
                f"to resume from; start afresh with --overwrite")


def _study_seeds(args: argparse.Namespace) -> list[int] | None:
    """The seeds of a study (--seeds, or --seed with --baseline), None for a single run."""
    if args.seeds is None and args.baseline is None:
        return None
    return args.seeds or [args.seed]


def _check_study_out(r: argparse.ArgumentParser, args: argparse.Namespace, out: Path) -> None:
    """A study's OUT: no run or study files anywhere in it (OUT, seed-*/, seed-*/baseline/) unless --resume /
    --overwrite; --resume refuses a single run in OUT and a seed folder with files but no checkpoint."""
    found = study_files(out)
    if found and not (args.resume or args.overwrite):
        names = ", ".join(str(f.relative_to(out)) for f in found[:6]) + (", ..." if len(found) > 6 else "")
        r.error(f"--out {args.out!r} holds a run ({names}): continue it with --resume, or start afresh and replace "
                f"it with --overwrite")
    if not args.resume:
        return
    single = [name for name in CHECKPOINTS if (out / name).exists()]
    if single:
        r.error(f"--resume: --out {args.out!r} holds a single run ({', '.join(single)}), not the seed-<n>/ folders "
                f"of --seeds / --baseline; use another --out, or replace it with --overwrite")
    for seed in _study_seeds(args):
        for folder in (seed_dir(out, seed), baseline_dir(out, seed)):
            files = [name for name in RUN_FILES if (folder / name).exists()]
            if files and not any(name in files for name in CHECKPOINTS):
                r.error(f"--resume: {str(folder)!r} holds {', '.join(files)} but no checkpoint "
                        f"({' / '.join(CHECKPOINTS)}) to resume from; start afresh with --overwrite")


def resolve_device(device: str | None, cuda_available: bool, device_count: int, local_rank: int = 0,
                   local_world_size: int = 1) -> tuple[str, str]:
    """This process's device and the process-group backend that goes with it: ``(device, backend)``.

    ``cpu`` never touches CUDA: ``("cpu", "gloo")``. ``cuda`` (the default where CUDA is available) gives
    local rank i the GPU ``cuda:i`` and ``nccl``, so it needs a GPU per local rank; ``cuda:N`` pins a
    single process to GPU N. Other device types (mps, xpu ...) pass through with ``gloo`` where this torch
    has them available. ``local_rank`` and
    ``local_world_size`` are torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE (0 and 1 without torchrun).

    Raises ValueError, with a message naming --device, when the request cannot be met."""
    name = f"--device {device}" if device is not None else "--device cuda (the default where CUDA is available)"
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        backend = getattr(torch, dev.type, None)  # torch.mps, torch.xpu ...; torch.device also knows "meta"
        if not (callable(getattr(backend, "is_available", None)) and backend.is_available()):
            raise ValueError(f"--device {device}: no {dev.type} device is available; expected cpu, cuda or cuda:N")
    if dev.type != "cuda":
        return str(dev), "gloo"
    if not cuda_available:
        raise ValueError(f"{name}: CUDA is not available")
    ranks = max(local_world_size, local_rank + 1)
    if dev.index is None:
        if ranks > device_count:
            raise ValueError(f"{name}: {ranks} local ranks need one CUDA device each, but {device_count} "
                             f"CUDA device(s) are visible; use --device cpu or at most {device_count} "
                             f"rank(s) per node")
        return f"cuda:{local_rank}", "nccl"
    if dev.index >= device_count:
        raise ValueError(f"{name}: expected cuda:0 .. cuda:{device_count - 1}, as {device_count} CUDA "
                         f"device(s) are visible")
    if ranks > 1:
        raise ValueError(f"{name} would put all {ranks} local ranks on one GPU; use --device cuda "
                         f"(local rank i gets cuda:i) or --device cpu")
    return str(dev), "nccl"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code: 0, 2 for an error (argument errors exit with 2 through
    argparse, before any work), 130 when interrupted (Ctrl-C)."""
    p, r = _parser()
    args = p.parse_args(argv)
    _check(r, args)
    # a non-CUDA --device does not even ask the CUDA driver
    cuda = (args.device is None or args.device.startswith("cuda")) and torch.cuda.is_available()
    local_rank, local_world_size = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        device, backend = resolve_device(args.device, cuda, torch.cuda.device_count() if cuda else 0, local_rank,
                                         local_world_size)
    except ValueError as exc:
        r.error(str(exc))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # under torchrun: one process per rank
        init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(device)
    try:
        return _run(args, device)
    finally:
        if distributed:
            dist.destroy_process_group()


def _error(message: str) -> int:
    """Print one error line (not a usage error: no usage line) and return exit code 2."""
    print(f"ke-fast run: error: {message}", file=sys.stderr)
    return 2


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: every option that differs from its default, --out, --resume."""
    r = _parser()[1]
    words = ["python", "-m", "ke_fast", "run"]
    for dest, value in vars(args).items():  # every option's dest is its flag with "_" for "-"
        if dest in ("command", "out", "resume", "overwrite") or value is None or value is False \
                or value == r.get_default(dest):  # "is": a value 0 equals False
            continue
        words += [f"--{dest.replace('_', '-')}"] + ([] if value is True else list(map(str, value))
                                                    if isinstance(value, list) else [str(value)])
    return shlex.join([*words, "--out", args.out, "--resume"])


def _config(args: argparse.Namespace, seed: int) -> Config:
    """The run's Config from the checked arguments."""
    return Config(split=args.split, split_rate=args.split_rate, generations=args.generations, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=seed,
                  evolve_mode=args.evolve_mode, reset_bn=args.reset_bn, resample_mask=args.resample_mask,
                  task=args.task, reset_from=args.reset_from, mask_criterion=args.mask_criterion,
                  amp=False if args.no_amp else None)


def _identity(args: argparse.Namespace) -> dict:
    """The flags that choose data and model: a resume with other ones is refused (with the data's and the
    architecture's fingerprints, which Evolution adds)."""
    return {"--dataset": args.dataset, "--model": args.model, "--per-class": args.per_class,
            "--image-size": args.image_size, "--width": args.width, "--embedding-dim": args.embedding_dim}


def _run_options(args: argparse.Namespace) -> dict:
    """The Evolution keywords of the run options that are not part of the Config (how, not what, it trains)."""
    return dict(checkpoint_every=args.checkpoint_every, device_fraction=args.data_on_device, compile=args.compile)


def _data_and_model(args: argparse.Namespace, seed: int) -> tuple[torch.nn.Module, Dataset, Dataset]:
    """The unsplit model and (train, test) of one seed (the digits split depends on it); raises DataError."""
    if args.dataset == "digits":  # --task metric pools every image: any per_class gives them all
        train, test, classes, channels = digits(args.per_class or 1, seed=seed)
        small = True
    else:
        train, test, classes, channels = images(args.dataset, args.image_size)
        small = args.image_size < 64
    if args.task == "metric":
        try:
            train, test = class_split(train, test)
        except ValueError as exc:
            raise DataError(f"--task metric on {args.dataset}: {exc}") from None
    torch.manual_seed(seed)
    model = _build(args, args.embedding_dim if args.task == "metric" else classes, channels, small)
    return model, train, test


def _run(args: argparse.Namespace, device: str) -> int:
    """Load the data, build the model and run KE on ``device``; returns the exit code."""
    if _study_seeds(args) is not None:
        return _run_study(args, device)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ev = None
    try:
        try:
            model, train, test = _data_and_model(args, args.seed)
        except DataError as exc:
            return _error(str(exc))
        cfg = _config(args, args.seed)
        ev = Evolution(model, train, test, cfg, args.out, device=device,
                       progress=False if args.no_progress else None, identity=_identity(args), **_run_options(args))
        if rank == 0:
            classes = f" (classes {train.classes} / {test.classes})" if args.task == "metric" else ""
            print(f"KE {cfg.split.upper()} {cfg.split_rate} | {args.model} | {args.dataset}: {len(train)} train / "
                  f"{len(test)} test images{classes} | {cfg.generations} generations x {cfg.epochs} epochs | "
                  f"{ev.device}")
            if args.overwrite:
                removed = [name for name in RUN_FILES if (Path(args.out) / name).exists()]
                for name in removed:
                    (Path(args.out) / name).unlink()
                if removed:
                    print(f"--overwrite: deleted {', '.join(removed)} of the previous run in {args.out}")
        try:
            history = ev.run(resume=args.resume)
        except (CheckpointError, DataError) as exc:
            return _error(str(exc))
    except KeyboardInterrupt:
        if rank == 0:
            _interrupted(args, ev)
        return 130
    if rank == 0:
        if args.task == "metric":
            keys, heads = ["dense_recall1", "fit_recall1", "dense_recall4", "fit_recall4"], \
                ["dense R@1", "fit R@1", "dense R@4", "fit R@4"]
        else:
            keys, heads = ["dense_acc", "fit_acc"], ["dense N_g", "fit H^F_g"]
        print("\ngeneration | " + " | ".join(f"{h:>9}" for h in heads))
        for row in history:
            print(f"{row['generation']:10d} | " + " | ".join(f"{100 * row[k]:8.1f}%" for k in keys))
        if ev.start[0] > cfg.generations:
            print(f"\nthe run in {args.out} is finished: nothing trained, no file changed")
        else:
            print(f"\nwrote {Path(args.out) / 'history.csv'}, summary.json, plot.png and the checkpoint last.pt")
    return 0


def _run_study(args: argparse.Namespace, device: str) -> int:
    """Run KE once per seed (and the baseline) into OUT/seed-<n>/, then the table over the seeds."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    seeds = _study_seeds(args)
    study = Study(lambda seed: _data_and_model(args, seed), _config(args, seeds[0]), seeds, args.out,
                  baseline=args.baseline, device=device, progress=False if args.no_progress else None,
                  identity=_identity(args), **_run_options(args))
    try:
        if rank == 0:
            print(f"KE {args.split.upper()} {args.split_rate} | {args.model} | {args.dataset} | {args.generations} "
                  f"generations x {args.epochs} epochs | seeds {' '.join(map(str, seeds))}"
                  + (f" | {args.baseline} baseline" if args.baseline else "") + f" | {device}")
            if args.overwrite:
                removed = remove_study(args.out)
                if removed:
                    print(f"--overwrite: deleted {len(removed)} files of the previous run(s) in {args.out}")
        try:
            summary = study.run(resume=args.resume)
        except (CheckpointError, DataError) as exc:
            return _error(str(exc))
    except KeyboardInterrupt:
        if rank == 0:
            _interrupted(args, study.current)
        return 130
    if rank == 0:
        print("\n" + results_markdown(summary))
        print(f"wrote {Path(args.out) / 'summary.json'}, results.md, plot.png and seed-<n>/ run folders")
    return 0


def _interrupted(args: argparse.Namespace, ev: Evolution | None) -> None:
    """After Ctrl-C: one line saying where the last checkpoint is and the command that continues from it."""
    out = Path(args.out) if ev is None else ev.out  # a study: the folder of the run that was interrupted
    ckpt = next((out / name for name in CHECKPOINTS if (out / name).exists()), None)
    if ckpt is None and not study_files(args.out):
        print("ke-fast run: interrupted before the first checkpoint; nothing to resume", file=sys.stderr)
        return
    if ckpt is None:  # a study whose earlier runs are finished
        where = f"{out} had no checkpoint yet"
    else:
        when = f" (generation {ev.saved[0]}, epoch {ev.saved[1]})" if ev is not None and ev.saved else ""
        where = f"the last checkpoint is {ckpt}{when}"
    print(f"ke-fast run: interrupted; {where}; continue with: {_resume_command(args)}", file=sys.stderr)
