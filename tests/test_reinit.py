"""Fused reset (ReinitPlan -> ke_fast::reset_entries_): fit entries untouched, reset entries from the scheme,
identical on every (implementation, device) pair the host runs."""
import math
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

import ke_fast.kernels as K
from ke_fast import ReinitPlan, wels_mask_bits
from ke_fast.kernels import reference as R
from ke_fast.kernels.rng import philox_group, select4, uniform_pm1
from ke_fast.ops import reload_settings

from conftest import DEVICE, DTYPES, PAIRS, Impl, ulp_distance

UNIFORM = ("kaiming_uniform_a_sqrt5", "kaiming_uniform", "xavier_uniform")
NORMAL = ("kaiming_normal", "xavier_normal")


def reset_(weights, masks, *, seed, generation, purpose="reset", **kw):
    """One-shot reset: a plan built and run once."""
    ReinitPlan(weights, masks, seed=seed, **kw).run(generation, purpose)


def make_layers(dtype, device=DEVICE, mode="wels"):
    """Odd shapes: a linear 5x123, a conv 17x3x3x3, a 31x33 linear, a bias of 17 and a 1x1 tensor."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 123), (17, 3, 3, 3), (31, 33), (17,), (1, 1)]
    ws = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
    if mode == "wels":
        ms = [wels_mask_bits(s, 0.5, seed=1, stream=K.layer_stream(0, i), device=device) for i, s in enumerate(shapes)]
    else:
        ms = [K.kels_mask_bits(s, 0.5, device=device) for s in shapes]
    fans = [None, None, None, (27, 153), None]
    return ws, ms, fans


def run(impl, dtype, init, monkeypatch, mode="wels", generation=2):
    monkeypatch.setenv("KE_FAST_BACKEND", impl.name)
    reload_settings()
    ws, ms, fans = make_layers(dtype, device=impl.device, mode=mode)
    before = [w.clone() for w in ws]
    reset_(ws, ms, seed=5, generation=generation, init=init, fans=fans)
    return before, ws, ms


# interpreter: every scheme in fp32 for KELS, and a pairwise third of (scheme, dtype) for each mode (WELS
# values under the interpreter equal the reference's bit for bit or within 2 ulp for every scheme and dtype:
# test_implementations_agree)
@pytest.mark.interpreter_sample(keep=lambda p: (p["mode"] == "kels" and p["dtype"] == torch.float32)
                                or (K.SCHEMES.index(p["init"]) + DTYPES.index(p["dtype"])) % 3 == 0)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", K.SCHEMES)
@pytest.mark.parametrize("mode", ["wels", "kels"])
def test_fit_kept_reset_in_support(impl, dtype, init, mode, monkeypatch):
    before, after, masks = run(impl, dtype, init, monkeypatch, mode)
    for w0, w1, m in zip(before, after, masks):
        w0, w1, m = w0.cpu(), w1.cpu(), m.cpu()
        fit = K.unpack_mask(m, w0.shape)
        # fit entries keep their exact bits
        assert torch.equal(w1[fit].view(torch.int16 if dtype != torch.float32 else torch.int32),
                           w0[fit].view(torch.int16 if dtype != torch.float32 else torch.int32))
        fan_in = K.fans_of(w0.shape)[0] if w0.dim() > 1 else 27
        reset = w1[~fit].float()
        if init == "zeros":
            assert (reset == 0).all()
        elif init in UNIFORM or w0.dim() == 1:
            _, bound = K.scheme_params(init, fan_in, K.fans_of(w0.shape)[1] if w0.dim() > 1 else 153,
                                       bias=w0.dim() == 1)
            assert (reset.abs() <= bound * (1 + 2 ** -7)).all()
        else:
            assert torch.isfinite(reset).all() and (reset.abs() < 10 * math.sqrt(2 / fan_in)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", K.SCHEMES)
def test_implementations_agree(dtype, init, monkeypatch):
    """Every pair the host runs (Triton on the GPU or the interpreter, C++, reference) gives the reference's
    values on the CPU: bit-exact for uniform/zeros, <= 2 ulp normal."""
    want = run(Impl("reference", "cpu"), dtype, init, monkeypatch)[1]
    for pair in PAIRS:
        got = run(Impl(*pair), dtype, init, monkeypatch)[1]
        be = "-".join(pair)
        for a, b in zip(got, want):
            a, b = a.cpu(), b.cpu()
            if init in NORMAL and dtype == torch.float32 and a.dim() > 1:
                assert ulp_distance(a, b).max() <= 2
            elif init in NORMAL and a.dim() > 1:
                assert (a.float() - b.float()).abs().max() <= (b.float().abs() * 2 ** -7).max()
            else:
                assert torch.equal(a, b), f"{be} differs from the reference"


def test_kolmogorov_smirnov(impl):
    # the interpreter runs each Triton program in Python: 2,000 draws there (the kernel's values equal the
    # reference's bit for bit or within 2 ulp, test_implementations_agree; the 40,000-draw KS runs on those)
    n = 40_000 if impl.device == "cuda" or impl.name != "triton" else 2_000
    fan_in = 100
    fan_out = n // fan_in
    xb = math.sqrt(6 / (fan_in + fan_out))
    for init, dist in [("kaiming_uniform_a_sqrt5", stats.uniform(-0.1, 0.2)),
                       ("kaiming_normal", stats.norm(0, math.sqrt(2 / fan_in))),
                       ("xavier_uniform", stats.uniform(-xb, 2 * xb)),
                       ("xavier_normal", stats.norm(0, math.sqrt(2 / (fan_in + fan_out))))]:
        w = torch.zeros(fan_out, fan_in, device=impl.device)
        reset_([w], [torch.zeros_like(w, dtype=torch.bool)], seed=3, generation=1, init=init)
        p = stats.kstest(w.flatten().cpu().double().numpy(), dist.cdf).pvalue
        assert p > 1e-3, f"{init}: KS p-value {p}"


def test_same_result_across_orders_and_groupings(impl):
    ws, ms, fans = make_layers(torch.float32, device=impl.device)
    ids = list(range(len(ws)))
    a = [w.clone() for w in ws]
    reset_(a, ms, seed=9, generation=1, fans=fans)
    order = ids[::-1]
    b = [ws[i].clone() for i in order]
    reset_(b, [ms[i] for i in order], seed=9, generation=1, fans=[fans[i] for i in order], layer_ids=order)
    for i, j in enumerate(order):
        assert torch.equal(b[i], a[j])
    # one launch per tensor gives the same values as the fused launch
    for i in ids:
        c = ws[i].clone()
        reset_([c], [ms[i]], seed=9, generation=1, fans=[fans[i]], layer_ids=[i])
        assert torch.equal(c, a[i])
    # a mixed-dtype list: one launch per dtype, same values as separate calls
    mixed = [a[0].clone(), ws[1].clone().half()]
    reset_(mixed, ms[:2], seed=9, generation=1)
    half = ws[1].clone().half()
    reset_([half], [ms[1]], seed=9, generation=1, layer_ids=[1])
    assert torch.equal(mixed[1], half)


def test_generations_and_seeds_differ():
    w = torch.zeros(64, 64)
    m = torch.zeros(64, 64, dtype=torch.bool)
    outs = []
    for seed, gen in [(1, 1), (1, 2), (2, 1)]:
        x = w.clone()
        reset_([x], [m], seed=seed, generation=gen)
        outs.append(x)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    x = w.clone()
    reset_([x], [m], seed=1, generation=1, purpose="init")
    assert not torch.equal(x, outs[0])


@pytest.mark.parametrize("form", ["packed", "bool", "uint8", "float32", "float16"])
def test_mask_forms_agree(form):
    ws, ms, fans = make_layers(torch.float32)
    ref = [w.clone() for w in ws]
    reset_(ref, ms, seed=4, generation=3, fans=fans)
    dense = [K.unpack_mask(m, w.shape) for m, w in zip(ms, ws)]
    given = {"packed": ms, "bool": dense}.get(form) or [d.to(getattr(torch, form)) for d in dense]
    got = [w.clone() for w in ws]
    reset_(got, given, seed=4, generation=3, fans=fans)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_all_fit_untouched_all_reset_rewritten(impl):
    w = torch.randn(7, 45, device=impl.device)
    keep = w.clone()
    reset_([w], [torch.ones_like(w)], seed=0, generation=1)
    assert torch.equal(w, keep)
    reset_([w], [torch.zeros_like(w)], seed=0, generation=1)
    assert (w != keep).all()


def test_indices_beyond_2_31_match_reference():
    """The counter is the int64 element index: the C++ path and the reference agree past 2^31."""
    from ke_fast.kernels import backend

    ext = backend.cpu_extension()
    assert ext is not None, "the C++ CPU extension must build on this machine (gcc + ninja)"
    start = (1 << 33) + 5
    idx = torch.arange(start, start + 1000, dtype=torch.int64)
    for kind in (R.KIND_UNIFORM, R.KIND_NORMAL):
        want = R.draw(start, 1000, 123, 456, kind, 0.5)
        got = ext.draw_at(idx, 123, 456, kind, 0.5)
        if kind == R.KIND_UNIFORM:
            assert torch.equal(got, want)
        else:
            assert ulp_distance(got, want).max() <= 2


@triton.jit
def _probe_kernel(out, idx_ptr, seed, stream, N: tl.constexpr):
    i = tl.load(idx_ptr + tl.arange(0, N))
    r0, r1, r2, r3 = philox_group(seed, i >> 2, stream)
    tl.store(out + tl.arange(0, N), uniform_pm1(select4(i & 3, r0, r1, r2, r3)))


def test_triton_index_arithmetic_beyond_2_31():
    """The Triton Philox helper gives the reference's draws for int64 indices past 2^31."""
    start = (1 << 34) + 3
    idx = torch.arange(start, start + 64, dtype=torch.int64, device=DEVICE)
    out = torch.empty(64, device=DEVICE)
    _probe_kernel[(1,)](out, idx, 77, 88, N=64)
    assert torch.equal(out.cpu(), R.draw(start, 64, 77, 88, R.KIND_UNIFORM, 1.0))


# ---- bad input: clear error naming the argument, nothing written -------------------------------

def _bad_cases():
    w = lambda *s: torch.randn(*s)  # noqa: E731
    return {
        "mask shape": (lambda: ([w(4, 5), w(3, 3)], [torch.ones(4, 5), torch.ones(3, 4)], {}), ValueError, "masks\\[1\\]"),
        "mask dtype": (lambda: ([w(4, 5)], [torch.ones(4, 5, dtype=torch.int64)], {}), TypeError, "masks\\[0\\]"),
        "mask values": (lambda: ([w(4, 5)], [torch.full((4, 5), 0.5)], {}), ValueError, "0 and 1"),
        "packed length": (lambda: ([w(4, 50)], [torch.zeros(3, dtype=torch.int32)], {}), ValueError, "packed words"),
        "unknown scheme": (lambda: ([w(4, 5)], [torch.ones(4, 5)], {"init": "he"}), ValueError, "init"),
        "non-contiguous": (lambda: ([w(4, 5), w(5, 4).t()], [torch.ones(4, 5), torch.ones(4, 5)], {}), ValueError,
                           "weights\\[1\\].*contiguous"),
        "devices": (lambda: ([w(4, 5), torch.empty(4, 5, device="meta")], [torch.ones(4, 5)] * 2, {}), ValueError,
                    "device"),
        "mask device": (lambda: ([w(4, 5)], [torch.ones(4, 5, device="meta")], {}), ValueError, "masks\\[0\\]"),
        "empty": (lambda: ([], [], {}), ValueError, "weights"),
        "count": (lambda: ([w(4, 5)], [], {}), ValueError, "masks"),
        "weight dtype": (lambda: ([w(4, 5), w(4, 5).to(torch.int32)], [torch.ones(4, 5)] * 2, {}), TypeError, "weights\\[1\\]"),
        "bias without fans": (lambda: ([w(4, 5), w(4)], [torch.ones(4, 5), torch.zeros(4)], {}), ValueError, "fans\\[1\\]"),
        "generation": (lambda: ([w(4, 5)], [torch.ones(4, 5)], {"generation": -1}), ValueError, "generation"),
        "seed": (lambda: ([w(4, 5)], [torch.ones(4, 5)], {"seed": 2 ** 64}), ValueError, "seed"),
        "fan mode": (lambda: ([w(4, 5)], [torch.ones(4, 5)], {"fan_mode": "both"}), ValueError, "fan_mode"),
        "layer ids": (lambda: ([w(4, 5)], [torch.ones(4, 5)], {"layer_ids": [0, 1]}), ValueError, "layer_ids"),
        "single tensor": (lambda: (w(4, 5), [torch.ones(4, 5)], {}), TypeError, "weights"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_before_writing(case):
    make, exc, pattern = _bad_cases()[case]
    weights, masks, kw = make()
    # the first weight is valid and all-reset: a half-done call would have changed it
    weights = list(weights) if isinstance(weights, list) else weights
    snapshot = [x.clone() for x in weights if x.device.type == "cpu"] if isinstance(weights, list) else []
    if isinstance(masks, list) and masks and masks[0].dtype != torch.int32 and masks[0].device.type == "cpu" \
            and case not in ("mask values", "mask dtype"):
        masks = [torch.zeros_like(masks[0])] + list(masks[1:])
    kw = {"seed": 0, "generation": 1, **kw}
    with pytest.raises(exc, match=pattern):
        reset_(weights, masks, **kw)
    for before, after in zip(snapshot, [x for x in weights if x.device.type == "cpu"]):
        assert torch.equal(before, after)


def test_unknown_backend_env(monkeypatch):
    monkeypatch.setenv("KE_FAST_BACKEND", "fpga")
    reload_settings()
    w = torch.ones(4, 4)
    with pytest.raises(ValueError, match="KE_FAST_BACKEND"):
        reset_([w], [torch.zeros(4, 4)], seed=0, generation=1)
    assert (w == 1).all()


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    code = ("import os, torch; os.environ['KE_FAST_BACKEND'] = 'triton'\n"
            "import ke_fast\n"
            "try:\n    ke_fast.ReinitPlan([torch.zeros(4, 4)], [torch.zeros(4, 4)], seed=0).run(1)\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=900)  # a bound for a hang only: importing torch takes minutes under load
    assert "ERR" in out.stdout and "TRITON_INTERPRET" in out.stdout, out.stdout + out.stderr


def test_tensor_beyond_2_31_elements_cpu_path(monkeypatch):
    """A real fp16 tensor of 2^31 + 100 elements (4 GiB, pages touched only where written): the C++
    path resets the words around element 2^31 and the tail with the reference's values, and skips
    the all-fit words elsewhere (so this runs in a second)."""
    monkeypatch.setenv("KE_FAST_BACKEND", "cpp")
    reload_settings()
    n = (1 << 31) + 100
    w = torch.empty(n, dtype=torch.float16)
    words = torch.full((K.num_words(n),), -1, dtype=torch.int32)  # all fit
    lo = (1 << 31) // 32 - 2  # words straddling element 2^31, and the tail word
    words[lo:lo + 4] = 0
    words[-1] = 0
    w[lo * 32:(lo + 4) * 32] = 7.0
    reset_([w], [words], seed=3, generation=1, fans=[(100, 100)], layer_ids=[0])
    stream = K.stream_id(K.PURPOSE_RESET, 1, 0)
    for start, count in [(lo * 32, 128), ((K.num_words(n) - 1) * 32, n - (K.num_words(n) - 1) * 32)]:
        want = R.draw(start, count, 3, stream, R.KIND_UNIFORM, 0.1).to(torch.float16)  # bias: 1/sqrt(100)
        assert torch.equal(w[start:start + count], want)


def test_plan_runs_equal_one_shot_calls(impl):
    ws, ms, fans = make_layers(torch.float32, device=impl.device)
    a = [w.clone() for w in ws]
    b = [w.clone() for w in ws]
    plan = ReinitPlan(a, ms, seed=4, fans=fans)
    for gen in (1, 2):
        plan.run(gen)
        reset_(b, ms, seed=4, generation=gen, fans=fans)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="generation"):
        plan.run(-1)
