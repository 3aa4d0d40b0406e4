"""The dispatcher's determinism policy (``ke_fast.dispatch``, module docstring): its dense path computes as the
sparse kernel does (TF32 and reduced-precision reductions off around it, when timed and when run, restored
after); sparse and dense results, and one sample at batch 16 and 17, differ by at most ``dispatch.tolerance``
times sum|x w| + |b|; the timed choice follows the faster path under a fake clock through the real timing code.

The sparse path runs the Triton kernels (under the interpreter on a CPU host); the dense path torch's kernels."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ke_fast import dispatch, ops
from ke_fast.kernels import compressed as kformat

from conftest import DEVICE, HAS_CUDA, INTERPRETING

TRITON_DEVICE = torch.device(DEVICE)
needs_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRETING), reason="Triton needs CUDA or TRITON_INTERPRET=1")
DENSE_OPS = ("aten.convolution", "aten.mm", "aten.addmm", "aten.bmm")
FLAGS = {("conv2d", torch.float32): (torch.backends.cudnn, "allow_tf32"),
         ("linear", torch.float32): (torch.backends.cuda.matmul, "allow_tf32"),
         ("linear", torch.float16): (torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction"),
         ("linear", torch.bfloat16): (torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction")}


def _mode(env: str, monkeypatch) -> None:
    monkeypatch.setenv("KE_FAST_BACKEND", "triton" if (HAS_CUDA or INTERPRETING) else "reference")
    monkeypatch.setenv("KE_FAST_SPARSE", env)
    ops.reload_settings()
    dispatch.clear_sparse_decisions()


@pytest.fixture(autouse=True)
def _fresh():
    yield
    dispatch.clear_sparse_decisions()


@pytest.fixture
def loose_flags():
    """Every flag the policy switches off set to True (TF32 / reduced precision allowed), restored after."""
    saved = {key: getattr(holder, name) for key, (holder, name) in FLAGS.items()}
    for holder, name in FLAGS.values():
        setattr(holder, name, True)
    yield
    for key, (holder, name) in FLAGS.items():
        setattr(holder, name, saved[key])


class _FlagsSeen(TorchDispatchMode):
    """Records, for every dense conv / matmul, the value of one flag at the moment it runs."""

    def __init__(self, holder, name):
        super().__init__()
        self.holder, self.name, self.seen = holder, name, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in DENSE_OPS:
            self.seen.append(getattr(self.holder, self.name))
        return func(*args, **(kwargs or {}))


def _linear(k=300, n=40, rows=17, dtype=torch.float32, seed=0, bias=True, device=TRITON_DEVICE):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    m = torch.rand(n, k, generator=g) < 0.5
    x = torch.randn(rows, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    scale = F.linear(x.double().abs(), (w * m).double().abs(), None if b is None else b.double().abs())
    put = lambda t: None if t is None else t.to(device)  # noqa: E731
    return put(x), kformat.compress(w.to(device), m.to(device)), put(b), scale.to(device), k


def _conv(batch=17, c=37, n=8, dtype=torch.float32, seed=1, device=TRITON_DEVICE):
    """A 3x3 conv on 3x3 inputs without padding: one output pixel per sample, so GEMM rows = batch."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, c, 3, 3, generator=g) / (9 * c) ** 0.5).to(dtype)
    m = torch.rand(w.shape, generator=g) < 0.5
    x = torch.randn(batch, c, 3, 3, generator=g).to(dtype)
    scale = F.conv2d(x.double().abs(), (w * m).double().abs())
    return x.to(device), kformat.compress(w.to(device), m.to(device)), None, scale.to(device), 9 * c


def _run(op, x, cw, b):
    with torch.no_grad():
        return (dispatch.sparse_linear(x, cw, b) if op == "linear" else dispatch.sparse_conv2d(x, cw, b)).double()


def _within(a, b, scale, dtype, k):
    """max |a - b| / (tolerance * scale): at most 1 where the policy's bound holds."""
    return ((a - b).abs() / (dispatch.tolerance(dtype, k) * scale)).max().item()


# ---- 1. the dense path computes without TF32 / reduced-precision reductions ---------------------------

@pytest.mark.parametrize("op,dtype", list(FLAGS), ids=[f"{o}-{str(d)[6:]}" for o, d in FLAGS])
def test_dense_path_runs_with_the_loose_flag_off_and_restores_it(op, dtype, loose_flags, monkeypatch):
    _mode("off", monkeypatch)  # every call dense
    holder, name = FLAGS[op, dtype]
    x, cw, b, _, _ = _linear(dtype=dtype, device="cpu") if op == "linear" else _conv(dtype=dtype, device="cpu")
    with _FlagsSeen(holder, name) as mode:
        _run(op, x, cw, b)
    assert mode.seen == [False] and getattr(holder, name) is True


def test_dense_path_leaves_strict_flags_alone(monkeypatch):
    _mode("off", monkeypatch)
    holder, name = FLAGS["conv2d", torch.float32]
    before = getattr(holder, name)
    setattr(holder, name, False)
    try:
        x, cw, b, _, _ = _conv(device="cpu")
        with _FlagsSeen(holder, name) as mode:
            _run("conv2d", x, cw, b)
        assert mode.seen == [False] and getattr(holder, name) is False
    finally:
        setattr(holder, name, before)


@needs_triton
def test_timed_dense_path_is_the_exact_one(loose_flags, monkeypatch):
    """In auto mode the real timing runs the dense path 6 times (warm-up + 5): every run without TF32."""
    if HAS_CUDA:
        pytest.skip("on CUDA the timing is triton.testing.do_bench, whose CUDA graphs / events a dispatch mode "
                    "does not see; the CPU host checks the same code path")
    _mode("auto", monkeypatch)
    x, cw, b, _, _ = _conv()
    with _FlagsSeen(torch.backends.cudnn, "allow_tf32") as mode:
        _run("conv2d", x, cw, b)
    (choice,) = dispatch.sparse_decisions().values()
    assert len(mode.seen) == 6 + (choice == "dense") and not any(mode.seen)


# ---- 2. the bound: sparse vs dense, and one sample at batch 16 vs 17 -----------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op,rows", [("linear", 1), ("linear", 16), ("linear", 17), ("conv2d", 17)])
def test_sparse_and_dense_agree_within_the_tolerance(op, rows, dtype, monkeypatch):
    x, cw, b, scale, k = _linear(rows=rows, dtype=dtype) if op == "linear" else _conv(batch=rows, dtype=dtype)
    _mode("on", monkeypatch)
    sparse = _run(op, x, cw, b)
    _mode("off", monkeypatch)
    dense = _run(op, x, cw, b)
    assert _within(sparse, dense, scale, dtype, k) <= 1.0


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_one_sample_at_batch_16_and_17(op, dtype, monkeypatch):
    """The sparse kernel switches from the split-K skinny kernel (<= 16 rows) to the tiled one: the first 16
    samples' outputs may change, within the bound (measured ~5e-8 relative in fp32, equal in fp16 / bf16)."""
    x, cw, b, scale, k = _linear(rows=17, dtype=dtype) if op == "linear" else _conv(batch=17, dtype=dtype)
    _mode("on", monkeypatch)
    at17 = _run(op, x, cw, b)[:16]
    at16 = _run(op, x[:16], cw, b)
    assert _within(at17, at16, scale[:16], dtype, k) <= 1.0
    at1 = _run(op, x[:1], cw, b)  # the one-row FMA reduction (linear) / skinny (conv)
    assert _within(at17[:1], at1, scale[:1], dtype, k) <= 1.0


def test_tolerance_formula():
    assert dispatch.tolerance(torch.float32, 300) == 300 * 2.0 ** -23 + 2 * 2.0 ** -24
    assert dispatch.tolerance(torch.bfloat16, 1) == 2.0 ** -23 + 2 * 2.0 ** -8
    assert dispatch.tolerance(torch.float16, 64) > dispatch.tolerance(torch.float16, 32)


# ---- 3. the timed choice, under a fake clock, through the real timing code -----------------------------

class _FakeCosts(TorchDispatchMode):
    """Advances a fake clock by ``costs["sparse"]`` per sparse op call and ``costs["dense"]`` per dense
    conv / matmul, so the real ``path_seconds`` measures exactly those costs."""

    def __init__(self, costs):
        super().__init__()
        self.costs, self.now = costs, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("ke_fast.sparse_"):
            self.now += self.costs["sparse"]
        elif name in DENSE_OPS:
            self.now += self.costs["dense"]
        return func(*args, **(kwargs or {}))


@needs_triton
@pytest.mark.parametrize("op", ["linear", "conv2d"])
@pytest.mark.parametrize("faster", ["sparse", "dense"])
def test_timed_choice_follows_the_faster_fake_clock(op, faster, monkeypatch):
    if HAS_CUDA:
        pytest.skip("on CUDA path_seconds times with triton.testing.do_bench (CUDA events), not the host clock "
                    "this test fakes; test_sparse_dispatch.py's fake_timer covers the cache there")
    _mode("auto", monkeypatch)
    costs = {"sparse": 1e-3, "dense": 3e-3} if faster == "sparse" else {"sparse": 3e-3, "dense": 1e-3}
    mode = _FakeCosts(costs)
    monkeypatch.setattr(dispatch, "_clock", lambda: mode.now)
    x, cw, b, _, _ = _linear(rows=5) if op == "linear" else _conv(batch=5)
    with mode:
        out = _run(op, x, cw, b)
    assert list(dispatch.sparse_decisions().values()) == [faster]
    spent = mode.now
    with mode:
        again = _run(op, x, cw, b)  # cached: one call of the chosen path, nothing timed
    assert mode.now - spent == pytest.approx(costs[faster]) and torch.equal(out, again)
