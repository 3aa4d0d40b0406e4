"""Command line: ``python -m ke_fast run`` (or ``ke-fast run``) — KE on the bundled digits by default."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .data import DataError, digits, image_folder
from .evolve import CheckpointError, Config, Evolution, init_process_group
from .models import build_model


def _parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(prog="ke-fast", description="Knowledge Evolution with ke_fast")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run KE (default: sklearn digits, 20 images per class, small ResNet-18)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--dataset", default="digits",
                   help="'digits' (bundled, no download) or a folder with train/ and test/ in ImageFolder layout")
    r.add_argument("--per-class", type=int, default=20, help="digits: training images per class")
    r.add_argument("--image-size", type=int, default=64, help="image folders: resize to this size")
    r.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50", "small_cnn", "densenet_tiny"])
    r.add_argument("--width", type=int, default=16, help="base width of the ResNet (64 = the standard one)")
    r.add_argument("--split", choices=["kels", "wels"], default=d.split)
    r.add_argument("--split-rate", type=float, default=d.split_rate)
    r.add_argument("--generations", type=int, default=d.generations)
    r.add_argument("--epochs", type=int, default=d.epochs, help="epochs per generation")
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--lr", type=float, default=d.lr)
    r.add_argument("--weight-decay", type=float, default=d.weight_decay)
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--evolve-mode", choices=["rand", "zero", "rewind"], default=d.evolve_mode)
    r.add_argument("--reset-bn", action="store_true", help="also reset BatchNorm of reset channels")
    r.add_argument("--resample-mask", action="store_true", help="WELS: a new mask every generation")
    r.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--out", default="runs/ke", help="output folder (checkpoints, history.csv, summary.json, plot.png)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    r.add_argument("--no-progress", action="store_true")
    return p


def _positive(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("generations", "epochs", "batch_size", "per_class", "image_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.split_rate <= 1:
        p.error(f"--split-rate must be in (0, 1], got {args.split_rate}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")


def resolve_device(device: str | None, cuda_available: bool, device_count: int, local_rank: int = 0,
                   local_world_size: int = 1) -> tuple[str, str]:
    """This process's device and the process-group backend that goes with it: ``(device, backend)``.

    ``cpu`` never touches CUDA: ``("cpu", "gloo")``. ``cuda`` (the default where CUDA is available) gives
    local rank i the GPU ``cuda:i`` and ``nccl``, so it needs a GPU per local rank; ``cuda:N`` pins a
    single process to GPU N. Other device types pass through with ``gloo``. ``local_rank`` and
    ``local_world_size`` are torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE (0 and 1 without torchrun).

    Raises ValueError, with a message naming --device, when the request cannot be met."""
    name = f"--device {device}" if device is not None else "--device cuda (the default where CUDA is available)"
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
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
    """Run the command line; returns the exit code (argument errors exit with 2 through argparse)."""
    p = _parser()
    args = p.parse_args(argv)
    _positive(p, args)
    # a non-CUDA --device does not even ask the CUDA driver
    cuda = (args.device is None or args.device.startswith("cuda")) and torch.cuda.is_available()
    local_rank, local_world_size = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        device, backend = resolve_device(args.device, cuda, torch.cuda.device_count() if cuda else 0, local_rank,
                                         local_world_size)
    except ValueError as exc:
        p.error(str(exc))
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


def _run(args: argparse.Namespace, device: str) -> int:
    """Load the data, build the model and run KE on ``device``; returns the exit code."""
    try:
        if args.dataset == "digits":
            train, test, classes, channels = digits(args.per_class, seed=args.seed)
            small = True
        else:
            train, test, classes, channels = image_folder(args.dataset, args.image_size)
            small = args.image_size < 64
    except DataError as exc:
        print(f"ke-fast: error: {exc}", file=sys.stderr)
        return 2
    cfg = Config(split=args.split, split_rate=args.split_rate, generations=args.generations, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                 evolve_mode=args.evolve_mode, reset_bn=args.reset_bn, resample_mask=args.resample_mask,
                 amp=False if args.no_amp else None)
    torch.manual_seed(args.seed)
    stem = "small" if small else "imagenet"
    if args.model in ("resnet18", "resnet50"):
        model = build_model(args.model, num_classes=classes, in_channels=channels, stem=stem, width=args.width)
    else:
        model = build_model(args.model, num_classes=classes, in_channels=channels)
    ev = Evolution(model, train, test, cfg, args.out, device=device,
                   progress=False if args.no_progress else None)
    if ev.rank == 0:
        print(f"KE {cfg.split.upper()} {cfg.split_rate} | {args.model} | {args.dataset}: {len(train)} train / "
              f"{len(test)} test images | {cfg.generations} generations x {cfg.epochs} epochs | {ev.device}")
    try:
        history = ev.run(resume=args.resume)
    except CheckpointError as exc:
        print(f"ke-fast: error: {exc}", file=sys.stderr)
        return 2
    if ev.rank == 0:
        print("\ngeneration | dense N_g | fit H^F_g")
        for r in history:
            print(f"{r['generation']:10d} | {100 * r['dense_acc']:8.1f}% | {100 * r['fit_acc']:8.1f}%")
        print(f"\nwrote {Path(args.out) / 'history.csv'}, summary.json, plot.png and checkpoints last.pt / prev.pt")
    return 0
