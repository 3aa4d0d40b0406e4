"""Benchmarks: sparse WELS conv2d / linear on bit-mask-compressed weights against dense and torch CSR.

Run with ``pytest benchmarks --benchmark-only`` (not part of ``pytest tests``). On CUDA if there is one,
else CPU.

(a) Single layers. ResNet-18 conv shapes (3x3 64->64 at 56x56, 128->128 at 28x28, 256->256 at 14x14,
512->512 at 7x7, padding 1; the 1x1 downsample 256->512 stride 2 at 14x14) and a 4096x4096 linear (no bias),
each with a random WELS mask (``torch.rand < s``, fixed seed) at split rate s in {0.5, 0.3, 0.1} and batch
{1, 8, 64}. CUDA: bf16, conv inputs channels_last, the full grid. CPU: fp32, s = 0.5 and batch 1 and 8 only
(keeps the file under 3 minutes). Contenders, one group per (layer, s, batch):

* ``dense``: cuDNN / cuBLAS (``F.conv2d`` / ``F.linear``) on W*M, precomputed in the run dtype.
* ``csr``: torch CSR, ``(W*M).to_sparse_csr()``; linear ``csr @ x.T`` (then ``.T``), conv im2col
  (``F.unfold``) then ``csr @ cols`` and the reshape back to NCHW. Skipped where torch has no CSR matmul for
  that dtype / device.
* ``triton``: the ops ``ke_fast::sparse_conv2d / sparse_linear`` with ``KE_FAST_BACKEND=triton`` on the
  compressed weight (bit mask + packed values + chunk offsets). On CPU it runs only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ke_fast is imported), one round, and only for cases of at
  most ``INTERPRET_MAX_TILES`` tile steps (the 1x1 conv at batch 1, ~10 s): the interpreter checks the code
  path, it is not a performance figure. Without it, skipped.
* ``dispatch``: ``ke_fast.ops.sparse_conv2d / sparse_linear``, what ``extract_sparse``'s layers call:
  ``extra_info["dispatch"]`` says what it picked (the Triton kernel, or decompress + dense).

"bytes" (each contender's own minimum traffic) = its weight storage (dense: N*K elements; triton and dispatch:
``Compressed.nbytes()``; csr: crow + col + values) + the input + the output in the run dtype.
``extra_info``: ms, bytes, GB/s on those bytes, TFLOP/s counting the dense 2*M*N*K (so every contender is on
the same scale), "speed-up vs dense" (dense ms / this ms, dense measured in the same run) and, on CUDA,
"% of H100 3.35 TB/s (nominal)": GB/s over the H100 SXM's data-sheet HBM bandwidth, not a measured copy.

(b) The whole fit network at batch 1 (group "resnet18 fit network"): ResNet-18 (1000 classes) split WELS 0.5,
eval mode. ``sparse``: ``ke_fast.extract_sparse(model)``; ``fit_only``: the split dense model under
``ke_fast.fit_only`` (W*M formed every forward); ``dense_baked``: a plain ResNet-18 holding W*M (cuDNN alone,
the floor for any dense path). CUDA: 1x3x224x224, bf16 model and input, channels_last. CPU: 1x3x64x64, fp32.

CPU threads: 1 by default (``KE_FAST_BENCH_THREADS``; 0 = torch's default), restored after the file.

Timing: on CUDA ``triton.testing.do_bench`` (flushes L2) gives the ms in ``extra_info``; pytest-benchmark's
table then times fn + synchronize, host overhead included. On CPU the pytest-benchmark mean
(``benchmark.pedantic``, at most ``ROUNDS`` rounds, fewer for slow contenders: about ``CPU_BUDGET_S`` each) is
the number.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import time

import pytest
import torch
from _timing import device_seconds as _device_seconds
from _timing import sync as _sync
import torch.nn.functional as F
from torch import nn

import ke_fast
from ke_fast import kernels as K
from ke_fast import ops
from ke_fast.kernels import backend as KB
from ke_fast.kernels import sparse_conv as SC
from ke_fast.models import resnet18

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
INTERPRET = KB.interpreting()
SEED = 0
H100_GBPS = 3350.0  # H100 SXM data sheet, HBM3: nominal, not measured
# CPU: pedantic rounds per case (the slowest CPU case, CSR im2col of 64->64 at 56x56 batch 8, takes ~0.1 s)
ROUNDS = 30 if CUDA else 4
NET_ROUNDS = 30 if CUDA else 5
INTERPRET_MAX_TILES = 2048  # Triton interpreter (CPU): only cases this small run (the 1x1 conv at batch 1)
CPU_BUDGET_S = 0.5  # CPU: rounds are cut to about this many seconds per benchmark (never below 2)

# name -> (kind, C_in / K, C_out / N, kernel, H = W, stride, padding)
LAYERS = {
    "conv3x3-64-56": ("conv", 64, 64, 3, 56, 1, 1),
    "conv3x3-128-28": ("conv", 128, 128, 3, 28, 1, 1),
    "conv3x3-256-14": ("conv", 256, 256, 3, 14, 1, 1),
    "conv3x3-512-7": ("conv", 512, 512, 3, 7, 1, 1),
    "conv1x1-256to512-s2-14": ("conv", 256, 512, 1, 14, 2, 0),
    "linear-4096x4096": ("linear", 4096, 4096, None, None, None, None),
}
SPLIT_RATES = (0.5, 0.3, 0.1) if CUDA else (0.5,)
BATCHES = (1, 8, 64) if CUDA else (1, 8)
# CPU: intra-op threads while this file runs (KE_FAST_BENCH_THREADS, default 1; 0 = torch's default). On a
# shared machine OpenMP barriers stall for a scheduler slice (~30 ms) whenever a thread is descheduled, which
# buried every small layer under the same ~30 ms; one thread gives per-core figures that reproduce.
CPU_THREADS = int(os.environ.get("KE_FAST_BENCH_THREADS", "1"))


@pytest.fixture(autouse=True, scope="module")
def _cpu_threads():
    if CUDA or CPU_THREADS <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
CASES = [pytest.param(layer, s, b, id=f"{layer}-s{s}-b{b}") for layer in LAYERS for s in SPLIT_RATES
         for b in BATCHES]


# ----------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def _case(layer: str, s: float, batch: int) -> dict:
    """Weights, mask, the three weight formats, the input and the fp32 reference output of a case."""
    kind, cin, cout, k, hw, stride, pad = LAYERS[layer]
    g = torch.Generator().manual_seed(SEED)
    shape = (cout, cin, k, k) if kind == "conv" else (cout, cin)
    fan_in = math.prod(shape[1:])
    w = (torch.randn(shape, generator=g) / math.sqrt(fan_in)).to(DEVICE)
    mask = (torch.rand(shape, generator=g) < s).to(DEVICE)
    x = torch.randn((batch, cin, hw, hw) if kind == "conv" else (batch, cin), generator=g).to(DEVICE)
    wm32 = w * mask
    if kind == "conv":
        ref = F.conv2d(x, wm32, None, stride, pad)
    else:
        ref = F.linear(x, wm32)
    x = x.to(DTYPE)
    if kind == "conv" and CUDA:
        x = x.contiguous(memory_format=torch.channels_last)
    wm = wm32.to(DTYPE)
    if kind == "conv" and CUDA:
        wm = wm.contiguous(memory_format=torch.channels_last)
    cw = SC.compress(w.to(DTYPE), mask)
    out_rows = batch * (ref.shape[2] * ref.shape[3] if kind == "conv" else 1)
    return dict(kind=kind, x=x, wm=wm, cw=cw, ref=ref, stride=(stride, stride) if stride else None,
                pad=(pad, pad) if pad is not None else None, k=k, m=out_rows, n=cout, kdim=fan_in, s=s)


def _esize() -> int:
    return torch.empty((), dtype=DTYPE).element_size()


def _io_bytes(c: dict) -> int:
    return (c["x"].numel() + c["ref"].numel()) * _esize()


def _flops(c: dict) -> int:
    return 2 * c["m"] * c["n"] * c["kdim"]


# ----------------------------------------------------------------------------------------------- contenders
def _dense_fn(c: dict):
    x, wm = c["x"], c["wm"]
    if c["kind"] == "conv":
        stride, pad = c["stride"], c["pad"]
        return lambda: F.conv2d(x, wm, None, stride, pad)
    return lambda: F.linear(x, wm)


def _csr_fn(c: dict):
    """(fn, CSR weight bytes); raises where torch has no CSR path for this dtype / device."""
    x, wm = c["x"], c["wm"]
    csr = wm.reshape(wm.shape[0], -1).contiguous().to_sparse_csr()
    nbytes = sum(t.numel() * t.element_size() for t in (csr.crow_indices(), csr.col_indices(), csr.values()))
    if c["kind"] == "linear":
        return (lambda: (csr @ x.T).T), nbytes
    k, stride, pad = c["k"], c["stride"], c["pad"]
    b, _, h, w = x.shape
    oh = (h + 2 * pad[0] - k) // stride[0] + 1
    ow = (w + 2 * pad[1] - k) // stride[1] + 1
    n = wm.shape[0]

    def fn():
        cols = F.unfold(x, k, padding=pad, stride=stride)  # [B, C*k*k, L], (c, kh, kw) order as W.reshape
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [C*k*k, B*L]
        return (csr @ cols).view(n, b, oh, ow).transpose(0, 1)

    return fn, nbytes


def _triton_fn(c: dict):
    """The sparse op itself (the test sets KE_FAST_BACKEND=triton: on CPU tensors that is the interpreter)."""
    x, cw = c["x"], c["cw"]
    args = (cw.bits, cw.values, cw.offsets, list(cw.shape), None)
    if c["kind"] == "conv":
        stride, pad = list(c["stride"]), list(c["pad"])
        return lambda: torch.ops.ke_fast.sparse_conv2d.default(x, *args, stride, pad, [1, 1], 1)
    return lambda: torch.ops.ke_fast.sparse_linear.default(x, *args)


def _dispatch_fn(c: dict):
    x, cw = c["x"], c["cw"]
    if c["kind"] == "conv":
        stride, pad = c["stride"], c["pad"]
        return lambda: ops.sparse_conv2d(x, cw, None, stride, pad, (1, 1), 1)
    return lambda: ops.sparse_linear(x, cw, None)


def _dispatch_choice(c: dict) -> str:
    sparse = ops.use_sparse(c["m"], SC.density_of(c["cw"]), c["x"].device)
    return "triton sparse kernel" if sparse else "decompress + dense (cuDNN/cuBLAS or CPU)"


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| against the fp32 dense reference."""
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    return (out.float() - ref).abs().max().item() / (ref.abs().max().item() or 1.0)


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    """ke_fast's own kernels: the fp32 dense reference's values, to the run dtype's accuracy. (Baselines are
    not judged: their error is recorded in extra_info, e.g. torch CSR in bf16 rounds its partial sums.)"""
    err = _rel_error(out, ref)
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
    assert err <= tol, f"max |err| / max |ref| = {err:.3g} > {tol}"


# ----------------------------------------------------------------------------------------------- timing


def _measure(benchmark, fn, rounds: int) -> float | None:
    """Run the benchmark; return seconds per call (do_bench on CUDA, the pytest-benchmark mean on CPU)."""
    if CUDA:
        seconds = _device_seconds(fn)

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=rounds, warmup_rounds=2)
        return seconds
    t0 = time.perf_counter()
    fn()  # warm-up, and sizes the rounds: slow CPU contenders get fewer (>= 2) to bound the file's runtime
    rounds = max(2, min(rounds, int(CPU_BUDGET_S / (time.perf_counter() - t0))))
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0)
    stats = benchmark.stats  # None under --benchmark-disable
    return stats.stats.mean if stats is not None else None


_DENSE_S: dict = {}  # (layer, s, batch) or network key -> dense seconds measured in this run


def _dense_seconds(key, fn) -> float:
    if key not in _DENSE_S:
        _DENSE_S[key] = _device_seconds(fn)
    return _DENSE_S[key]


def _record(benchmark, seconds: float | None, nbytes: int | None, flops: int | None = None,
            dense_s: float | None = None) -> None:
    info = benchmark.extra_info
    info["device"] = str(torch.cuda.get_device_name() if CUDA else "cpu")
    info["dtype"] = str(DTYPE).replace("torch.", "")
    if not CUDA:
        info["threads"] = torch.get_num_threads()
    if nbytes is not None:
        info["bytes"] = nbytes
    if not seconds:
        return
    info["ms"] = seconds * 1e3
    if nbytes is not None:
        gbps = nbytes / seconds / 1e9
        info["GB/s"] = gbps
        if CUDA:
            info["% of H100 3.35 TB/s (nominal)"] = 100.0 * gbps / H100_GBPS
    if flops is not None:
        info["TFLOP/s (dense-equivalent)"] = flops / seconds / 1e12
    if dense_s:
        info["speed-up vs dense"] = dense_s / seconds


def _group(benchmark, layer: str, s: float, batch: int) -> None:
    benchmark.group = f"sparse {layer} s={s} batch={batch} {str(DTYPE).replace('torch.', '')}"


# ----------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("layer,s,batch", CASES)
def test_sparse_dense_baseline(benchmark, layer, s, batch):
    _group(benchmark, layer, s, batch)
    c = _case(layer, s, batch)
    fn = _dense_fn(c)
    benchmark.extra_info["max |err| / max |ref|"] = _rel_error(fn(), c["ref"])
    _sync()
    seconds = _measure(benchmark, fn, ROUNDS)
    if seconds:
        _DENSE_S.setdefault((layer, s, batch), seconds)
    nbytes = c["wm"].numel() * _esize() + _io_bytes(c)
    _record(benchmark, seconds, nbytes, _flops(c))
    benchmark.extra_info["density"] = SC.density_of(c["cw"])


@pytest.mark.parametrize("layer,s,batch", CASES)
def test_sparse_torch_csr(benchmark, layer, s, batch):
    _group(benchmark, layer, s, batch)
    c = _case(layer, s, batch)
    try:
        fn, wbytes = _csr_fn(c)
        out = fn()
        _sync()
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch CSR matmul unsupported for {DTYPE} on {DEVICE.type}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]}")
    benchmark.extra_info["max |err| / max |ref|"] = _rel_error(out, c["ref"])
    seconds = _measure(benchmark, fn, ROUNDS)
    _record(benchmark, seconds, wbytes + _io_bytes(c), _flops(c), _dense_seconds((layer, s, batch), _dense_fn(c)))


@pytest.mark.parametrize("layer,s,batch", CASES)
def test_sparse_triton(benchmark, layer, s, batch, monkeypatch):
    _group(benchmark, layer, s, batch)
    monkeypatch.setenv("KE_FAST_BACKEND", "triton")
    if not CUDA and not INTERPRET:
        pytest.skip("Triton sparse kernel on CPU runs only under the interpreter (TRITON_INTERPRET=1 before "
                    "ke_fast is imported), which is not a performance path")
    c = _case(layer, s, batch)
    if not CUDA:
        tiles = -(-c["m"] // 16) * -(-c["n"] // 16) * -(-c["kdim"] // 32)
        if tiles > INTERPRET_MAX_TILES:
            pytest.skip(f"Triton interpreter: {tiles} 16x16x32 tile steps (~10 ms each) > {INTERPRET_MAX_TILES}; "
                        "it checks the code path, its timings mean nothing")
    fn = _triton_fn(c)
    _check(fn(), c["ref"])  # compiles + autotunes outside the timed region
    _sync()
    if CUDA:
        seconds = _measure(benchmark, fn, ROUNDS)
    else:  # interpreter: one round
        benchmark.pedantic(fn, rounds=1, warmup_rounds=0)
        seconds = benchmark.stats.stats.mean if benchmark.stats is not None else None
    _record(benchmark, seconds, c["cw"].nbytes() + _io_bytes(c), _flops(c),
            _dense_seconds((layer, s, batch), _dense_fn(c)))
    benchmark.extra_info["compressed / dense weight bytes"] = c["cw"].nbytes() / (c["wm"].numel() * _esize())
    if not CUDA:
        benchmark.extra_info["note"] = "Triton interpreter: not a performance figure"


@pytest.mark.parametrize("layer,s,batch", CASES)
def test_sparse_dispatch(benchmark, layer, s, batch):
    _group(benchmark, layer, s, batch)
    c = _case(layer, s, batch)
    fn = _dispatch_fn(c)
    _check(fn(), c["ref"])
    _sync()
    seconds = _measure(benchmark, fn, ROUNDS)
    _record(benchmark, seconds, c["cw"].nbytes() + _io_bytes(c), _flops(c),
            _dense_seconds((layer, s, batch), _dense_fn(c)))
    benchmark.extra_info["dispatch"] = _dispatch_choice(c)
    benchmark.extra_info["rows (M)"] = c["m"]


# ----------------------------------------------------------------------------------------------- network
NET_CONTENDERS = ("sparse", "fit_only", "dense_baked")


@functools.lru_cache(maxsize=None)
def _networks():
    """(split WELS 0.5 ResNet-18, its extract_sparse copy, a plain ResNet-18 holding W*M, input), eval mode."""
    torch.manual_seed(SEED)
    net = resnet18(num_classes=1000)
    ke_fast.split(net, "wels", 0.5, seed=SEED)
    net = net.to(DEVICE, DTYPE).eval()
    sparse = ke_fast.extract_sparse(net).eval()
    baked = copy.deepcopy(net)
    with torch.no_grad():
        for _, m in ke_fast.masked_layers(baked):
            m.weight.mul_(K.unpack_mask(m.fit_mask, m.weight.shape).to(m.weight.dtype))
            if m.bias is not None:
                m.bias.mul_(K.unpack_mask(m.bias_mask, m.bias.shape).to(m.bias.dtype))
    ke_fast.revert(baked)
    side = 224 if CUDA else 64
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(SEED)).to(DEVICE, DTYPE)
    if CUDA:
        x = x.contiguous(memory_format=torch.channels_last)
        net = net.to(memory_format=torch.channels_last)
        baked = baked.to(memory_format=torch.channels_last)
    return net, sparse, baked, x


def _net_fn(which: str):
    net, sparse, baked, x = _networks()
    if which == "sparse":
        return lambda: sparse(x)
    if which == "dense_baked":
        return lambda: baked(x)

    def fit():
        with ke_fast.fit_only(net):
            return net(x)

    return fit


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _sparse_layers_on_triton(x: torch.Tensor) -> tuple[int, int]:
    """(layers of the sparse network the dispatcher sends to the Triton kernel at this input, all its layers)."""
    _, sparse, _, _ = _networks()
    picked = []

    def hook(mod, inp, out):
        xi = inp[0]
        cw = mod.compressed
        if isinstance(mod, ke_fast.SparseConv2d):
            rows = ops.conv_rows(xi, cw, mod.stride, mod.padding, mod.dilation)
        else:
            rows = xi.numel() // max(1, xi.shape[-1])
        picked.append(ops.use_sparse(rows, SC.density_of(cw), xi.device))

    layers = [m for m in sparse.modules() if isinstance(m, (ke_fast.SparseConv2d, ke_fast.SparseLinear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            sparse(x)
    finally:
        for h in handles:
            h.remove()
    return sum(picked), len(layers)


@pytest.mark.parametrize("which", NET_CONTENDERS)
def test_sparse_network(benchmark, which):
    net, sparse, baked, x = _networks()
    benchmark.group = f"resnet18 fit network WELS 0.5 batch 1 {tuple(x.shape[1:])} {str(DTYPE).replace('torch.', '')}"
    with torch.no_grad():
        ref = _net_fn("fit_only")().float()
        fn = _net_fn(which)
        out = fn().float()
        _sync()
        scale = ref.abs().max().item() or 1.0
        tol = 5e-2 if DTYPE == torch.bfloat16 else 1e-4
        assert (out - ref).abs().max().item() <= tol * scale, "sparse network output differs from fit-only"
        seconds = _measure(benchmark, fn, NET_ROUNDS)
        dense_s = None if which == "fit_only" else _dense_seconds("net", _net_fn("fit_only"))
        if which == "fit_only" and seconds:
            _DENSE_S.setdefault("net", seconds)
    model = {"sparse": sparse, "fit_only": net, "dense_baked": baked}[which]
    _record(benchmark, seconds, None, None, dense_s)
    if dense_s and seconds:
        benchmark.extra_info.pop("speed-up vs dense", None)
        benchmark.extra_info["speed-up vs fit_only"] = dense_s / seconds
    benchmark.extra_info["weight bytes"] = _weight_bytes(model)
    if which == "sparse":
        on, total = _sparse_layers_on_triton(x)
        benchmark.extra_info["layers on triton kernel"] = f"{on} of {total}"
