"""Benchmarks: the fused multi-tensor reset ``ke_fast.ReinitPlan`` (op ``ke_fast::reset_entries_``) and its baselines.

Run with ``pytest benchmarks --benchmark-only`` (not part of ``pytest tests``). Weight sets: every conv and
linear weight plus the fc bias of ResNet-18 / ResNet-50 (1000 classes, ImageNet stem), fp32, on CUDA if there
is one, else CPU. Masks: KELS 0.5 and WELS 0.5. Contenders, one group per (model, mode):

* ``one-shot``: ``ReinitPlan(...).run(1)`` over all layers with packed int32 masks (validates every call; the launch
  table is cached per set of layer sizes).
* ``one-shot-float``: the same with the float 0/1 masks the official KE code holds (each generation's call): the
  masks are validated and packed on the first call only, then found in a cache keyed on the mask tensors and
  their version counters.
* ``eager``: the official KE per-layer loop (zeros_like + kaiming_uniform_ + where on a float mask ``.bool()``-ed
  every call, as ``self.mask.type(torch.bool)`` does).
* ``compile``: ``torch.compile`` of that same loop (compiled and warmed up outside the timed region).
* ``copy``: ``dst.copy_(src)`` of a flat buffer as large as the bytes reinit_ must move.

Timing: ``benchmarks/_timing.py``: on CUDA ``triton.testing.do_bench`` (flushes L2 between reps; ResNet-18's
weights would otherwise sit in an H100's L2) gives the ms in ``extra_info``; pytest-benchmark's own table
then times fn + synchronize, host overhead included. On CPU the pytest-benchmark mean is the number.
``extra_info`` holds ms, bytes, GB/s, the official per-layer loop as the baseline with the speed-up over it,
what ran (``ran``: the op's implementation on this device) and, for the fused reset, the % of the copy
bandwidth measured in the same run.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from _timing import device_seconds, measure, record, sync
from torch import nn

import ke_fast
from ke_fast import kernels as K
from ke_fast import ops
from ke_fast.models import resnet18, resnet50

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
SPLIT_RATE = 0.5
SEED = 0
MODELS = {"resnet18": resnet18, "resnet50": resnet50}
# pedantic rounds for the slow per-layer loops (CPU: a ResNet-50 eager reset takes a good part of a second)
SLOW_ROUNDS = {"resnet18": 5, "resnet50": 3}

CASES = [pytest.param(m, mode, id=f"{m}-{mode}") for m in MODELS for mode in ("kels", "wels")]


# ----------------------------------------------------------------------------------------------- weight sets
@functools.lru_cache(maxsize=None)
def _weight_set(model: str):
    """(names, weights, fans) of a freshly built model on DEVICE; callers clone before writing."""
    torch.manual_seed(0)
    net = MODELS[model](num_classes=1000).to(DEVICE)
    names, weights, fans = [], [], []
    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            names.append(f"{name}.weight")
            weights.append(m.weight.detach().contiguous())
            fans.append(K.fans_of(m.weight.shape))
            if m.bias is not None:  # only fc has a bias: U(+-1/sqrt(fan_in)) of its layer
                names.append(f"{name}.bias")
                weights.append(m.bias.detach().contiguous())
                fans.append(K.fans_of(m.weight.shape))
    return names, weights, fans


@functools.lru_cache(maxsize=None)
def _masks(model: str, mode: str):
    """(packed int32 masks, float 0/1 masks of the weights' shapes) for a split mode."""
    names, weights, _ = _weight_set(model)
    packed = []
    for i, (name, w) in enumerate(zip(names, weights)):
        if mode == "kels":
            packed.append(K.kels_mask_bits(w.shape, SPLIT_RATE, keep_all_inputs=name == "conv1.weight",
                                           keep_all_outputs=name.startswith("fc."), device=DEVICE))
        else:
            packed.append(ke_fast.wels_mask_bits(w.shape, SPLIT_RATE, seed=SEED, stream=K.layer_stream(0, i),
                                           device=DEVICE))
    floats = [K.unpack_mask(b, w.shape).float() for b, w in zip(packed, weights)]
    return packed, floats


@functools.lru_cache(maxsize=None)
def _bytes_moved(model: str, mode: str) -> int:
    """Bytes reinit_ must move: every reset element written once + every packed mask word read once.

    Fit elements are neither read nor written; the weights are never read."""
    _, weights, _ = _weight_set(model)
    packed, _ = _masks(model, mode)
    reset = sum(w.numel() - K.popcount(b) for w, b in zip(weights, packed))
    return reset * weights[0].element_size() + sum(b.numel() * b.element_size() for b in packed)


def _fresh(model: str, mode: str):
    """Clones of the original weights (so every test starts from the same values) and the originals."""
    _, weights, fans = _weight_set(model)
    return [w.clone() for w in weights], weights, fans


# ----------------------------------------------------------------------------------------------- baselines
def _official_loop(weights, masks, bias_bounds):
    """The official KE reset, layer by layer: a fresh init, then keep the fit entries.

    Biases (1-D; kaiming_uniform_ needs >= 2 dims) take nn.Linear's own bias init U(+-1/sqrt(fan_in)), which is
    what the official code's freshly built model holds."""
    for w, m, bound in zip(weights, masks, bias_bounds):
        new = torch.zeros_like(w)
        if bound is None:
            nn.init.kaiming_uniform_(new, a=math.sqrt(5))
        else:
            nn.init.uniform_(new, -bound, bound)
        w.data = torch.where(m.type(torch.bool), w, new)


_compiled_loop = None


def _get_compiled():
    global _compiled_loop
    if _compiled_loop is None:
        _compiled_loop = torch.compile(_official_loop)
    return _compiled_loop


def _bias_bounds(weights, fans):
    return [None if w.dim() > 1 else 1.0 / math.sqrt(f[0]) for w, f in zip(weights, fans)]


# ----------------------------------------------------------------------------------------------- timing


@functools.lru_cache(maxsize=None)
def _copy_gbps(nbytes: int) -> float:
    """Copy bandwidth in GB/s counting read + write (2 * nbytes per call) of an nbytes buffer, measured once."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / device_seconds(lambda: dst.copy_(src)) / 1e9


def _record(benchmark, seconds: float | None, nbytes: int, *, traffic: int | None = None, ran: str,
            baseline_s: float | None = None) -> None:
    """extra_info: bytes reinit_ must move and the effective GB/s on them (same work for every contender),
    what ran, and the speed-up over the official per-layer loop when ``baseline_s`` is given."""
    extra: dict = {"bytes": nbytes}
    if traffic is not None:
        extra["traffic_bytes"] = traffic
    if seconds:
        extra["GB/s"] = nbytes / seconds / 1e9
        if traffic is not None:
            extra["traffic GB/s"] = traffic / seconds / 1e9
    record(benchmark, seconds, ran=ran, baseline="official per-layer loop" if baseline_s else None,
           baseline_s=baseline_s, **extra)


@functools.lru_cache(maxsize=None)
def _official_seconds(model: str, mode: str) -> float:
    """The official per-layer loop's seconds on a case (outside pytest-benchmark, once per case)."""
    weights, _, fans = _fresh(model, mode)
    weights = [nn.Parameter(w) for w in weights]
    _, floats = _masks(model, mode)
    bounds = _bias_bounds(weights, fans)
    return device_seconds(lambda: _official_loop(weights, floats, bounds), reps=3)


def _op_ran() -> str:
    return f"ke_fast::reset_entries_, {ops.implementation(DEVICE.type)} implementation"


# ----------------------------------------------------------------------------------------------- sanity
def _check_reset(weights, originals, float_masks) -> None:
    """Fit entries keep their exact values; (almost) every reset entry got a new one — not a no-op."""
    reset = changed = 0
    for w, o, m in zip(weights, originals, float_masks):
        fit = m.bool()
        assert torch.equal(w[fit], o[fit]), "a fit entry changed"
        reset += int((~fit).sum())
        changed += int((w[~fit] != o[~fit]).sum())
    assert reset > 0 and changed >= 0.99 * reset, f"only {changed} of {reset} reset entries changed"


# ----------------------------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("model,mode", CASES)
@pytest.mark.parametrize("api", ["one-shot", "one-shot-float", "plan"])
def test_reinit_fused(benchmark, model, mode, api):
    """``one-shot`` / ``one-shot-float`` build a ``ReinitPlan`` on every call (packed / float masks); ``plan``
    is ``ReinitPlan.run`` (what ``ke_fast.reinit_(model, g)`` does from the second generation on)."""
    benchmark.group = f"reinit {model} {mode}"
    weights, originals, fans = _fresh(model, mode)
    packed, floats = _masks(model, mode)
    if api == "plan":
        plan = ke_fast.ReinitPlan(weights, packed, seed=SEED, fans=fans)

        def fn():
            plan.run(1)
    else:
        masks = packed if api == "one-shot" else floats

        def fn():
            ke_fast.ReinitPlan(weights, masks, seed=SEED, fans=fans).run(1)

    fn()  # builds the C++ extension / compiles the Triton kernel outside the timed region
    sync()
    nbytes = _bytes_moved(model, mode)
    seconds = measure(benchmark, fn, rounds=None)
    _record(benchmark, seconds, nbytes, traffic=nbytes, ran=_op_ran(), baseline_s=_official_seconds(model, mode))
    if seconds:
        pct = 100.0 * (nbytes / seconds / 1e9) / _copy_gbps(nbytes)
        benchmark.extra_info["% of copy bandwidth"] = pct
    sync()
    _check_reset(weights, originals, floats)


@pytest.mark.parametrize("model,mode", CASES)
def test_reinit_eager_official(benchmark, model, mode):
    benchmark.group = f"reinit {model} {mode}"
    weights, originals, fans = _fresh(model, mode)
    weights = [nn.Parameter(w) for w in weights]  # the official code resets nn.Parameters through .data
    _, floats = _masks(model, mode)
    bounds = _bias_bounds(weights, fans)

    def fn():
        _official_loop(weights, floats, bounds)

    fn()
    sync()
    seconds = measure(benchmark, fn, rounds=SLOW_ROUNDS[model])
    _record(benchmark, seconds, _bytes_moved(model, mode), ran="official per-layer loop, eager")
    sync()
    _check_reset([w.detach() for w in weights], originals, floats)


@pytest.mark.parametrize("model,mode", CASES)
def test_reinit_compiled_official(benchmark, model, mode):
    benchmark.group = f"reinit {model} {mode}"
    weights, originals, fans = _fresh(model, mode)
    weights = [nn.Parameter(w) for w in weights]
    _, floats = _masks(model, mode)
    bounds = _bias_bounds(weights, fans)
    try:
        compiled = _get_compiled()
        compiled(weights, floats, bounds)  # compile (once per model) and warm up, untimed
        compiled(weights, floats, bounds)
        sync()
    except Exception as exc:  # no compiler / unsupported backend on this machine
        pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}")

    def fn():
        compiled(weights, floats, bounds)

    seconds = measure(benchmark, fn, rounds=SLOW_ROUNDS[model])
    _record(benchmark, seconds, _bytes_moved(model, mode), ran="torch.compile of the official loop",
            baseline_s=_official_seconds(model, mode))
    sync()
    _check_reset([w.detach() for w in weights], originals, floats)


@pytest.mark.parametrize("model,mode", CASES)
def test_reinit_copy_same_bytes(benchmark, model, mode):
    # The bandwidth roofline: a flat buffer of exactly the bytes reinit_ must move (reset elements x element
    # size + packed mask bytes), copied src -> dst. The copy reads and writes it, so its DRAM traffic is
    # 2 x bytes; "traffic GB/s" is the copy bandwidth that reinit_'s "% of copy bandwidth" is measured against.
    benchmark.group = f"reinit {model} {mode}"
    nbytes = _bytes_moved(model, mode)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)

    def fn():
        dst.copy_(src)

    fn()
    sync()
    seconds = measure(benchmark, fn, rounds=None)
    _record(benchmark, seconds, nbytes, traffic=2 * nbytes, ran="dst.copy_(src) of the same bytes (roofline)")
    benchmark.extra_info["copy GB/s (cached, read+write)"] = _copy_gbps(nbytes)
    sync()
    assert torch.equal(dst, src)
