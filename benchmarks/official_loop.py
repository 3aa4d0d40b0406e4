"""Knowledge Evolution run the way the official code runs it: the baseline of the whole-run benchmarks.

Written from the algorithm of the official implementation (github.com/ahmdtaha/knowledge_evolution; its
semantics, none of its code), as a whole process of its own so that ``benchmarks/cli_bench.py`` can pair it
with ``python -m ke_fast run`` doing the same work. It imports torch (and reads scikit-learn's digits file), never
ke_fast: a fresh process pays only what the official code would pay.

What makes it the official algorithm (and what ke_fast does differently):

* fp32 throughout: no autocast, no channels_last;
* every generation builds a fresh model, loads the previous generation's checkpoint from disk (``torch.save``
  / ``torch.load`` of the state_dict with the float32 masks inside it: the official layers keep their mask as
  an ``nn.Parameter``) and resets the reset hypothesis with a per-layer Python loop: a fresh
  ``kaiming_uniform_(a=sqrt(5))`` tensor, then ``torch.where(mask.bool(), w, new)``; a bias takes
  U(+-1/sqrt(fan_in)) on the outputs of wholly reset filters;
* a fresh SGD (momentum, weight decay) and a linear warm-up + cosine schedule stepped per batch, the loss
  label-smoothed; data from a host ``DataLoader`` (shuffled, the last partial batch kept; pinned memory and
  asynchronous copies on CUDA, as the official code asks), moved to the device batch by batch;
* after training: accuracy of the dense network and of the fit hypothesis, then a checkpoint.

Same work as ke_fast's defaults: the hyper-parameters default to ke_fast's ``Config`` (a test checks it), the
model has ke_fast's ResNet-18 layout and parameter names, the KELS masks equal ke_fast's (a test checks both),
one evaluation of each network and one checkpoint per generation. The fit hypothesis is evaluated on a copy
with the reset weights (and wholly reset outputs' biases) zeroed; for KELS that is the slim network the
official code extracts (a reset channel only ever meets zeroed weights downstream, the classifier keeps only
fit inputs), and what ke_fast's fit mode computes.

    python benchmarks/official_loop.py --generations 3 --epochs 5 --out runs/official
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class OfficialConfig:
    """The run's settings; the training defaults are ke_fast's ``Config`` defaults (tests/test_ledger.py)."""

    generations: int = 3
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    label_smoothing: float = 0.1
    split_rate: float = 0.5
    seed: int = 0
    workers: int = 0  # DataLoader worker processes (the official code uses several for decoding + augmentation)


# ------------------------------------------------------------------------------------------------ the model
class Block(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, plus the (projected) input, relu."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(y + skip)


class ResNet18(nn.Module):
    """ResNet-18 with the parameter names of torchvision (and of ke_fast.models.resnet18): ``stem="imagenet"``
    is the 7x7/2 conv + max-pool, ``"small"`` a 3x3/1 conv without pooling for tiny images."""

    def __init__(self, num_classes: int, in_channels: int = 3, stem: str = "imagenet", width: int = 64) -> None:
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i in range(4):
            cout = width * 2**i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------------------ KE pieces
def kels_masks(model: nn.Module, rate: float, first: str = "conv1", last: str = "fc") -> dict[str, torch.Tensor]:
    """KELS float32 masks as the official split layers build them: the first ceil(rate * C_out) filters x the
    first ceil(rate * C_in) input channels; the layer reading the image keeps every input channel and the
    classifier every output."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out_c, in_c = m.weight.shape[:2]
            rows = out_c if name == last else math.ceil(out_c * rate)
            cols = in_c if name == first else math.ceil(in_c * rate)
            mask = torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
            mask[:rows, :cols] = 1
            masks[name] = mask
    return masks


def reset_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """The official reset, one layer after another: a fresh kaiming_uniform_(a=sqrt(5)) tensor, fit entries
    kept; a bias re-drawn U(+-1/sqrt(fan_in)) on the outputs whose filter is wholly reset."""
    for name, m in model.named_modules():
        if name not in masks:
            continue
        mask = masks[name]
        new = torch.zeros_like(m.weight)
        nn.init.kaiming_uniform_(new, a=math.sqrt(5))
        m.weight.data = torch.where(mask.type(torch.bool), m.weight.data, new)
        if m.bias is not None:
            keep = mask.reshape(mask.shape[0], -1).amax(1)
            bound = 1 / math.sqrt(m.weight[0].numel())
            new_b = torch.zeros_like(m.bias)
            nn.init.uniform_(new_b, -bound, bound)
            m.bias.data = torch.where(keep.type(torch.bool), m.bias.data, new_b)


def warmup_cosine(cfg: OfficialConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over ``warmup_epochs``, then cosine to 0."""
    warm, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, device: torch.device, workers: int = 0) -> float:
    """Top-1 accuracy over ``data`` in batches of 256."""
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=256, num_workers=workers):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(1, total)


@torch.no_grad()
def fit_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy holding the fit hypothesis only: reset weights (and wholly reset outputs' biases) zeroed."""
    fit = copy.deepcopy(model)
    for name, m in fit.named_modules():
        if name in masks:
            m.weight.mul_(masks[name])
            if m.bias is not None:
                m.bias.mul_(masks[name].reshape(masks[name].shape[0], -1).amax(1))
    return fit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: OfficialConfig, train: Dataset, test: Dataset, out_dir: Path, device: torch.device,
        build: Callable[[], nn.Module], timings: dict | None = None) -> list[dict]:
    """KE as the official code runs it; one dict per generation (dense_acc, fit_acc). ``timings`` receives
    the seconds of train / eval / checkpoint / reset (the reset part: rebuild, reload, per-layer reset)."""
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "generation.pt"
    t = timings if timings is not None else {}
    t.update(train=0.0, eval=0.0, checkpoint=0.0, reset=0.0)
    history = []
    for g in range(1, cfg.generations + 1):
        t0 = time.perf_counter()
        model = build().to(device)  # a fresh model every generation (its random init is discarded for g > 1)
        if g == 1:
            masks = kels_masks(model, cfg.split_rate)
        else:
            state = torch.load(ckpt, map_location=device, weights_only=True)
            masks = {k[: -len(".mask")]: state.pop(k) for k in list(state) if k.endswith(".mask")}
            model.load_state_dict(state)
            reset_(model, masks)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        steps = math.ceil(len(train) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg, steps))
        _sync(device)
        t1 = time.perf_counter()
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.Generator().manual_seed(1000 * cfg.seed + 100 * g + epoch)
            for x, y in DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=order,
                                   num_workers=cfg.workers, pin_memory=device.type == "cuda"):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        _sync(device)
        t2 = time.perf_counter()
        dense = accuracy(model, test, device, cfg.workers)
        fit = accuracy(fit_copy(model, masks), test, device, cfg.workers)
        t3 = time.perf_counter()
        history.append(dict(generation=g, dense_acc=dense, fit_acc=fit, train_loss=float(loss.detach())))
        state = model.state_dict()
        state.update({f"{name}.mask": mask for name, mask in masks.items()})  # the official nn.Parameter masks
        torch.save(state, ckpt)
        t["train"] += t2 - t1
        t["eval"] += t3 - t2
        t["checkpoint"] += time.perf_counter() - t3
        t["reset"] += t1 - t0
    return history


# ------------------------------------------------------------------------------------------------ data
def digits(per_class: int = 20, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits split as ``ke_fast.data.digits`` splits them (same images, same order):
    ``per_class`` training images per class drawn with a seeded permutation, every other image for testing.
    Read as ``ke_fast.data.digits_arrays`` reads them (scikit-learn's installed CSV, without importing
    scikit-learn), so that loading the data costs both contenders the same."""
    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None or spec.origin is None else \
        Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        images, labels = d.images, d.target
    else:
        table = np.loadtxt(path, delimiter=",")
        images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(labels, dtype=torch.int64)
    if not 1 <= per_class < int(torch.bincount(y).min()):
        raise ValueError(f"per_class must be in 1 .. {int(torch.bincount(y).min()) - 1}, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    train = torch.cat(picked)
    test = torch.ones(len(y), dtype=torch.bool)
    test[train] = False
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def synthetic_images(n: int, classes: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable uint8 images [n, 3, side, side] and labels: each class a colour and a stripe frequency, plus
    noise (a stand-in with Flower102's sizes for the paper-scale benchmark; nothing is downloaded)."""
    colours = torch.randint(30, 226, (classes, 3, 1, 1), generator=torch.Generator().manual_seed(0)).float()
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    xs = torch.arange(side).float()
    stripes = torch.sin(xs[None, :] * (1 + (y[:, None] % 7)) * 0.1)[:, None, None, :]
    x = colours[y] + 40 * stripes + torch.randn(n, 3, side, side, generator=gen) * 20
    return x.clamp(0, 255).to(torch.uint8), y


class HostAugmented(Dataset):
    """uint8 images augmented on the host, one image per ``__getitem__`` (the official data path in
    DataLoader workers): random-resized crop (area 8-100 %, aspect 3/4-4/3, bilinear) to ``size``, horizontal
    flip, ImageNet normalisation. ``train=False``: the centre ``size`` crop, normalised."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, train: bool) -> None:
        self.images, self.labels, self.size, self.train = images, labels, size, train
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _box(self, h: int, w: int) -> tuple[int, int, int, int]:
        for _ in range(10):  # the usual random-resized-crop draw; the whole image after 10 misses
            area = h * w * float(torch.empty(1).uniform_(0.08, 1.0))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,)))
                left = int(torch.randint(0, w - cw + 1, (1,)))
                return top, left, ch, cw
        return 0, 0, h, w

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        h, w = img.shape[1:]
        if self.train:
            top, left, ch, cw = self._box(h, w)
            x = img[:, top:top + ch, left:left + cw].float()[None] / 255
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
            if float(torch.rand(1)) < 0.5:
                x = x.flip(2)
        else:
            o_h, o_w = (h - self.size) // 2, (w - self.size) // 2
            x = img[:, o_h:o_h + self.size, o_w:o_w + self.size].float() / 255
        return (x - self.mean) / self.std, self.labels[i]


# ------------------------------------------------------------------------------------------------ the command
def _parser() -> argparse.ArgumentParser:
    d = OfficialConfig()
    p = argparse.ArgumentParser(description="KE on the bundled digits, run the official way (the baseline "
                                            "of benchmarks/cli_bench.py)")
    p.add_argument("--generations", type=int, default=d.generations)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--per-class", type=int, default=20, help="digits training images per class")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (ke_fast run's default: 16)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--split-rate", type=float, default=d.split_rate)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--out", type=Path, default=Path("runs/official"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("generations", "epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            _parser().error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.split_rate <= 1:
        _parser().error(f"--split-rate must be in (0, 1], got {args.split_rate}")
    t_start = time.perf_counter()
    cfg = OfficialConfig(generations=args.generations, epochs=args.epochs, batch_size=args.batch_size,
                         split_rate=args.split_rate, seed=args.seed, workers=args.workers)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, test = digits(args.per_class, args.seed)
    timings: dict = {}
    history = run(cfg, train, test, args.out, device,
                  lambda: ResNet18(10, in_channels=1, stem="small", width=args.width), timings)
    for row in history:
        print(f"generation {row['generation']}: dense {100 * row['dense_acc']:.1f}%  fit {100 * row['fit_acc']:.1f}%")
    summary = dict(config=dataclasses.asdict(cfg), per_class=args.per_class, width=args.width, device=str(device),
                   history=history, timings=timings, seconds_in_main=time.perf_counter() - t_start)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
