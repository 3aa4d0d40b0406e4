"""Benchmark: one KE run of ke_fast against the official algorithm's loop, both in this pytest process.

Run with ``pytest benchmarks --benchmark-only`` (``make bench``; not part of ``pytest tests``). Whole runs as
fresh processes, which is what a user waits for (imports and start-up included), are
``benchmarks/cli_bench.py`` (``make bench-cli``); the paper-scale GPU case (ResNet-18 at 224², 102 classes)
is ``benchmarks/gpu_report.py`` (``make gpu-report``). This file measures the loops alone: the imports, the
C++ extension and the convolution primitives are warmed up first, so neither side is charged for them.

The digits case, same work on both sides:

* data: the digits split of ``ke_fast.data.digits(per_class=20)`` (200 training images of 1x8x8, the rest for
  testing); ``official_loop.digits`` gives the same tensors;
* model: ResNet-18, small stem, width 16, 10 classes, KELS 0.5 (same parameter names and masks on both sides:
  ``tests/test_ledger.py`` checks it);
* 3 generations x 5 epochs, batch 32, SGD with ke_fast's ``Config`` defaults (lr 0.05, momentum 0.9,
  weight decay 1e-4, label smoothing 0.1, linear warm-up over ``warmup_epochs`` then cosine, per step).
  The default warm-up is 5 epochs, so with 5 epochs per generation the whole generation is warm-up.

Contenders (one group), each ``benchmark.pedantic(rounds=1, iterations=1)``, timed from building the model to
the last checkpoint:

* ``baseline``: ``official_loop.run`` (``benchmarks/official_loop.py``: fp32, rebuild + reload every
  generation, per-layer reset, host DataLoader, one checkpoint per generation);
* ``ke_fast``: ``Evolution(...).run()`` with its defaults (data resident on the device, fused SGD, the loss
  read once per epoch, one fused reset launch, the model kept between generations, a checkpoint per
  generation written by a background thread, metrics and a plot).

``extra_info``: wall seconds, where the time went (train / eval / checkpoint / reset), final dense and fit
accuracy per generation, and on ``ke_fast`` the baseline's seconds and the speed-up over it (> 1: ke_fast is
faster). One round each in one session: a ratio from this file is one sample; the paired, repeated figure is
``make bench-cli``'s.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _timing import DEVICE, record, sync
from torch.utils.data import DataLoader

import official_loop
import ke_fast
from ke_fast.data import digits
from ke_fast.evolve import Config, Evolution
from ke_fast.models import resnet18

GENERATIONS = 3
EPOCHS = 5
GROUP = f"KE run resnet18-w16 digits {GENERATIONS}x{EPOCHS} KELS 0.5 ({DEVICE.type})"
_WALL: dict[str, float] = {}


def _config() -> Config:
    return Config(split="kels", split_rate=0.5, generations=GENERATIONS, epochs=EPOCHS, seed=0)


def _build():
    return resnet18(num_classes=10, in_channels=1, stem="small", width=16)


@pytest.fixture(scope="module")
def data():
    """The demo data, loaded once; also warms up what either side would otherwise pay first (imports,
    the C++ extension, the convolution primitives), so neither run is charged for it."""
    train, test, _, _ = digits(per_class=20)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (ke_fast plots once per run)

    net = _build().to(DEVICE)
    ke_fast.split(net, "kels", 0.5)
    ke_fast.reinit_(net, 1)  # loads (or builds) the C++ CPU extension
    x, y = next(iter(DataLoader(train, batch_size=32)))
    F.cross_entropy(net(x.to(DEVICE)), y.to(DEVICE)).backward()
    with ke_fast.fit_only(net), torch.no_grad():
        net(x.to(DEVICE))
    sync()
    return train, test


def _run(benchmark, name: str, fn, timings: dict) -> list[dict]:
    benchmark.group = GROUP
    result: dict = {}

    def timed():
        sync()
        t0 = time.perf_counter()
        result["history"] = fn()
        sync()
        result["wall"] = time.perf_counter() - t0

    benchmark.pedantic(timed, rounds=1, iterations=1)
    history, wall = result["history"], result["wall"]
    _WALL[name] = wall
    final = history[-1]
    baseline_s = _WALL.get("baseline") if name != "baseline" else None
    record(benchmark, wall, baseline="official_loop.run, same session" if baseline_s else None,
           baseline_s=baseline_s,
           ran="official algorithm (benchmarks/official_loop.py)" if name == "baseline" else "ke_fast Evolution",
           wall_s=wall, timings=dict(timings), dense_acc=final["dense_acc"], fit_acc=final["fit_acc"],
           history=[{k: row[k] for k in ("generation", "dense_acc", "fit_acc")} for row in history])
    benchmark.extra_info["ms"] = wall * 1e3
    benchmark.extra_info["timer"] = "one round, time.perf_counter around the run"
    assert final["dense_acc"] > 0.2 and final["fit_acc"] > 0.1, f"{name} did not learn: {final}"
    return history


def test_run_baseline_official(benchmark, data):
    train, test = data
    c = _config()
    cfg = official_loop.OfficialConfig(generations=c.generations, epochs=c.epochs, batch_size=c.batch_size,
                                       split_rate=c.split_rate, seed=c.seed)
    timings: dict = {}
    build = lambda: official_loop.ResNet18(10, in_channels=1, stem="small", width=16)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        _run(benchmark, "baseline", lambda: official_loop.run(cfg, train, test, Path(tmp), DEVICE, build, timings),
             timings)


def test_run_ke_fast(benchmark, data):
    train, test = data
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        def fn():
            evo = Evolution(_build(), train, test, _config(), Path(tmp) / "run", device=DEVICE, progress=False,
                            log=lambda _: None)
            history = evo.run()
            timings.update(evo.timings)
            return history

        _run(benchmark, "ke_fast", fn, timings)
