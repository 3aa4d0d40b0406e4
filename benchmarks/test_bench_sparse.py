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
* ``dispatch``: ``ke_fast.dispatch.sparse_conv2d / sparse_linear``, what ``extract_sparse``'s layers call:
  ``extra_info["dispatch"]`` says what it picked (the Triton kernel, or decompress + dense).

"bytes" (each contender's own minimum traffic) = its weight storage (dense: N*K elements; triton and dispatch:
``Compressed.nbytes()``; csr: crow + col + values) + the input + the output in the run dtype.
``extra_info``: ms, bytes, GB/s on those bytes, TFLOP/s counting the dense 2*M*N*K (so every contender is on
the same scale), "speed-up" over "baseline" (dense ms / this ms, dense measured in the same run) and, on CUDA,
"% of H100 3.35 TB/s (nominal)": GB/s over the H100 SXM's data-sheet HBM bandwidth, not a measured copy.

(a') Skinny linears (group "skinny ..."): 4096x4096 and 11008x4096 at 1-16 rows, density 0.5 and 0.3: the
split-K skinny Triton kernel against cuBLAS on W*M (CUDA only for the kernel; CPU runs the dense baseline).
``test_sparse_dispatch`` also reports ``vs faster path``: the faster of dense and Triton (same run) over the
dispatcher's time, with the layer's kept W*M as an extract_sparse layer holds it.

(b) The whole fit network at batch 1 (group "resnet18 fit network"): ResNet-18 (1000 classes), eval mode.
``sparse``: ``ke_fast.extract_sparse`` of a WELS 0.5 split; ``fit_only``: the split dense model under
``ke_fast.fit_only``; ``dense_baked``: a plain ResNet-18 holding W*M (cuDNN alone). ``*_ro``: the same under
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs; plain inductor on CPU), the sparse one
after an eager warm-up that makes the dispatcher's decisions; ``slim_ro``: ``extract_slim`` of a KELS 0.5 split
against its W*M model ``kels_dense_baked_ro``. CUDA: 1x3x224x224, bf16, channels_last. CPU: 1x3x64x64, fp32.

CPU threads: 1 by default (``KE_FAST_BENCH_THREADS``; 0 = torch's default), restored after the file.

Timing: ``benchmarks/_timing.py``: on CUDA ``triton.testing.do_bench`` (flushes L2) gives the ms in
``extra_info``; pytest-benchmark's table then times fn + synchronize, host overhead included. On CPU the
pytest-benchmark mean (``benchmark.pedantic``, at most ``ROUNDS`` rounds, fewer for slow contenders: about
``CPU_BUDGET_S`` each) is the number. ``extra_info["ran"]`` says what executed: the Triton kernel (on CPU only
the interpreter, never a performance figure), the dispatcher's pick, or for the whole network how many layers
ran the sparse kernel (e.g. "sparse kernel in 0 of 21 layers": such a network is dense compute on
pre-multiplied weights, and its time says nothing about sparse compute).
"""
from __future__ import annotations

import copy
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from _timing import device_seconds, measure, record, sync
from torch import nn

import ke_fast
from ke_fast import dispatch
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


@pytest.fixture(autouse=True)
def _settings():
    """The ops read KE_FAST_* once: after a test that set KE_FAST_BACKEND (monkeypatch restores the variable
    before this teardown runs, as this fixture requests none), the next one reads the environment again."""
    yield
    ops.reload_settings()


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
    """What an extract_sparse layer calls: the dispatcher with the layer's kept W*M (in the weight's dtype)."""
    x, cw, wm = c["x"], c["cw"], c["wm"]
    if c["kind"] == "conv":
        stride, pad = c["stride"], c["pad"]
        return lambda: dispatch.sparse_conv2d(x, cw, None, stride, pad, (1, 1), 1, dense=wm)
    return lambda: dispatch.sparse_linear(x, cw, None, dense=wm)


def _choices(fn) -> list[bool]:
    """The dispatcher's choices (True: the Triton sparse kernel) during one call of ``fn``."""
    real, picked = dispatch.use_sparse, []

    def spy(*args, **kwargs):
        picked.append(real(*args, **kwargs))
        return picked[-1]

    dispatch.use_sparse = spy
    try:
        with torch.no_grad():
            fn()
    finally:
        dispatch.use_sparse = real
    return picked


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


_DENSE_S: dict = {}  # (layer, s, batch) or network key -> dense seconds measured in this run


def _dense_seconds(key, fn) -> float:
    if key not in _DENSE_S:
        _DENSE_S[key] = device_seconds(fn)
    return _DENSE_S[key]


def _record(benchmark, seconds: float | None, nbytes: int | None, flops: int | None = None,
            dense_s: float | None = None, *, ran: str, baseline: str = "dense on W*M") -> None:
    extra: dict = {"dtype": str(DTYPE).replace("torch.", "")}
    if not CUDA:
        extra["threads"] = torch.get_num_threads()
    if nbytes is not None:
        extra["bytes"] = nbytes
    if seconds:
        if nbytes is not None:
            gbps = nbytes / seconds / 1e9
            extra["GB/s"] = gbps
            if CUDA:
                extra["% of H100 3.35 TB/s (nominal)"] = 100.0 * gbps / H100_GBPS
        if flops is not None:
            extra["TFLOP/s (dense-equivalent)"] = flops / seconds / 1e12
    record(benchmark, seconds, ran=ran, baseline=baseline if dense_s else None, baseline_s=dense_s, **extra)


def _group(benchmark, layer: str, s: float, batch: int) -> None:
    benchmark.group = f"sparse {layer} s={s} batch={batch} {str(DTYPE).replace('torch.', '')}"


# ----------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("layer,s,batch", CASES)
def test_sparse_dense_baseline(benchmark, layer, s, batch):
    _group(benchmark, layer, s, batch)
    c = _case(layer, s, batch)
    fn = _dense_fn(c)
    benchmark.extra_info["max |err| / max |ref|"] = _rel_error(fn(), c["ref"])
    sync()
    seconds = measure(benchmark, fn, ROUNDS, cpu_budget_s=CPU_BUDGET_S)
    if seconds:
        _DENSE_S.setdefault((layer, s, batch), seconds)
    nbytes = c["wm"].numel() * _esize() + _io_bytes(c)
    _record(benchmark, seconds, nbytes, _flops(c), ran="dense (cuDNN / cuBLAS or CPU) on W*M")
    benchmark.extra_info["density"] = SC.density_of(c["cw"])


@pytest.mark.parametrize("layer,s,batch", CASES)
def test_sparse_torch_csr(benchmark, layer, s, batch):
    _group(benchmark, layer, s, batch)
    c = _case(layer, s, batch)
    try:
        fn, wbytes = _csr_fn(c)
        out = fn()
        sync()
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch CSR matmul unsupported for {DTYPE} on {DEVICE.type}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]}")
    benchmark.extra_info["max |err| / max |ref|"] = _rel_error(out, c["ref"])
    seconds = measure(benchmark, fn, ROUNDS, cpu_budget_s=CPU_BUDGET_S)
    _record(benchmark, seconds, wbytes + _io_bytes(c), _flops(c), _dense_seconds((layer, s, batch), _dense_fn(c)),
            ran="torch CSR matmul" + (" (im2col)" if c["kind"] == "conv" else ""))


@pytest.mark.parametrize("layer,s,batch", CASES)
def test_sparse_triton(benchmark, layer, s, batch, monkeypatch):
    _group(benchmark, layer, s, batch)
    monkeypatch.setenv("KE_FAST_BACKEND", "triton")
    ops.reload_settings()  # the ops read KE_FAST_* once
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
    sync()
    if CUDA:
        seconds = measure(benchmark, fn, ROUNDS, cpu_budget_s=CPU_BUDGET_S)
    else:  # interpreter: one round
        benchmark.pedantic(fn, rounds=1, warmup_rounds=0)
        seconds = benchmark.stats.stats.mean if benchmark.stats is not None else None
        benchmark.extra_info["timer"] = "one round under the Triton interpreter"
    _record(benchmark, seconds, c["cw"].nbytes() + _io_bytes(c), _flops(c),
            _dense_seconds((layer, s, batch), _dense_fn(c)),
            ran="Triton sparse kernel" if CUDA else "Triton sparse kernel under the interpreter (not a performance figure)")
    benchmark.extra_info["compressed / dense weight bytes"] = c["cw"].nbytes() / (c["wm"].numel() * _esize())
    if not CUDA:
        benchmark.extra_info["note"] = "Triton interpreter: not a performance figure"


_TRITON_S: dict = {}  # (layer, s, batch) -> Triton op seconds measured in this run (CUDA only)


def _triton_seconds(key, c: dict) -> float | None:
    """The sparse op's seconds (CUDA; on CPU the interpreter is no contender: None)."""
    if not CUDA:
        return None
    if key not in _TRITON_S:
        before = os.environ.get("KE_FAST_BACKEND")
        os.environ["KE_FAST_BACKEND"] = "triton"
        ops.reload_settings()
        try:
            _TRITON_S[key] = device_seconds(_triton_fn(c))
        finally:
            if before is None:
                os.environ.pop("KE_FAST_BACKEND")
            else:
                os.environ["KE_FAST_BACKEND"] = before
            ops.reload_settings()
    return _TRITON_S[key]


@pytest.mark.parametrize("layer,s,batch", CASES)
def test_sparse_dispatch(benchmark, layer, s, batch):
    """The dispatcher (first call decides by timing, outside the timed region) against the faster of the dense
    and the Triton path measured in the same run: ``extra_info["vs faster path"]`` (target >= 0.97)."""
    _group(benchmark, layer, s, batch)
    c = _case(layer, s, batch)
    fn = _dispatch_fn(c)
    _check(fn(), c["ref"])
    (picked,) = _choices(fn)
    sync()
    seconds = measure(benchmark, fn, ROUNDS, cpu_budget_s=CPU_BUDGET_S)
    dense_s = _dense_seconds((layer, s, batch), _dense_fn(c))
    _record(benchmark, seconds, c["cw"].nbytes() + _io_bytes(c), _flops(c), dense_s,
            ran="dispatcher: " + ("Triton sparse kernel" if picked else "dense on the kept W*M (no sparse compute)"))
    benchmark.extra_info["dispatch"] = "triton sparse kernel" if picked else "dense on the kept W*M"
    benchmark.extra_info["rows (M)"] = c["m"]
    triton_s = _triton_seconds((layer, s, batch), c)
    if seconds:
        faster = min(t for t in (dense_s, triton_s) if t)
        benchmark.extra_info["vs faster path"] = faster / seconds
        if triton_s:
            benchmark.extra_info["triton ms (same run)"] = triton_s * 1e3


# ----------------------------------------------------------------------------------------------- skinny linears
# Few rows (batch-1 to batch-16 inference of large linears): the split-K skinny kernel against cuBLAS on W*M.
# Targets on an H100: >= 1.0x cuBLAS at density 0.5, >= 1.2x at 0.3. CUDA only for the kernel (the interpreter is
# no performance path); on CPU the dense baseline runs at rows 1 and 16.
SKINNY_SHAPES = {"linear-4096x4096": (4096, 4096), "linear-11008x4096": (11008, 4096)}  # name -> (N, K)
SKINNY_ROWS = (1, 2, 4, 8, 16) if CUDA else (1, 16)
SKINNY_DENSITIES = (0.5, 0.3)
SKINNY_CASES = [pytest.param(name, d, r, id=f"{name}-d{d}-rows{r}") for name in SKINNY_SHAPES
                for d in SKINNY_DENSITIES for r in SKINNY_ROWS]


@functools.lru_cache(maxsize=None)
def _skinny_case(name: str, density: float, rows: int) -> dict:
    n, k = SKINNY_SHAPES[name]
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    mask = torch.rand(n, k, generator=g) < density
    x = torch.randn(rows, k, generator=g)
    ref = F.linear(x, w * mask).to(DEVICE)
    return dict(kind="linear", x=x.to(DEVICE, DTYPE), wm=(w * mask).to(DEVICE, DTYPE),
                cw=SC.compress(w.to(DEVICE, DTYPE), mask.to(DEVICE)), ref=ref, m=rows, n=n, kdim=k)


@pytest.mark.parametrize("name,density,rows", SKINNY_CASES)
@pytest.mark.parametrize("which", ("dense", "skinny"))
def test_sparse_skinny_linear(benchmark, which, name, density, rows, monkeypatch):
    benchmark.group = f"skinny {name} d={density} rows={rows} {str(DTYPE).replace('torch.', '')}"
    c = _skinny_case(name, density, rows)
    if which == "skinny":
        if not CUDA:
            pytest.skip("the skinny Triton kernel is timed on CUDA only (the interpreter is no performance path)")
        monkeypatch.setenv("KE_FAST_BACKEND", "triton")
        ops.reload_settings()
        fn = _triton_fn(c)
    else:
        fn = _dense_fn(c)
    _check(fn(), c["ref"])
    sync()
    seconds = measure(benchmark, fn, ROUNDS, cpu_budget_s=CPU_BUDGET_S)
    dense_s = None if which == "dense" else _dense_seconds(("skinny", name, density, rows), _dense_fn(c))
    if which == "dense" and seconds:
        _DENSE_S.setdefault(("skinny", name, density, rows), seconds)
    wbytes = c["wm"].numel() * _esize() if which == "dense" else c["cw"].nbytes()
    _record(benchmark, seconds, wbytes + _io_bytes(c), _flops(c), dense_s, baseline="cuBLAS on W*M",
            ran="split-K skinny Triton kernel" if which == "skinny" else "dense F.linear on W*M")
    benchmark.extra_info["density"] = SC.density_of(c["cw"])
    if which == "skinny":
        benchmark.extra_info["split-K"] = SC.skinny_split(c["n"], c["cw"].bits.shape[1], DEVICE)[0]
        benchmark.extra_info["target vs cuBLAS"] = 1.0 if density == 0.5 else 1.2


# ----------------------------------------------------------------------------------------------- network
# name -> (model kind, torch.compile mode or None); "*_ro" run under torch.compile(mode="reduce-overhead",
# fullgraph=True): CUDA graphs on CUDA, plain inductor on CPU (where reduce-overhead falls back).
NET_CONTENDERS = {"sparse": ("sparse", None), "fit_only": ("fit_only", None), "dense_baked": ("baked", None),
                  "sparse_ro": ("sparse", "reduce-overhead"), "dense_baked_ro": ("baked", "reduce-overhead"),
                  "slim_ro": ("slim", "reduce-overhead"), "kels_dense_baked_ro": ("kels_baked", "reduce-overhead")}


def _baked(net: nn.Module) -> nn.Module:
    """A plain copy of a split model holding W*M (and the masked bias)."""
    baked = copy.deepcopy(net)
    with torch.no_grad():
        for _, m in ke_fast.masked_layers(baked):
            m.weight.mul_(K.unpack_mask(m.fit_mask, m.weight.shape).to(m.weight.dtype))
            if m.bias is not None:
                m.bias.mul_(K.unpack_mask(m.bias_mask, m.bias.shape).to(m.bias.dtype))
    return ke_fast.revert(baked)


def _net_input() -> torch.Tensor:
    side = 224 if CUDA else 64
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(SEED)).to(DEVICE, DTYPE)
    return x.contiguous(memory_format=torch.channels_last) if CUDA else x


def _cl(model: nn.Module) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if CUDA else model


@functools.lru_cache(maxsize=None)
def _networks():
    """Eval-mode ResNet-18s (1000 classes): {"fit_only": split WELS 0.5, "sparse": its extract_sparse copy,
    "baked": a plain one holding W*M, "slim": extract_slim of a KELS 0.5 split, "kels_baked": that split's
    W*M}, and the input."""
    torch.manual_seed(SEED)
    net = resnet18(num_classes=1000)
    ke_fast.split(net, "wels", 0.5, seed=SEED)
    net = net.to(DEVICE, DTYPE).eval()
    sparse = ke_fast.extract_sparse(net).eval()
    torch.manual_seed(SEED)
    kels = resnet18(num_classes=1000)
    ke_fast.split(kels, "kels", 0.5, seed=SEED)
    kels = kels.to(DEVICE, DTYPE).eval()
    models = {"fit_only": _cl(net), "sparse": _cl(sparse), "baked": _cl(_baked(net)),
              "slim": _cl(ke_fast.extract_slim(kels).eval()), "kels_baked": _cl(_baked(kels)), "kels": kels}
    return models, _net_input()


@functools.lru_cache(maxsize=None)
def _net_fn(which: str):
    models, x = _networks()
    kind, mode = NET_CONTENDERS[which]
    model = models[kind]
    if kind == "fit_only":
        def fit():
            with ke_fast.fit_only(model):
                return model(x)

        return fit
    if kind == "sparse":
        with torch.no_grad():
            model(x)  # eager warm-up: the dispatcher decides every layer before any tracing
    if mode is None:
        return lambda: model(x)
    compiled = torch.compile(model, mode=mode, fullgraph=True)

    def run():
        return compiled(x).clone()  # CUDA graphs reuse their output buffer: keep this call's result

    return run


def _reference_of(which: str) -> torch.Tensor:
    """The fit-only output of the split model a contender was extracted from."""
    models, x = _networks()
    split = models["kels" if NET_CONTENDERS[which][0] in ("slim", "kels_baked") else "fit_only"]
    with ke_fast.fit_only(split):
        return split(x).float()


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("which", list(NET_CONTENDERS))
def test_sparse_network(benchmark, which):
    """ResNet-18 fit networks at batch 1. ``extra_info["vs plain W*M model, same mode"]``: the plain model holding
    W*M (its KELS split's for slim) under the same compile mode, divided by this contender's time (targets on an
    H100: sparse >= 1.0)."""
    models, x = _networks()
    kind, mode = NET_CONTENDERS[which]
    benchmark.group = f"resnet18 fit network batch 1 {tuple(x.shape[1:])} {str(DTYPE).replace('torch.', '')}"
    with torch.no_grad():
        ref = _reference_of(which)
        fn = _net_fn(which)
        for _ in range(3):  # compiles, records the CUDA graph
            out = fn().float()
        sync()
        scale = ref.abs().max().item() or 1.0
        tol = 5e-2 if DTYPE == torch.bfloat16 else 1e-4
        assert (out - ref).abs().max().item() <= tol * scale, f"{which} output differs from fit-only"
        seconds = measure(benchmark, fn, NET_ROUNDS, cpu_budget_s=CPU_BUDGET_S)
        plain = {"sparse": "dense_baked", "fit_only": "dense_baked", "dense_baked": None, "sparse_ro": "dense_baked_ro",
                 "dense_baked_ro": None, "slim_ro": "kels_dense_baked_ro", "kels_dense_baked_ro": None}[which]
        plain_s = _dense_seconds(("net", plain), _net_fn(plain)) if plain else None
        if plain is None and seconds:
            _DENSE_S.setdefault(("net", which), seconds)
    ran = {"fit_only": "split dense model under ke_fast.fit_only (W*M cached)", "baked": "plain model holding W*M",
           "slim": "extract_slim of a KELS 0.5 split", "kels_baked": "plain model holding the KELS split's W*M"}.get(kind)
    if kind == "sparse":
        picked = _choices(lambda: models["sparse"](x))
        benchmark.extra_info["layers on triton kernel"] = f"{sum(picked)} of {len(picked)}"
        ran = (f"extract_sparse: the Triton sparse kernel in {sum(picked)} of {len(picked)} layers, the others dense "
               "on their kept W*M" + (" (no sparse compute at all: the time is that of pre-multiplied dense weights)"
                                      if not any(picked) else ""))
    _record(benchmark, seconds, None, None, plain_s, ran=ran + (f", torch.compile mode={mode!r}" if mode else ""),
            baseline="plain model holding W*M, same compile mode")
    benchmark.extra_info["compile mode"] = mode or "eager"
    if plain_s and seconds:
        benchmark.extra_info["vs plain W*M model, same mode"] = plain_s / seconds
    benchmark.extra_info["weight bytes"] = _weight_bytes(models[kind])
