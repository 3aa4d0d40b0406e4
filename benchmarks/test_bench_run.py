"""Benchmark: whole-run wall time of ke_fast's KE loop against a loop written to the official KE algorithm.

Run with ``pytest benchmarks --benchmark-only`` (not part of ``pytest tests``). Two cases, each timing both
contenders in the same session:

* "digits" (every device; the one run on CPU), described below;
* "paper" (CUDA only): the paper's scale. ResNet-18 with the ImageNet stem, 102 classes, 1,020 synthetic
  3x224x224 training images and as many test images (Flower102's sizes), batch 32, KELS 0.5, 3 generations x
  4 epochs. Contenders: the official loop (below; fp32, host DataLoader over float images); ``ke_fast`` on the
  same float images (equal work: no augmentation either side); ``ke_fast_images``: the real-data path, uint8
  images resident on the GPU with the training recipe (random-resized crop, flip, normalise) per batch;
  ``ke_fast_compile``: ``ke_fast`` with ``compile=True``. ``extra_info`` has the ratio to the official loop and
  where the time went (``Evolution.timings``: train / eval / checkpoint / reset seconds; the official loop's
  own split likewise).

The digits case, same work on both sides:

* data: ``ke_fast.data.digits(per_class=20)`` (200 training images of 1x8x8, the rest for testing);
* model: ``resnet18(num_classes=10, in_channels=1, stem="small", width=16)``, KELS 0.5;
* 3 generations x 5 epochs, batch 32, SGD with ke_fast's ``Config`` defaults (lr 0.05, momentum 0.9,
  weight decay 1e-4, label smoothing 0.1, linear warm-up over ``warmup_epochs`` then cosine, per step).
  Note: the default warm-up is 5 epochs, so with 5 epochs per generation the whole generation is warm-up.

Contenders (group "KE run"), each ``benchmark.pedantic(rounds=1, iterations=1)`` and timed from building the
model to the last checkpoint:

* ``ke_fast``: ``ke_fast.evolve.Evolution(...).run()`` with progress=False into a tmp folder (its defaults:
  on CUDA bf16 autocast and channels_last; the data resident on the device, batches cut there; fused SGD;
  the loss read once per epoch; one fused reset launch; the model is kept between generations; a checkpoint
  at the end of every generation (and every 10 minutes), written by a background thread; metrics and a plot
  every generation).
* ``baseline``: :func:`official_ke_run` below, written to the official KE algorithm
  (github.com/ahmdtaha/knowledge_evolution): every generation builds a fresh model, loads the previous
  generation's checkpoint from disk (``torch.save`` / ``torch.load`` of the state_dict with the float32
  masks inside it, as the official layers keep them as ``nn.Parameter``), resets the reset hypothesis with
  a per-layer Python loop (zeros_like + kaiming_uniform_(a=sqrt(5)) + torch.where(mask.bool(), w, new)),
  makes a fresh SGD, trains the dense network in fp32, evaluates the dense network and the fit hypothesis,
  and saves a checkpoint.

  Fit hypothesis: the official code builds a slim network and copies the fit weights into it
  (``extract_slim``). Here it is evaluated by zeroing the reset weights (and the biases of wholly reset
  outputs) on a deep copy of the model. For KELS this gives the slim network's outputs: a reset channel's
  activation only ever meets zeroed weights in the next layer, and the classifier keeps only fit inputs.
  It is also what ke_fast's fit mode computes.

``extra_info``: wall seconds, final dense and fit accuracy, and "baseline/ke_fast" (the wall-time ratio) on
whichever of the two runs second.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ke_fast
from ke_fast.data import ImageSet, digits, stored_size
from ke_fast.evolve import Config, Evolution
from ke_fast.models import resnet18

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
GENERATIONS = 3
EPOCHS = 5
PAPER = dict(generations=3, epochs=4, classes=102, images=1020, size=224)
_WALL: dict[str, float] = {}


def _config() -> Config:
    return Config(split="kels", split_rate=0.5, generations=GENERATIONS, epochs=EPOCHS, seed=0)


def _build() -> nn.Module:
    return resnet18(num_classes=10, in_channels=1, stem="small", width=16)


def _build_paper() -> nn.Module:
    return resnet18(num_classes=PAPER["classes"], in_channels=3, stem="imagenet", width=64)


@pytest.fixture(scope="module")
def data():
    """The demo data, loaded once; also warms up what either side would otherwise pay first (imports,
    the C++ extension, the convolution primitives), so neither run is charged for it."""
    train, test, _, _ = digits(per_class=20)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (ke_fast plots every generation)

    net = _build().to(DEVICE)
    ke_fast.split(net, "kels", 0.5)
    ke_fast.reinit_(net, 1)  # loads (or builds) the C++ CPU extension
    x, y = next(iter(DataLoader(train, batch_size=32)))
    F.cross_entropy(net(x.to(DEVICE)), y.to(DEVICE)).backward()
    with ke_fast.fit_only(net), torch.no_grad():
        net(x.to(DEVICE))
    if CUDA:
        torch.cuda.synchronize()
    return train, test


# ----------------------------------------------------------------------------------------------- baseline
def official_masks(model: nn.Module, rate: float) -> dict[str, torch.Tensor]:
    """KELS float32 masks as the official SplitConv / SplitLinear build them: the first ceil(rate * C_out)
    filters x the first ceil(rate * C_in) input channels; the first conv keeps every input channel (the
    official code spots it by C_in == 3; here it is the conv reading the 1-channel image) and the classifier
    every output."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out_c, in_c = m.weight.shape[:2]
            rows = out_c if name == "fc" else math.ceil(out_c * rate)
            cols = in_c if name == "conv1" else math.ceil(in_c * rate)
            mask = torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
            mask[:rows, :cols] = 1
            masks[name] = mask
    return masks


def official_reset(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """The official split_reinitialize ("rand"), layer by layer: a fresh kaiming_uniform_(a=sqrt(5)) tensor,
    then keep the fit entries; a bias takes U(+-1/sqrt(fan_in)) on the outputs of wholly reset filters."""
    for name, m in model.named_modules():
        if name not in masks:
            continue
        mask = masks[name]
        new = torch.zeros_like(m.weight)
        nn.init.kaiming_uniform_(new, a=math.sqrt(5))
        m.weight.data = torch.where(mask.type(torch.bool), m.weight.data, new)
        if m.bias is not None:
            bias_mask = mask.reshape(mask.shape[0], -1).amax(1)
            fan_in = m.weight[0].numel()
            new_b = torch.zeros_like(m.bias)
            nn.init.uniform_(new_b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            m.bias.data = torch.where(bias_mask.type(torch.bool), m.bias.data, new_b)


def _warmup_cosine(cfg: Config, steps_per_epoch: int):
    warm, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return f


@torch.no_grad()
def _evaluate(model: nn.Module, test, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in DataLoader(test, batch_size=256):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(1, total)


@torch.no_grad()
def _fit_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy holding the fit hypothesis only: reset weights (and wholly reset outputs' biases) zeroed."""
    fit = copy.deepcopy(model)
    for name, m in fit.named_modules():
        if name in masks:
            m.weight.mul_(masks[name])
            if m.bias is not None:
                m.bias.mul_(masks[name].reshape(masks[name].shape[0], -1).amax(1))
    return fit


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def official_ke_run(cfg: Config, train, test, out_dir: Path, device, build=_build,
                    timings: dict | None = None) -> list[dict]:
    """KE as the official code runs it: rebuild, reload, reset per layer, fresh optimizer, fp32 dense training.
    ``timings`` (if given) receives the seconds of train / eval / checkpoint / reset (rebuild, reload, reset)."""
    torch.manual_seed(cfg.seed)
    ckpt_path = out_dir / "generation.pt"
    history = []
    t = timings if timings is not None else {}
    t.update(train=0.0, eval=0.0, checkpoint=0.0, reset=0.0)
    for g in range(1, cfg.generations + 1):
        t0 = time.perf_counter()
        model = build().to(device)  # a fresh model every generation (its random init is thrown away for g > 1)
        if g == 1:
            masks = official_masks(model, cfg.split_rate)
        else:
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
            masks = {k[: -len(".mask")]: state.pop(k) for k in list(state) if k.endswith(".mask")}
            model.load_state_dict(state)
            official_reset(model, masks)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        steps = math.ceil(len(train) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(cfg, steps))
        _sync()
        t1 = time.perf_counter()
        t["reset"] += t1 - t0
        for epoch in range(cfg.epochs):
            model.train()
            gen = torch.Generator().manual_seed(1000 * cfg.seed + 100 * g + epoch)
            for x, y in DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen):
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        _sync()
        t2 = time.perf_counter()
        dense = _evaluate(model, test, device)
        fit = _evaluate(_fit_copy(model, masks), test, device)
        t3 = time.perf_counter()
        history.append(dict(generation=g, dense_acc=dense, fit_acc=fit))
        state = model.state_dict()
        state.update({f"{name}.mask": mask for name, mask in masks.items()})  # the official nn.Parameter masks
        torch.save(state, ckpt_path)
        t["train"] += t2 - t1
        t["eval"] += t3 - t2
        t["checkpoint"] += time.perf_counter() - t3
    return history


# ----------------------------------------------------------------------------------------------- benchmarks
def _run(benchmark, name: str, fn, group: str | None = None, min_acc: tuple[float, float] = (0.2, 0.1),
         timings: dict | None = None) -> list[dict]:
    benchmark.group = group or f"KE run resnet18-w16 digits {GENERATIONS}x{EPOCHS} KELS 0.5 ({DEVICE.type})"
    walls = _WALL.setdefault(benchmark.group, {})
    result: dict = {}

    def timed():
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result["history"] = fn()
        if CUDA:
            torch.cuda.synchronize()
        result["wall"] = time.perf_counter() - t0

    benchmark.pedantic(timed, rounds=1, iterations=1)
    history, wall = result["history"], result["wall"]
    walls[name] = wall
    final = history[-1]
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "wall_s": wall,
        "dense_acc": final["dense_acc"],
        "fit_acc": final["fit_acc"],
        "history": [{k: row[k] for k in ("generation", "dense_acc", "fit_acc")} for row in history],
    })
    if timings is not None:
        benchmark.extra_info["seconds"] = dict(timings)
    if name != "baseline" and "baseline" in walls:
        benchmark.extra_info["baseline/this"] = walls["baseline"] / wall  # > 1: faster than the official loop
    print(f"\n{benchmark.group}: {name} {wall:.2f} s" + (f", {walls['baseline'] / wall:.2f}x the official loop"
                                                          if name != "baseline" and "baseline" in walls else "")
          + (f"; {', '.join(f'{k} {v:.2f} s' for k, v in timings.items())}" if timings else ""))
    assert final["dense_acc"] > min_acc[0] and final["fit_acc"] > min_acc[1], f"{name} did not learn: {final}"
    return history


def _check_masks_match(build=_build) -> None:
    """The baseline's masks are the ones ke_fast draws for KELS 0.5 (same fit hypothesis on both sides)."""
    net = build()
    ref = official_masks(net, 0.5)
    ke_fast.split(net, "kels", 0.5)
    got = ke_fast.masks(net)
    assert set(got) == set(ref)
    for name, mask in ref.items():
        assert torch.equal(got[name], mask.bool()), name


def test_run_baseline_official(benchmark, data):
    _check_masks_match()
    train, test = data
    cfg = _config()
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        _run(benchmark, "baseline", lambda: official_ke_run(cfg, train, test, Path(tmp), DEVICE, timings=timings),
             timings=timings)


def test_run_ke_fast(benchmark, data):
    train, test = data
    cfg = _config()
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        def fn():
            evo = Evolution(_build(), train, test, cfg, Path(tmp) / "run", device=DEVICE, progress=False,
                            log=lambda _: None)
            history = evo.run()
            timings.update(evo.timings)
            return history

        _run(benchmark, "ke_fast", fn, timings=timings)


# ------------------------------------------------------------------------------------- the paper's scale (GPU)
PAPER_GROUP = (f"KE run resnet18 imagenet-stem {PAPER['classes']} classes {PAPER['images']}x3x{PAPER['size']}^2 "
               f"{PAPER['generations']}x{PAPER['epochs']} KELS 0.5 batch 32 (cuda)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="the paper-scale case needs a GPU (CPU: the digits case)")


def _paper_config() -> Config:
    return Config(split="kels", split_rate=0.5, generations=PAPER["generations"], epochs=PAPER["epochs"],
                  batch_size=32, seed=0, warmup_epochs=1)


@pytest.fixture(scope="module")
def paper_data():
    """Synthetic, learnable Flower102-sized data: each class a colour and a pattern plus noise, as uint8
    (train stored at the resize side for the random-resized crop, test at 224) and as float tensors for the
    official loop and the equal-work ke_fast run (ImageNet-normalised centre views)."""
    n, size, classes = PAPER["images"], PAPER["size"], PAPER["classes"]
    g = torch.Generator().manual_seed(0)
    colours = torch.randint(30, 226, (classes, 3, 1, 1), generator=g).float()

    def make(side: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % classes
        xs = torch.arange(side).float()
        stripes = torch.sin(xs[None, :] * (1 + (y[:, None] % 7)) * 0.1)[:, None, None, :]
        noise = torch.randn(n, 3, side, side, generator=gen) * 20
        x = (colours[y] + 40 * stripes + noise).clamp(0, 255).to(torch.uint8)
        return x, y

    train_u8, train_y = make(stored_size(size, True), 1)
    test_u8, test_y = make(size, 2)
    train_img = ImageSet.from_tensors(train_u8, train_y, size, True)
    test_img = ImageSet.from_tensors(test_u8, test_y, size, False)
    o = (stored_size(size, True) - size) // 2
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    train_f = TensorDataset((train_u8[:, :, o:o + size, o:o + size].float() / 255 - mean) / std, train_y)
    test_f = TensorDataset((test_u8.float() / 255 - mean) / std, test_y)
    # warm-up: the C++/Triton kernels, cuDNN's choice of algorithms (fp32 and bf16) on both sides
    net = _build_paper().to(DEVICE)
    ke_fast.split(net, "kels", 0.5)
    ke_fast.reinit_(net, 1)
    x = train_f.tensors[0][:32].to(DEVICE)
    for amp in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            F.cross_entropy(net(x), train_y[:32].to(DEVICE)).backward()
    _sync()
    return dict(images=(train_img, test_img), floats=(train_f, test_f))


@needs_cuda
def test_paper_baseline_official(benchmark, paper_data):
    _check_masks_match(_build_paper)
    train, test = paper_data["floats"]
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        _run(benchmark, "baseline", lambda: official_ke_run(_paper_config(), train, test, Path(tmp), DEVICE,
                                                            build=_build_paper, timings=timings),
             PAPER_GROUP, (0.05, 0.0), timings)


@needs_cuda
@pytest.mark.parametrize("variant", ["ke_fast", "ke_fast_images", "ke_fast_compile"])
def test_paper_ke_fast(benchmark, paper_data, variant):
    train, test = paper_data["images" if variant == "ke_fast_images" else "floats"]
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        def fn():
            evo = Evolution(_build_paper(), train, test, _paper_config(), Path(tmp) / "run", device=DEVICE,
                            progress=False, log=lambda _: None, compile=variant == "ke_fast_compile")
            history = evo.run()
            timings.update(evo.timings)
            return history

        _run(benchmark, variant, fn, PAPER_GROUP, (0.05, 0.0), timings)
