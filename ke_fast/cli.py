"""Command line: ``python -m ke_fast run`` (or ``ke-fast run``) — KE on the bundled digits by default.

It only translates flags: the options are checked by :class:`ke_fast.config.Config`, the run folder's
overwrite / resume policy is :class:`ke_fast.rundir.RunDir`'s (:class:`~ke_fast.rundir.StudyDir`'s for a
study), and what each task needs is its :class:`ke_fast.tasks.Task`'s; their errors come back here worded
with the flags. The checks about the command line alone (which flags apply to which data and model, the
output folder) are here.
"""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist

from . import recipes
from .config import REGULARIZERS, SCHEDULES, Config, ConfigError
from .data import DIGITS_MAX_PER_CLASS
from .evolve import check_run_options
from .processes import init_process_group, resolve_device
from .models import check_model, model_names, model_options
from .rundir import CheckpointWarning, RunDir, RunExistsError, StudyDir
from .runner import (VECTOR_DATASETS, VECTOR_MODELS, _build, _config, _data_and_model, _error,  # noqa: F401
                     _identity, _interrupted, _resume_command, _run, _run_options, _study_seeds)
from .step import COMPILE_MODES, compile_mode
from .study import BASELINES
from .tasks import TASKS, Task
from .variants import MASK_CRITERIA, layers_matching

BUNDLED = {t.dataset for t in TASKS.values()}  # the bundled data sets: each a task's default
_UNSET = object()


def _per_generation(kind: type) -> Callable[[str], Any]:
    """An argparse type: one ``kind`` value, or comma-separated values (one per generation) as a tuple."""
    def parse(text: str) -> Any:
        values = tuple(kind(v) for v in text.split(","))
        return values[0] if len(values) == 1 else values
    parse.__name__ = f"{kind.__name__} or comma-separated {kind.__name__}s"  # argparse's word for a bad value
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to options with a real default; an on/off flag is off unless given, and an
    option whose default depends on other options (default None) says so in its own help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:  # nargs 0: an on/off flag
            return action.help
        return super()._get_help_string(action)


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``run`` subcommand (whose ``error`` prints the ``run`` usage line)."""
    d, demo = Config(), recipes.RECIPES["demo"]
    p = argparse.ArgumentParser(prog="ke-fast", description="Knowledge Evolution with ke_fast")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("make-data", add_help=False, help="write a generated data set in an official layout: make-data "
                   "{flower102,aircraft,imagefolder} DIR [--classes C --per-class N --seed S] (ke_fast.synth)")
    r = sub.add_parser("run", help="run KE (default: sklearn digits, 20 images per class, small ResNet-18)",
                       description="Run KE. OUT must not hold another run: continue it with --resume (which "
                                   "checks that settings, data and model match) or replace it with --overwrite.",
                       formatter_class=_HelpFormatter)
    r.add_argument("--dataset", default=None,
                   help="'digits' (bundled, no download), a folder with train/ and test/ (or val/) in ImageFolder "
                        "layout, or one in the official KE split-list layout (jpg/ or images/ and lists/*.csv), "
                        "decoded once and cached in <folder>/.ke_fast_cache; 'diabetes' (bundled) is the data of "
                        "--task regression (default: digits; diabetes for --task regression)")
    r.add_argument("--per-class", type=int, default=None,
                   help=f"digits only: training images per class, 1 .. {DIGITS_MAX_PER_CLASS} (every class keeps at "
                        f"least one test image; default: 20)")
    r.add_argument("--image-size", type=int, default=None,
                   help="image folders only: training crops and test images are this size, square; below 64 "
                        "the ResNets take the small-input stem (default: 224)")
    r.add_argument("--model", default=None,
                   help=f"the network: one of {', '.join(model_names())}, or MODULE:FUNCTION for one of your own "
                        f"(called with num_classes and in_channels); mlp takes feature vectors (--dataset diabetes), "
                        f"the others images (default: resnet18 for images, mlp for feature vectors)")
    r.add_argument("--width", type=int, default=None,
                   help="models with a width option only (the ResNets, vgg11_bn): base width (default: the "
                        "architecture's standard, 64, with --recipe official; 16 with --recipe demo)")
    r.add_argument("--recipe", choices=recipes.RECIPE_NAMES, default=None,
                   help="the training settings unless a flag gives them: official = the KE paper's code (full-width "
                        "network, 224 px, batch 32, lr 0.256, 5 warm-up epochs then cosine stepped per epoch, 200 "
                        "epochs x 5 generations, validation every 10 epochs; ke_fast/recipes.py cites them), demo = "
                        "seconds on the digits (default: official on image folders, else demo)")
    r.add_argument("--regularizer", choices=REGULARIZERS, default=d.regularizer,
                   help="smooth: label smoothing alone; cskd: plus class-wise self-knowledge distillation (Yun et "
                        "al., CVPR 2020): batches of same-class pairs, 3 x KL at temperature 4 (--task classify)")
    r.add_argument("--split", choices=["kels", "wels"], default=d.split,
                   help="kels: whole kernels (channels) are fit or reset; wels: single weights, drawn at random")
    r.add_argument("--split-rate", type=float, default=d.split_rate,
                   help="fraction of the weights that is fit, (0, 1]")
    recipe = "(default: the recipe's: official {official}, demo {demo})"
    for flag, kind, text in (("generations", int, "number of generations"),
                             ("epochs", _per_generation(int), "epochs per generation, or one value per generation "
                                                              "(200,100,50,50,50)"),
                             ("batch-size", int, "batch size (per process under torchrun)"),
                             ("lr", _per_generation(float), "peak learning rate of SGD, or one per generation"),
                             ("momentum", float, "SGD momentum, >= 0"),
                             ("weight-decay", float, "SGD weight decay, >= 0 (official: 5e-4 for VGG)"),
                             ("label-smoothing", float, "label smoothing of the cross-entropy, in [0, 1]"),
                             ("warmup-epochs", int, "linear warm-up epochs before the cosine decay"),
                             ("schedule", str, f"the lr changes every step or once per epoch, one of {SCHEDULES}"),
                             ("val-every", int, "epochs between evaluations on the validation split while "
                                                "training (0: only after each generation)")):
        key = flag.replace("-", "_")
        r.add_argument(f"--{flag}", type=kind, default=None,
                       help=f"{text} " + recipe.format(official=recipes.RECIPES["official"][key], demo=demo[key]))
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
    r.add_argument("--task", choices=tuple(TASKS), default=d.task,
                   help="classify: cross-entropy, top-1; metric: an embedding head, the normalised-softmax loss "
                        "(Zhai & Wu, BMVC 2019) on the first half of the classes, Recall@1/4 on the other half; "
                        "regression: MSE on a continuous target, RMSE (lower is better) and R^2 (--dataset diabetes)")
    r.add_argument("--embedding-dim", type=int, default=None,
                   help="--task metric only: embedding size of the head (default: 64)")
    r.add_argument("--no-amp", action="store_true",
                   help="CUDA only: no bf16 autocast (on by default there; never on for other devices, so "
                        "--no-amp is refused there)")
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
    r.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="the torch.compile mode of --compile (implies it); reduce-overhead: CUDA graphs recorded by "
                        "the compiler, the alternative to --graphs (not with it) (default: none; --compile alone "
                        "takes torch.compile's standard mode)")
    r.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA only: the training step as one captured CUDA graph (default: automatic, off for now)")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar with images/s and the run's ETA on a terminal)")
    r.add_argument("--no-plot", action="store_true",
                   help="do not draw plot.png (matplotlib: about 1 s per process on a 2-core CPU); history.csv "
                        "and summary.json hold every figure (default: draw it)")
    return p, r


def _flags(args: argparse.Namespace) -> dict[str, str]:
    """The flag of each option whose name differs from ``--`` + its field name with dashes."""
    return dict(seed="--seeds" if args.seeds else "--seed", amp="--no-amp", out_dir="--out",
                device_fraction="--data-on-device")


def _check(r: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, through ``r.error`` (exit 2), every value and combination that cannot work or would do
    nothing, and an OUT that is no writable folder or holds a run we were not told to resume or replace;
    then fill in the defaults that depend on other options. Touches nothing."""
    task = TASKS[args.task]
    _check_data_and_model(r, args, task)
    digits_data, folder = args.dataset == "digits", args.dataset not in BUNDLED
    for flag, value, applies, scope, given in (
            ("--per-class", args.per_class, digits_data, "--dataset digits", f"--dataset {args.dataset}"),
            ("--image-size", args.image_size, folder, "image folders", f"--dataset {args.dataset}"),
            ("--width", args.width, _has_width(args.model), f"--model {' / '.join(recipes.WIDTH_MODELS)} or "
             f"MODULE:FUNCTION taking width", f"--model {args.model}")):
        if value is not None and not applies:
            r.error(f"{flag} applies to {scope} only, not to {given}")
    if task.own_split and args.per_class is not None:
        r.error(f"--per-class does not apply to --task {args.task} (it {task.own_split})")
    if task.embedding_default is None and args.embedding_dim is not None:
        takes = " / ".join(f"--task {n}" for n, t in TASKS.items() if t.embedding_default is not None)
        r.error(f"--embedding-dim applies to {takes} only")
    # the defaults of the options that apply; the others stay None
    if args.embedding_dim is None:
        args.embedding_dim = task.embedding_default
    if digits_data and args.per_class is None and not task.own_split:
        args.per_class = 20
    if args.recipe is None:
        args.recipe = recipes.default_recipe(folder)
    names = (*recipes.RECIPES[args.recipe], "regularizer")
    for name, value in recipes.resolve(args.recipe, args.model, {n: getattr(args, n, None) for n in names}).items():
        setattr(args, name, value)
    if not folder:
        args.image_size = None
    for name in ("per_class", "image_size", "width", "embedding_dim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            r.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if digits_data and args.per_class is not None and args.per_class > DIGITS_MAX_PER_CLASS:
        r.error(f"--per-class must be at most {DIGITS_MAX_PER_CLASS} for digits (the smallest class has "
                f"{DIGITS_MAX_PER_CLASS + 1} images and keeps at least one for testing), got {args.per_class}")
    if args.seed is None and args.seeds is None:
        args.seed = Config().seed
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        r.error(f"--seeds must be distinct, got {' '.join(map(str, args.seeds))}")
    try:  # every option of the run, checked where the library checks it
        check_run_options(args.checkpoint_every, args.data_on_device)
        for seed in args.seeds or [args.seed]:
            _config(args, seed)
    except ConfigError as exc:
        r.error(exc.render(_flags(args)))
    if args.reset_from is not None:  # the layer names do not depend on the data: a model on "meta" tells them
        with torch.device("meta"):
            names = [n for n, m in _build(args, 2, 3).named_modules()
                     if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Linear)]
        try:
            layers_matching(names, args.reset_from)
        except ValueError as exc:
            r.error(f"--reset-from: {exc}")
    _check_out(r, args)


def _has_width(model: str) -> bool:
    """Whether --width applies to ``model``: the ResNets and VGG of the registry, a MODULE:FUNCTION taking
    ``width`` (the registry's small models keep their own sizes)."""
    return model in recipes.WIDTH_MODELS or (":" in model and "width" in model_options(model))


def _check_data_and_model(r: argparse.ArgumentParser, args: argparse.Namespace, task: type[Task]) -> None:
    """The one rule of --dataset: a task runs on its bundled data set (the default) and, where it takes
    images, on image folders; then --model: mlp for feature vectors (the default there), an image model
    (default resnet18) for images."""
    if args.dataset is None:
        args.dataset = task.dataset
    elif args.dataset in BUNDLED and args.dataset != task.dataset:
        owners = " / ".join(f"--task {n}" for n, t in TASKS.items() if t.dataset == args.dataset)
        r.error(f"--dataset {args.dataset} applies to {owners} only; --task {args.task} runs on --dataset "
                f"{task.dataset}" + (" or an image folder" if task.images else ""))
    elif args.dataset not in BUNDLED and not task.images:
        r.error(f"--dataset {args.dataset}: --task {args.task} runs on --dataset {task.dataset} only, not on "
                f"image folders")
    vectors = args.dataset in VECTOR_DATASETS
    if args.model is None:
        args.model = VECTOR_MODELS[0] if vectors else "resnet18"
    try:  # the one check of --model: a registry name or an importable MODULE:FUNCTION
        check_model(args.model)
    except ValueError as exc:
        r.error(f"--model: {exc}")
    if (args.model in VECTOR_MODELS) != vectors:
        r.error(f"--model {args.model} takes {'feature vectors' if args.model in VECTOR_MODELS else 'images'}, "
                f"but --dataset {args.dataset} holds {'feature vectors' if vectors else 'images'}")


def _check_out(r: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--out must be (or be creatable as) a writable folder and hold no run unless --resume / --overwrite
    (the policy of RunDir / StudyDir, worded with the flags)."""
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
    try:
        if _study_seeds(args) is not None:
            StudyDir(out).check(_study_seeds(args), args.resume, args.overwrite)
        else:
            RunDir(out).check(args.resume, args.overwrite)
    except RunExistsError as exc:
        r.error(exc.render(_flags(args)))


def exit_fast(code: int | str | None) -> NoReturn:
    """End the process as ``sys.exit(code)`` would, without Python's teardown of every loaded module (about
    1-1.5 s of a short run's wall time once torch, torch._dynamo and matplotlib are loaded, measured on a
    2-core CPU; work no run needs). The exit handlers run first (``atexit``: logging, tqdm, torch's) and
    the standard streams are flushed; every file a run writes is closed, and the last checkpoint on disk,
    before :func:`main` returns (``Evolution.run`` waits for its writer)."""
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to write to
            pass
    os._exit(code or 0)


def console() -> NoReturn:
    """The ``ke-fast`` and ``python -m ke_fast`` entry point: :func:`main`, then :func:`exit_fast`. An
    uncaught exception ends the process the usual way (traceback, status 1)."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's errors (2) and --help (0)
        code = exc.code
    exit_fast(code)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code: 0, 2 for an error (argument errors exit with 2 through
    argparse, before any work), 130 when interrupted (Ctrl-C)."""
    p, r = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["make-data"]:
        from . import synth

        return synth.main(argv[1:])
    args = p.parse_args(argv)
    given = _given(argv, vars(args))
    _check(r, args)
    args.given = given
    # a non-CUDA --device does not even ask the CUDA driver
    cuda = (args.device is None or args.device.startswith("cuda")) and torch.cuda.is_available()
    local_rank, local_world_size = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        device, backend = resolve_device(args.device, cuda, torch.cuda.device_count() if cuda else 0, local_rank,
                                         local_world_size)
    except ValueError as exc:
        r.error(str(exc))
    if args.graphs and not device.startswith("cuda"):
        r.error(f"--graphs applies to CUDA devices only (CUDA graphs), got --device {device}")
    try:
        compile_mode(args.compile_mode or False, bool(args.graphs))
    except ValueError as exc:
        r.error(f"--compile-mode {args.compile_mode} with --graphs: {exc}")
    if args.no_amp and not device.startswith("cuda"):
        r.error(f"--no-amp applies to CUDA devices only: bf16 autocast is never on for --device {device}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # under torchrun: one process per rank
        init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(device)
    try:
        with warnings.catch_warnings():  # ke_fast's own (a resume past a corrupt last.pt) as one line
            show = warnings.showwarning
            warnings.showwarning = lambda message, category, *rest, **kw: print(
                f"ke-fast run: warning: {message}", file=sys.stderr) if issubclass(category, CheckpointWarning) \
                else show(message, category, *rest, **kw)
            return _run(args, device)
    finally:
        if distributed:
            dist.destroy_process_group()


def _given(argv: list[str], dests: dict[str, Any]) -> dict[str, Any]:
    """The options the command line gave, with their values as parsed (not the defaults _check fills in)."""
    p, r = _parser()
    r.set_defaults(**dict.fromkeys(dests, _UNSET))
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not _UNSET and k != "command"}


