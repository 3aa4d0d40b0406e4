"""The one timing helper of the benchmark files (not a benchmark itself).

* :func:`device_seconds` times a callable outside pytest-benchmark: ``triton.testing.do_bench`` on CUDA (it
  flushes the L2 cache between repetitions and reports the median), the median of ``reps`` runs after a
  warm-up on CPU.
* :func:`measure` runs a pytest-benchmark fixture on a callable and returns the seconds per call that the
  file reports: on CUDA do_bench's figure (the pytest-benchmark table then times ``fn`` + synchronize, host
  overhead included), on CPU the pytest-benchmark mean (its least disturbed round goes to ``min ms``).
* :func:`record` writes what a reader needs into ``benchmark.extra_info``: ``ms``, ``timer``, ``device``,
  the baseline's name and ms and ``speed-up`` (baseline ms / this ms: > 1 is faster than the baseline), and
  ``ran``: what actually executed (e.g. the sparse kernel or the dense fallback), so a table built from the
  file cannot claim more than was measured.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CUDA_TIMER = "triton.testing.do_bench (median, L2 flushed)"


def sync() -> None:
    """Wait for the GPU, if any."""
    if CUDA:
        torch.cuda.synchronize()


def device_name() -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if CUDA else "cpu"


def device_seconds(fn: Callable[[], object], reps: int = 7) -> float:
    """Seconds per call of ``fn``: do_bench on CUDA, the median of ``reps`` runs after a warm-up on CPU."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(benchmark, fn: Callable[[], object], rounds: int | None = None, *,
            cpu_budget_s: float | None = None) -> float | None:
    """Run the pytest-benchmark fixture on ``fn``; seconds per call, or None under ``--benchmark-disable``.

    ``rounds``: pedantic rounds (None: pytest-benchmark calibrates on CPU, 20 rounds on CUDA).
    ``cpu_budget_s``: on CPU, cut the rounds to about this many seconds (never below 2) after one timed
    warm-up call, so slow contenders keep a file's runtime bounded."""
    info = benchmark.extra_info
    if CUDA:
        seconds = device_seconds(fn)

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=rounds or 20, warmup_rounds=2)
        info["timer"] = CUDA_TIMER
    else:
        warmup = 1
        if cpu_budget_s is not None and rounds is not None:
            t0 = time.perf_counter()
            fn()
            rounds = max(2, min(rounds, int(cpu_budget_s / max(time.perf_counter() - t0, 1e-9))))
            warmup = 0
        if rounds is None:
            benchmark(fn)
        else:
            benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup)
        stats = benchmark.stats  # None under --benchmark-disable
        if stats is None:
            info["timer"] = "not timed (--benchmark-disable)"
            return None
        seconds = stats.stats.mean
        info["timer"] = f"pytest-benchmark mean of {stats.stats.rounds} rounds"
        info["min ms"] = stats.stats.min * 1e3
    info["ms"] = seconds * 1e3
    return seconds


def record(benchmark, seconds: float | None, *, baseline: str | None = None, baseline_s: float | None = None,
           ran: str | None = None, **extra: Any) -> None:
    """Fill ``benchmark.extra_info``: device, what ran, the baseline and the speed-up over it, ``extra``."""
    info = benchmark.extra_info
    info["device"] = device_name()
    if ran is not None:
        info["ran"] = ran
    if baseline is not None:
        info["baseline"] = baseline
        if baseline_s:
            info["baseline ms"] = baseline_s * 1e3
            if seconds:
                info["speed-up"] = baseline_s / seconds
    info.update(extra)
