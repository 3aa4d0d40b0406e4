"""Benchmarks: the fused masked weight ``ke_fast.ops.masked_weight`` and a fit-mode training step.

Run with ``pytest benchmarks --benchmark-only`` (not part of ``pytest tests``). On CUDA if there is one,
else CPU.

(a) ``masked_weight(w, words, dtype)`` = ``(W * M).to(dtype)`` in one pass, on the conv weight shapes of
ResNet-18 (1000 classes, ImageNet stem; one case per distinct shape, with that shape's KELS 0.5 mask from
``ke_fast.split``, plus ``all-convs``: the 20 conv weights one call each, as a fit-mode forward does),
fp32 -> fp32 and fp32 -> bf16. Contenders, one group per (shape, dtype):

* ``kernel``: ``ke_fast.ops.masked_weight`` with the packed int32 mask.
* ``eager``: ``(w * M).to(dtype)`` with a dense float 0/1 mask, as the official KE code holds it.
* ``copy``: ``dst.copy_(src)`` of a flat fp32 buffer, sized so that its read + write move exactly the
  bytes the kernel must move (the bandwidth roofline).

"bytes moved" (the same for every contender) = the kept entries read + the mask words read + every output
entry written in the output dtype. ``extra_info``: ms, bytes, GB/s on those bytes, and "% of copy GB/s"
(copy measured in the same run, same bytes). The eager baseline's real traffic is larger (it reads the
whole weight and a 4-byte-per-entry mask, and writes an fp32 product; then reads it back for the cast):
``traffic_bytes``.

(b) A training step (zero_grad + forward + label-smoothed cross entropy + backward + SGD step, with
ke_fast's Config defaults for lr / momentum / weight decay / label smoothing) of ResNet-18:

* ``dense``: the split model (KELS 0.5) in dense mode (what KE trains).
* ``fit-op`` / ``fit-eager`` / ``fit-batched``: the same model under ``ke_fast.set_mode(model, "fit")``, every
  conv / linear computing with W*M by that training path of ``ke_fast.nn.TRAIN_PATH`` (per-layer custom op;
  plain ``torch.where`` on a cached bool mask; one multi-tensor launch for all layers per forward and one per
  backward). The fastest one should be the device's default in ``TRAIN_PATH``.
* ``prune``: the torch.nn.utils.prune way: an unsplit ResNet-18 with ``prune.custom_from_mask`` on every
  conv / linear weight, using the same KELS masks (float 0/1, as the official code keeps them).

CPU: small stem (3x3 conv, no pooling), 10 classes, batch 32 of 3x32x32, fp32. CUDA: ImageNet stem, 1000
classes, batch 64 of 3x224x224, bf16 autocast, channels_last. ``extra_info``: ms per step and "fit/dense"
(this contender's ms over the dense step's ms; on CPU also "fit/dense (min)", from the least disturbed rounds).

(c) Evaluation of the fit hypothesis at batch 1 (ResNet-18, ImageNet stem, 1000 classes, WELS 0.5, 3x224x224;
CUDA: bf16 autocast and channels_last), gradients off:

* ``fit_only``: the split model under ``ke_fast.fit_only`` (W*M computed once, on the first forward, and
  cached: later forwards launch nothing for the masks).
* ``plain``: an unsplit ResNet-18 whose weights hold W*M (and masked biases): the floor fit mode aims at.

``extra_info``: ms and "fit_only/plain". The issue's targets: <= 1.05x on an H100, <= 1.1x on CPU.

Figures: only from a results file of ``make bench`` (``benchmarks/results/``; ``python benchmarks/report.py``
renders it); this file quotes none.

Timing: ``benchmarks/_timing.py`` (on CUDA ``triton.testing.do_bench``, which flushes L2, gives the ms in
``extra_info``; pytest-benchmark's table then times fn + synchronize. On CPU the pytest-benchmark mean of a
few rounds is the number). ``extra_info["ran"]`` names the implementation or training path that executed.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from _timing import device_seconds, measure, record, sync
from torch import nn
from torch.nn.utils import prune

import ke_fast
from ke_fast import kernels as K
from ke_fast import nn as knn
from ke_fast import ops
from ke_fast.evolve import Config
from ke_fast.models import resnet18

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
SPLIT_RATE = 0.5
SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# CPU: pedantic rounds (the CPU masked path is far slower than a copy; keep the file under 2 minutes)
MASK_ROUNDS = 30 if CUDA else 8
STEP_ROUNDS = 20 if CUDA else 4


def _conv_shapes() -> list[tuple[int, ...]]:
    """Distinct conv weight shapes of ResNet-18, in model order (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = resnet18(num_classes=1000)
    shapes: list[tuple[int, ...]] = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.weight.shape) not in shapes:
            shapes.append(tuple(m.weight.shape))
    return shapes


SHAPE_IDS = ["x".join(map(str, s)) for s in _conv_shapes()] + ["all-convs"]
MASK_CASES = [pytest.param(s, d, id=f"{s}-fp32to{d}") for s in SHAPE_IDS for d in DTYPES]


# ----------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def _split_resnet18() -> nn.Module:
    """ResNet-18 (1000 classes) on DEVICE, split KELS 0.5; never trained (callers copy or only read)."""
    torch.manual_seed(SEED)
    net = resnet18(num_classes=1000).to(DEVICE)
    ke_fast.split(net, "kels", SPLIT_RATE, seed=SEED)
    return net


@functools.lru_cache(maxsize=None)
def _weight_set(case: str):
    """[(weight, packed words, float 0/1 mask)] of a case: the first conv of that shape, or every conv."""
    net = _split_resnet18()
    convs = [m for _, m in ke_fast.masked_layers(net) if isinstance(m, nn.Conv2d)]
    if case != "all-convs":
        convs = [next(m for m in convs if "x".join(map(str, m.weight.shape)) == case)]
    return [(m.weight.detach(), m.fit_mask, K.unpack_mask(m.fit_mask, m.weight.shape).float()) for m in convs]


@functools.lru_cache(maxsize=None)
def _bytes_moved(case: str, dtype_id: str) -> int:
    """Kept entries read + mask words read + every output entry written (the output dtype's size)."""
    out_size = torch.empty((), dtype=DTYPES[dtype_id]).element_size()
    total = 0
    for w, words, _ in _weight_set(case):
        total += K.popcount(words) * w.element_size() + words.numel() * words.element_size()
        total += w.numel() * out_size
    return total


def _eager_traffic(case: str, dtype_id: str) -> int:
    """What ``(w * M).to(dtype)`` really moves: read W and M, write W*M; a cast reads it and writes again."""
    out_size = torch.empty((), dtype=DTYPES[dtype_id]).element_size()
    n = sum(w.numel() for w, _, _ in _weight_set(case))
    cast = 0 if DTYPES[dtype_id] == torch.float32 else n * (4 + out_size)
    return 3 * 4 * n + cast


# ----------------------------------------------------------------------------------------------- timing


def _copy_buffers(nbytes: int):
    """src, dst fp32 buffers whose copy reads nbytes/2 and writes nbytes/2: nbytes moved in all."""
    n = max(1, nbytes // 8)
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    return src, torch.empty_like(src)


@functools.lru_cache(maxsize=None)
def _copy_gbps(nbytes: int) -> float:
    """GB/s of a device copy moving nbytes (read + write), measured once per size."""
    src, dst = _copy_buffers(nbytes)
    return 2 * src.numel() * 4 / device_seconds(lambda: dst.copy_(src)) / 1e9


def _implementation() -> str:
    """The implementation the ke_fast ops run on this device (the KE_FAST_BACKEND override included)."""
    return f"ke_fast::masked_weight, {ops.implementation(DEVICE.type)} implementation"


@functools.lru_cache(maxsize=None)
def _eager_seconds(case: str, dtype_id: str) -> float:
    """The eager baseline's seconds for a case (outside pytest-benchmark, once per case)."""
    items, dtype = _weight_set(case), DTYPES[dtype_id]
    return device_seconds(lambda: [(w * mask).to(dtype) for w, _, mask in items])


def _record_mask(benchmark, case: str, dtype_id: str, seconds: float | None, ran: str,
                 baseline_s: float | None = None) -> None:
    nbytes = _bytes_moved(case, dtype_id)
    extra = {"layers": len(_weight_set(case)), "bytes moved": nbytes}
    if seconds:
        gbps = nbytes / seconds / 1e9
        extra.update({"GB/s": gbps, "% of copy GB/s": 100.0 * gbps / _copy_gbps(nbytes)})
    record(benchmark, seconds, ran=ran, baseline="eager (w * M).to(dtype)" if baseline_s else None,
           baseline_s=baseline_s, **extra)


# ----------------------------------------------------------------------------------------------- (a) masked weight
@pytest.mark.parametrize("case,dtype_id", MASK_CASES)
def test_masked_weight_kernel(benchmark, case, dtype_id):
    benchmark.group = f"masked_weight {case} fp32->{dtype_id}"
    dtype = DTYPES[dtype_id]
    items = _weight_set(case)

    def fn():  # outputs dropped at once, as the eager baseline's are (same allocator reuse)
        for w, words, _ in items:
            ops.masked_weight(w, words, dtype)

    fn()  # compiles the Triton kernel outside the timed region
    sync()
    seconds = measure(benchmark, fn, MASK_ROUNDS)
    _record_mask(benchmark, case, dtype_id, seconds, _implementation(), _eager_seconds(case, dtype_id))
    outs = [ops.masked_weight(w, words, dtype) for w, words, _ in items]
    sync()
    for out, (w, _, mask) in zip(outs, items):
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, (w * mask).to(dtype)), "masked_weight differs from (w * M).to(dtype)"


@pytest.mark.parametrize("case,dtype_id", MASK_CASES)
def test_masked_weight_eager(benchmark, case, dtype_id):
    benchmark.group = f"masked_weight {case} fp32->{dtype_id}"
    dtype = DTYPES[dtype_id]
    items = _weight_set(case)

    def fn():
        for w, _, mask in items:
            (w * mask).to(dtype)

    fn()
    sync()
    seconds = measure(benchmark, fn, MASK_ROUNDS)
    _record_mask(benchmark, case, dtype_id, seconds, "eager (w * M).to(dtype), float 0/1 mask")
    benchmark.extra_info["traffic_bytes"] = _eager_traffic(case, dtype_id)


@pytest.mark.parametrize("case,dtype_id", MASK_CASES)
def test_masked_weight_copy_same_bytes(benchmark, case, dtype_id):
    benchmark.group = f"masked_weight {case} fp32->{dtype_id}"
    src, dst = _copy_buffers(_bytes_moved(case, dtype_id))

    def fn():
        dst.copy_(src)

    fn()
    sync()
    seconds = measure(benchmark, fn, MASK_ROUNDS)
    _record_mask(benchmark, case, dtype_id, seconds, "dst.copy_(src) of the same bytes (roofline)")
    sync()
    assert torch.equal(dst, src)


# ----------------------------------------------------------------------------------------------- (b) training step
# dense first: the others report their ratio to it
STEP_KINDS = ("dense", *(f"fit-{path}" for path in knn.TRAIN_PATHS), "prune")
STEP_CLASSES = 1000 if CUDA else 10
_STEP_SECONDS: dict[str, tuple[float, float | None]] = {}  # kind -> (seconds, min seconds on CPU)


@functools.lru_cache(maxsize=None)
def _step_split() -> nn.Module:
    """The split ResNet-18 the step contenders copy: (a)'s model on CUDA, the small-stem 10-class one on CPU."""
    if CUDA:
        return _split_resnet18()
    torch.manual_seed(SEED)
    net = resnet18(num_classes=STEP_CLASSES, stem="small")
    return ke_fast.split(net, "kels", SPLIT_RATE, seed=SEED)


def _batch():
    g = torch.Generator().manual_seed(SEED)
    n, size = (64, 224) if CUDA else (32, 32)
    x = torch.randn(n, 3, size, size, generator=g).to(DEVICE)
    y = torch.randint(0, STEP_CLASSES, (n,), generator=g).to(DEVICE)
    if CUDA:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _step_model(kind: str) -> nn.Module:
    """A fresh trainable copy of the contender's model (same initial weights and masks for all)."""
    split = _step_split()
    if kind != "prune":
        net = copy.deepcopy(split)
        ke_fast.set_mode(net, "dense" if kind == "dense" else "fit")
    else:
        torch.manual_seed(SEED)
        net = resnet18(num_classes=STEP_CLASSES, stem="imagenet" if CUDA else "small").to(DEVICE)
        net.load_state_dict({k: v for k, v in split.state_dict().items() if not k.endswith("fit_mask")})
        masks = ke_fast.masks(split)
        for name, m in net.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                prune.custom_from_mask(m, "weight", masks[name].to(m.weight.dtype))
    if CUDA:
        net = net.to(memory_format=torch.channels_last)
    return net.train()


def _step_fn(kind: str):
    """(step function, model): one SGD training step on a fixed batch (fit kinds: by their training path)."""
    cfg = Config()
    net = _step_model(kind)
    x, y = _batch()
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    path = kind[len("fit-"):] if kind.startswith("fit-") else knn.TRAIN_PATH.get(DEVICE.type)

    def step():
        default, knn.TRAIN_PATH[DEVICE.type] = knn.TRAIN_PATH[DEVICE.type], path
        try:
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA):
                out = net(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            knn.TRAIN_PATH[DEVICE.type] = default
        return loss

    return step, net


def _dense_seconds() -> tuple[float, float | None]:
    """The dense step's (seconds, min seconds) from this run (measured here if the dense test did not run first)."""
    if "dense" not in _STEP_SECONDS:
        step, _ = _step_fn("dense")
        _STEP_SECONDS["dense"] = (device_seconds(step), None)
    return _STEP_SECONDS["dense"]


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_train_step(benchmark, kind):
    benchmark.group = "train step resnet18 " + ("b64 3x224x224 bf16 channels_last" if CUDA
                                                 else "small stem b32 3x32x32 fp32")
    step, net = _step_fn(kind)
    step()  # warm-up: kernel compilation, allocator, cuDNN plan choice
    sync()
    seconds = measure(benchmark, step, STEP_ROUNDS)
    ran = {"dense": "dense mode", "prune": "torch.nn.utils.prune.custom_from_mask, unsplit model"}.get(
        kind, f"fit mode, training path {kind[len('fit-'):]!r}")
    dense = dense_min = None
    if seconds:
        least = benchmark.extra_info.get("min ms")
        _STEP_SECONDS[kind] = (seconds, None if least is None else least / 1e3)
        dense, dense_min = _dense_seconds()
    record(benchmark, seconds, ran=ran, baseline="dense step" if kind != "dense" else None, baseline_s=dense,
           **{"default training path": knn.TRAIN_PATH.get(DEVICE.type)})
    if seconds:
        benchmark.extra_info["fit/dense"] = seconds / dense
        least = benchmark.extra_info.get("min ms")
        if least is not None and dense_min:
            benchmark.extra_info["fit/dense (min)"] = least / 1e3 / dense_min
    loss = step()
    sync()
    assert torch.isfinite(loss).item()
    if kind.startswith("fit"):  # fit mode gives the reset weights no gradient: only weight decay moves them
        m = dict(ke_fast.masked_layers(net))["layer4.1.conv2"]
        keep = K.unpack_mask(m.fit_mask, m.weight.shape)
        assert m.weight.grad is not None and m.weight.grad[keep].any() and not m.weight.grad[~keep].any()


# ----------------------------------------------------------------------------------------------- (c) fit_only eval
EVAL_KINDS = ("plain", "fit_only")  # plain first: fit_only reports its ratio to it
EVAL_ROUNDS = 50 if CUDA else 15
_EVAL_SECONDS: dict[str, float] = {}


@functools.lru_cache(maxsize=None)
def _eval_models() -> tuple[nn.Module, nn.Module]:
    """(split WELS 0.5 ResNet-18, plain ResNet-18 holding its W*M and masked biases), eval mode, on DEVICE."""
    torch.manual_seed(SEED)
    split = ke_fast.split(resnet18(num_classes=1000).to(DEVICE), "wels", SPLIT_RATE, seed=SEED).eval()
    plain = resnet18(num_classes=1000).to(DEVICE).eval()
    state = {k: v for k, v in split.state_dict().items() if not k.endswith("fit_mask")}
    layers = dict(ke_fast.masked_layers(split))
    with torch.no_grad():
        for name, m in layers.items():
            state[f"{name}.weight"] = ops.masked_weight(m.weight, m.fit_mask)
            if m.bias is not None:
                state[f"{name}.bias"] = ops.masked_weight(m.bias, m.bias_mask)
    plain.load_state_dict(state)
    if CUDA:
        split, plain = split.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    return split, plain


@pytest.mark.parametrize("kind", EVAL_KINDS)
def test_fit_eval_batch1(benchmark, kind):
    benchmark.group = "fit eval resnet18 wels0.5 b1 3x224x224 " + ("bf16 channels_last" if CUDA else "fp32")
    split, plain = _eval_models()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(SEED)).to(DEVICE)
    if CUDA:
        x = x.contiguous(memory_format=torch.channels_last)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA))
        net = stack.enter_context(ke_fast.fit_only(split)) if kind == "fit_only" else plain

        def fn():
            return net(x)

        want = fn()  # warm-up; fit_only computes and caches W*M here
        sync()
        seconds = measure(benchmark, fn, EVAL_ROUNDS)
        plain_s = None
        if seconds:
            _EVAL_SECONDS[kind] = seconds
            if kind != "plain":
                plain_s = _EVAL_SECONDS.get("plain") or device_seconds(lambda: plain(x))
                benchmark.extra_info["fit_only/plain"] = seconds / plain_s
        record(benchmark, seconds, ran="ke_fast.fit_only (W*M cached)" if kind == "fit_only" else
               "plain model holding W*M", baseline="plain model holding W*M" if kind != "plain" else None,
               baseline_s=plain_s)
        got = fn()
        other = plain(x) if kind == "fit_only" else want
    torch.testing.assert_close(got.float(), other.float(), **({"rtol": 2e-2, "atol": 2e-2} if CUDA else {}))
