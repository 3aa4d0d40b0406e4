"""Numerics a GPU sees and the interpreter hides: rounding of every fp32 bit pattern, one device per call, integer
edges (counts near 2^31, empty tensors, K = 0) and kernels that compile once for every generation.

Rounding tests build fp32 inputs from int32 bit patterns (``.view(torch.float32)``), among them the NaN a GPU
produces (0x7FFFFFFF), and compare bit for bit with torch's own ``.to(dtype)`` on the CPU. NaN payloads are not
part of the contract (torch's CPU cast gives 0xFFFF for every NaN, a GPU's cvt 0x7FFF): a NaN must give a NaN,
every other input exactly torch's bits.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import ke_fast
from ke_fast import ops
from ke_fast.kernels import bitmask, masked, reference
from ke_fast.kernels import sparse_conv as sc
from ke_fast.kernels.rng import cast_rtne

from conftest import DEVICE, HAS_CUDA, INTERPRETING, PAIRS, Impl

HALF = (torch.bfloat16, torch.float16)
# overflow to Inf is what several cases check; numpy warns about it under the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
SPARSE_PAIRS = [p for p in PAIRS if p[0] != "cpp"]


# ---- the bit patterns ------------------------------------------------------------------------------

def _u32(values) -> torch.Tensor:
    """fp32 tensor from unsigned 32-bit patterns."""
    v = torch.tensor([int(x) & 0xFFFFFFFF for x in values], dtype=torch.int64)
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32).view(torch.float32)


def patterns(seed: int = 0) -> torch.Tensor:
    """About 4,000 fp32 inputs covering every class a cast can meet, both signs of each."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n, lo, hi: torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64).tolist()  # noqa: E731
    pos = [
        0x00000000, 0x7F800000,  # zero, infinity
        # NaN classes: a GPU's (all payload bits), quiet canonical, signalling, payloads only in the low half
        # (the bits a bf16 rounding adds to), only in the high half, and the ones that carry into the exponent
        0x7FFFFFFF, 0x7FC00000, 0x7FC00001, 0x7F800001, 0x7FBFFFFF, 0x7F807FFF, 0x7F808000, 0x7F80FFFF,
        0x7FFF0000, 0x7FFF7FFF, 0x7FFF8000, 0x7FFFC000, 0x7FA00000,
        # subnormals: min, max, bf16 ties and their neighbours, fp16-underflow region
        0x00000001, 0x007FFFFF, 0x00400000, 0x00008000, 0x00018000, 0x00007FFF, 0x00008001, 0x0000FFFF, 0x00010000,
        # min normal, fp32 max and the values around the top bf16 / fp16 ties
        0x00800000, 0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x7F7EFFFF, 0x7F7E8000,
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,  # 65504, below / at / above the fp16 overflow tie
        0x33000000, 0x33000001, 0x32FFFFFF, 0x33800000, 0x387FC000, 0x387FE000, 0x38800000,  # fp16 subnormal edges
        0x3F800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # 1.0 and its bf16 ties (even / odd below)
    ]
    pos += [0x7F800000 | p for p in rnd(100, 1, 1 << 23)]  # random NaN payloads
    for hi in rnd(400, 0, 0x7F80):  # bf16: just below, on and above the tie of a random upper half, even and odd
        pos += [(hi << 16) | low for low in (0x7FFF, 0x8000, 0x8001)]
    for m in rnd(250, 0, 1 << 10):  # fp16: ties in the normal range (13 bits dropped) and the subnormal range
        for e in (0x38800000, 0x3F800000, 0x46800000, 0x33800000, 0x37000000):
            base = e | (m << 13)
            pos += [base | 0x1000, base | 0x0FFF, base | 0x1001]
    pos += rnd(1500, 0, 1 << 32)  # random bits: every class in proportion
    return _u32(pos + [p | 0x80000000 for p in pos])


def assert_same_cast(got: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
    """``got`` is torch's ``x.to(dtype)`` bit for bit, except that a NaN only needs to be a NaN."""
    want = x.cpu().to(dtype)
    got = got.cpu()
    assert got.dtype == dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"NaN lost or made at inputs {_hex(x.cpu()[torch.isnan(got) != nan])}"
    ibits = torch.int16 if dtype != torch.float32 else torch.int32
    bad = (got.view(ibits) != want.view(ibits)) & ~nan
    assert not bad.any(), (f"{int(bad.sum())} of {x.numel()} differ from torch's cast, e.g. inputs "
                           f"{_hex(x.cpu()[bad][:6])} -> {got[bad][:6].tolist()} instead of {want[bad][:6].tolist()}")


def _hex(x: torch.Tensor) -> list[str]:
    return [hex(v & 0xFFFFFFFF) for v in x.contiguous().view(torch.int32).tolist()]


# ---- cast_rtne itself, and what the test would catch -------------------------------------------------

@triton.jit
def _cast_kernel(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, cast_rtne(x, out_ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _old_bf16_kernel(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
    """The hand rounding before the NaN fix (``b + 0x7FFF + lsb``): kept to show the patterns catch it."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(x_ptr + offs, mask=offs < n).to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    tl.store(out_ptr + offs, (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=offs < n)


@triton.jit
def _plain_bf16_kernel(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.bfloat16), mask=offs < n)


def _launch(kernel, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(DEVICE)
    out = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    kernel[(triton.cdiv(x.numel(), 1024),)](out, x, x.numel(), BLOCK=1024)
    return out


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cast_rtne_is_torchs_cast_for_every_pattern(dtype):
    """The kernels' one rounding helper on every class of fp32 input (on the GPU, or the interpreter's numpy)."""
    x = patterns()
    assert_same_cast(_launch(_cast_kernel, x, dtype), x, dtype)


def test_cast_rtne_nan_keeps_its_sign():
    """The hand-rounded bf16 NaN is a quiet NaN of the input's sign (the documented choice)."""
    x = _u32([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000])
    out = _launch(_cast_kernel, x, torch.bfloat16).cpu()
    assert torch.isnan(out).all()
    assert torch.equal(torch.signbit(out), torch.signbit(x))


def test_patterns_catch_the_old_rounding():
    """The old hand rounding turned a GPU's NaN (0x7FFFFFFF) into -0 and a NaN with low payload bits into Inf:
    the same check fails on it, so the check above is able to fail."""
    x = patterns()
    out = _launch(_old_bf16_kernel, x, torch.bfloat16).cpu()
    assert out[x.view(torch.int32) == 0x7FFFFFFF].view(torch.int16)[0].item() == -32768  # 0x8000: -0.0
    with pytest.raises(AssertionError, match="NaN lost"):
        assert_same_cast(out, x, torch.bfloat16)


@pytest.mark.skipif(not INTERPRETING, reason="on a GPU a plain .to(tl.bfloat16) is a correct cvt.rn")
def test_interpreter_plain_cast_truncates_so_the_hand_rounding_is_what_passed():
    """Under the interpreter a plain ``.to(tl.bfloat16)`` truncates: the kernels' passing results above come from
    the hand-rounding path, not from numpy."""
    x = patterns()
    x = x[~torch.isnan(x)]  # (it also turns NaNs with only low payload bits into Inf)
    with pytest.raises(AssertionError, match="differ from torch's cast"):
        assert_same_cast(_launch(_plain_bf16_kernel, x, torch.bfloat16), x, torch.bfloat16)


# ---- the ops that round: every implementation --------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("src", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_masked_weight_rounds_every_pattern_like_torch(impl, src, dtype):
    """ke_fast::masked_weight (all bits kept) is torch's cast of every pattern, on every implementation; fp16 and
    bf16 weights hold the patterns as torch casts them (a GPU's fp16 NaN 0x7FFF included)."""
    x = patterns(1).to(src).to(impl.device)
    words = bitmask.pack_mask(torch.ones(x.numel(), dtype=torch.bool)).to(impl.device)
    assert_same_cast(ops.masked_weight(x, words, dtype), x, dtype)


def test_masked_weights_round_every_pattern_like_torch(impl):
    """The multi-tensor kernel (one launch, a table of offsets) rounds like torch, per tensor."""
    x = patterns(2).to(impl.device)
    a, b = x[:1001].clone(), x[1001:1001 + 7 * 1500].view(1500, 7)[:, :5].contiguous()
    words = [bitmask.pack_mask(torch.ones(t.shape, dtype=torch.bool)).to(impl.device) for t in (a, b)]
    got = ops.masked_weights([a, b], words, torch.bfloat16)
    assert_same_cast(got[0], a, torch.bfloat16)
    assert_same_cast(got[1], b, torch.bfloat16)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_masked_weight_from_fp64_rounds_through_fp32_like_torch(impl, dtype):
    """fp64 weights: torch converts to fp32 first, then to fp16 / bf16 (a value just above a tie can round
    down); a direct fp64 -> fp16 conversion (numpy's, or a GPU's cvt.rn.f16.f64) would round it up."""
    one_plus = [1 + 2.0 ** -8 + 2.0 ** -40, 1 + 2.0 ** -11 + 2.0 ** -40, -(1 + 2.0 ** -11 + 2.0 ** -40)]
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor(one_plus + [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e300, 1e-300],
                                dtype=torch.float64), torch.randn(500, generator=g, dtype=torch.float64) * 1e3])
    x = x.to(impl.device)
    words = bitmask.pack_mask(torch.ones(x.numel(), dtype=torch.bool)).to(impl.device)
    got = ops.masked_weight(x, words, dtype).cpu()
    want = x.cpu().to(dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(want)], want[~torch.isnan(want)])
    # the cases are double-rounding ones: just above a tie, so a direct rounding would go up, torch's goes down
    if dtype == torch.bfloat16:
        assert want[0].item() == 1.0 and x[0].item() > 1 + 2.0 ** -8
    elif dtype == torch.float16:
        assert want[1].item() == 1.0 and want[2].item() == -1.0 and x[1].item() > 1 + 2.0 ** -11


def _pair_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """A weight keeping exactly two entries per row, both 1.0 (or -1.0): each output is x[k0] +- x[k1], exact in
    fp32 for fp16 / bf16 inputs, so the kernel's only rounding is its final cast."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(n, k)
    pairs = []
    for r in range(n):
        k0, k1 = torch.randperm(k, generator=g)[:2].tolist()
        w[r, k0], w[r, k1] = 1.0, (-1.0 if r % 3 == 0 else 1.0)
        pairs.append((k0, k1))
    return w, w != 0, pairs


@pytest.mark.skipif(not any(p[0] == "triton" for p in SPARSE_PAIRS), reason="Triton needs CUDA or the interpreter")
@pytest.mark.parametrize("special", ["nan", "overflow"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows,config", [(1, None), (5, None), (20, None), (5, "tiled")],
                         ids=["skinny-1row", "skinny-5rows", "tiled-20rows", "tiled-forced"])
def test_sparse_output_rounds_like_torch_and_keeps_nan_inf(dtype, rows, config, special):
    """The sparse kernels' final cast (``_store_tile``): sums of two inputs that need rounding (ties included)
    give torch's cast of the exact sum; a NaN input gives NaN where dense math does; sums past the dtype's
    range give Inf."""
    k, n = 40, 70
    w, m, _ = _pair_weight(n, k, rows)
    g = torch.Generator().manual_seed(rows + 11)
    # x: values of one binade with random low bits, so x[k0] + x[k1] carries one bit more than the dtype holds
    x = (1 + torch.randint(0, 1 << 10, (rows, k), generator=g) / 1024.0).to(dtype)
    if special == "nan":  # 0 * NaN is NaN: the whole last row, as in dense math
        x[-1, 3] = float("nan")
    else:  # near the dtype's max: sums overflow in the fp32 accumulator (bf16) or in the final cast (fp16: 65504)
        x[-1] = x[-1].float() * (2.0 ** 127 if dtype == torch.bfloat16 else 2.0 ** 15)
    w = w.to(dtype)
    cw = sc.compress(w, m).validate()
    cfg = None
    if config == "tiled":
        cfg = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4) if INTERPRETING else sc.DEFAULT_CONFIG[False]
    out = sc.sparse_linear(x.to(DEVICE), cw.bits.to(DEVICE), cw.values.to(DEVICE), cw.offsets.to(DEVICE),
                           list(cw.shape), None, config=cfg)
    exact = x.double() @ w.double().t()  # two terms each: exact, and exactly what the fp32 accumulator holds
    assert_same_cast(out, exact.float(), dtype)
    assert (torch.isnan if special == "nan" else torch.isinf)(out[-1].cpu()).any()
    if rows > 1:
        ties = ((exact[:-1].float().view(torch.int32) & (0xFFFF if dtype == torch.bfloat16 else 0x1FFF))
                == (0x8000 if dtype == torch.bfloat16 else 0x1000))
        assert ties.any()  # the case holds exact ties: round-to-even is what is checked


# ---- one device per call ---------------------------------------------------------------------------

def _cpu_kernel(name):
    """Call the op's CPU kernel itself (its argument checks run; the dispatcher would route a meta tensor to
    the fake kernel instead)."""
    op = getattr(torch.ops.ke_fast, name).default
    return lambda *args: op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)


def _op_calls(device: str = "cpu"):
    """(op name, arguments) of every op with more than one tensor, valid on ``device``."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 37, generator=g).to(device)
    words = ops.wels_mask_bits(w.shape, 0.5, seed=1, stream=2, device=device)
    b = torch.randn(6, generator=g).to(device)
    b_words = bitmask.pack_mask(torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)).to(device)
    table, tiles = masked.masks_table((w.numel(), b.numel()), torch.device(device))
    jobs = ke_fast.kernels.reinit.prepare([w, b], [words, b_words], "kaiming_uniform_a_sqrt5", [None, (37, 6)],
                                          None, "fan_in")
    rw, rwords, rtable, rtiles, normal = ke_fast.kernels.reinit.launch_table(jobs)
    wc = torch.randn(5, 3, 3, 3, generator=g)
    cc = sc.compress(wc, torch.rand(wc.shape, generator=g) < 0.5)
    cl = sc.compress(w.cpu(), torch.rand(w.shape, generator=g) < 0.5)
    dev = lambda t: t.to(device)  # noqa: E731
    return {
        "masked_weight": (w, words, None),
        "masked_weights": ([w, b], [words, b_words], table, tiles, torch.float32),
        "reset_entries_": (rw, rwords, rtable, rtiles, 7, -3, normal),
        "sparse_conv2d": (dev(torch.randn(2, 3, 6, 6, generator=g)), dev(cc.bits), dev(cc.values), dev(cc.offsets),
                          list(cc.shape), dev(torch.randn(5, generator=g)), [1, 1], [1, 1], [1, 1], 1),
        "sparse_linear": (dev(torch.randn(3, 37, generator=g)), dev(cl.bits), dev(cl.values), dev(cl.offsets),
                          list(cl.shape), b),
    }


# (op, path to the tensor moved to another device, the name the error must give)
_MISPLACED = [("masked_weight", (1,), "words"), ("masked_weights", (1, 1), "words"),
              ("masked_weights", (2,), "table"), ("masked_weights", (3,), "tiles"),
              ("reset_entries_", (1, 1), "words\\[1\\]"), ("reset_entries_", (2,), "table"),
              ("sparse_conv2d", (1,), "bits"), ("sparse_conv2d", (3,), "offsets"), ("sparse_conv2d", (5,), "bias"),
              ("sparse_linear", (2,), "values"), ("sparse_linear", (5,), "bias")]


def _moved(args, path, to):
    args = list(args)
    if len(path) == 1:
        args[path[0]] = args[path[0]].to(to)
    else:
        lst = list(args[path[0]])
        lst[path[1]] = lst[path[1]].to(to)
        args[path[0]] = lst
    return args


@pytest.mark.parametrize("op,path,name", _MISPLACED, ids=[f"{o}-{n.replace(chr(92), '')}" for o, _, n in _MISPLACED])
def test_op_names_the_tensor_on_another_device(op, path, name, monkeypatch):
    """Every op's kernel refuses tensors on two devices before any work, naming the one that is elsewhere (here a
    meta tensor given to the CPU kernel: the CPU host's second device)."""
    monkeypatch.setenv("KE_FAST_BACKEND", "reference")
    args = _op_calls()[op]
    _cpu_kernel(op)(*args)  # the valid call runs
    with pytest.raises(ValueError, match=f"{name} is on meta"):
        _cpu_kernel(op)(*_moved(args, path, "meta"))


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: a CUDA tensor beside a CPU one")
@pytest.mark.parametrize("op,path,name", _MISPLACED, ids=[f"{o}-{n.replace(chr(92), '')}" for o, _, n in _MISPLACED])
def test_cuda_op_names_the_cpu_tensor(op, path, name):
    args = _moved(_op_calls("cuda")[op], path, "cpu")
    with pytest.raises(ValueError, match=f"{name} is on cpu"):
        getattr(torch.ops.ke_fast, op).default(*args)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_every_op_runs_on_its_tensors_device_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: each op's result equals the same call on cuda:0, and the
    current device is unchanged afterwards (the launchers' device guard)."""
    on0, on1 = _op_calls("cuda:0"), _op_calls("cuda:1")
    torch.cuda.set_device(0)
    for op in on0:
        fn = getattr(torch.ops.ke_fast, op).default
        a, b = fn(*on0[op]), fn(*on1[op])
        if op == "reset_entries_":
            a, b = on0[op][0], on1[op][0]
        for x, y in zip(a if isinstance(a, (list, tuple)) else [a], b if isinstance(b, (list, tuple)) else [b]):
            assert y.device == torch.device("cuda:1")
            assert torch.equal(x.cpu(), y.cpu()), op
        assert torch.cuda.current_device() == 0
    words = ops.wels_mask_bits((5, 123), 0.5, seed=3, stream=4, device="cuda:1")
    assert torch.equal(words.cpu(), ops.wels_mask_bits((5, 123), 0.5, seed=3, stream=4))


# ---- integer edges -----------------------------------------------------------------------------------

@pytest.mark.parametrize("numel", [2 ** 31 - 31, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 17, 2 ** 32 + 3, 2 ** 40])
def test_wels_kernel_word_count_past_int32(numel):
    """The WELS kernel's word count ``(numel + 31) // 32`` is int64: for numel in [2^31 - 31, 2^31 - 1] an int32
    count wraps negative and the kernel stores nothing. One program (64 words) of such a mask is launched on a
    64-word buffer (no 2^31-element allocation): its words are the reference's (the first 2048 bits of a mask
    do not depend on its length)."""
    seed, stream, threshold = 5, 77, reference.wels_threshold(0.5)
    out = torch.full((bitmask.WELS_WORDS_PER_PROGRAM,), 0x5A5A5A5A, dtype=torch.int32, device=DEVICE)
    bitmask.wels_bits_(out, numel, seed, stream, threshold)
    want = torch.empty(bitmask.WELS_WORDS_PER_PROGRAM, dtype=torch.int32)
    reference.wels_bits_(want, 32 * want.numel(), seed, stream, threshold)
    assert torch.equal(out.cpu(), want)
    assert bitmask.num_words(numel) == -(-numel // 32)


def test_sparse_size_guard_covers_every_buffer():
    """``_too_big`` (the int32 limit of the sparse kernels) looks at each buffer: x, the bits, a row's k, the values,
    the output and the skinny kernel's partials. Meta tensors: sizes without memory."""
    meta = lambda *s, dt=torch.float32: torch.empty(s, dtype=dt, device="meta")  # noqa: E731
    ok = dict(x=meta(16, 1000), bits=meta(500, 32, dt=torch.int32), values=meta(100), m=16, n_out=500, splits=4)
    assert not sc._too_big(**ok)
    big = sc.INDEX_LIMIT + 1
    for name, value in (("x", meta(2, big // 2 + 1)), ("bits", meta(big // 64 + 1, 64, dt=torch.int32)),
                        ("bits", meta(1, big // 32 + 1, dt=torch.int32)), ("values", meta(big)),
                        ("n_out", big // 16 + 1), ("splits", big // (16 * 500) + 1)):
        assert sc._too_big(**{**ok, name: value}), name


def _empty_cases():
    """(name, x shape, weight shape, bias): empty batch, no outputs, K = 0 (with and without bias), on the skinny
    (<= 16 rows) and the tiled kernel."""
    return [("linear-M0", (0, 37), (6, 37), True), ("linear-lead0", (2, 0, 37), (6, 37), False),
            ("linear-N0", (3, 37), (0, 37), False), ("linear-K0-skinny", (3, 0), (6, 0), True),
            ("linear-K0-tiled", (40, 0), (6, 0), True), ("linear-K0-nobias", (2, 0), (70, 0), False),
            ("conv-B0", (0, 3, 5, 5), (4, 3, 3, 3), True), ("conv-N0", (2, 3, 5, 5), (0, 3, 3, 3), False),
            ("conv-Cin0-skinny", (1, 0, 3, 3), (4, 0, 3, 3), True), ("conv-Cin0-tiled", (2, 0, 6, 6), (4, 0, 3, 3), True),
            ("conv-depthwise-B0", (0, 6, 5, 5), (6, 1, 3, 3), True)]


@pytest.mark.parametrize("name,x_shape,w_shape,bias", _empty_cases(), ids=[c[0] for c in _empty_cases()])
def test_sparse_ops_on_empty_tensors_and_k0(name, x_shape, w_shape, bias, monkeypatch):
    """Each implementation gives the sum over no term: an empty output, or the bias (zeros without one) for K = 0
    — the Triton kernels read no mask word then (the skinny kernel once prefetched ``bits`` unconditionally)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(w_shape, generator=g)
    cw = sc.compress(w, torch.rand(w_shape, generator=g) < 0.5).validate()
    x = torch.randn(x_shape, generator=g)
    b = torch.randn(w_shape[0], generator=g) if bias else None
    conv = len(w_shape) == 4
    groups = x_shape[1] if conv and w_shape[1] == 1 and x_shape[1] > 1 else 1
    want = torch.zeros(sc.conv_out_size(x_shape, w_shape, [1, 1], [0, 0], [1, 1]) if conv
                       else (*x_shape[:-1], w_shape[0]))
    if b is not None and want.numel():
        want += b.view(-1, 1, 1) if conv else b
    for impl_name, device in SPARSE_PAIRS:
        monkeypatch.setenv("KE_FAST_BACKEND", impl_name)
        d = lambda t: None if t is None else t.to(device)  # noqa: E731
        if conv:
            out = torch.ops.ke_fast.sparse_conv2d.default(d(x), d(cw.bits), d(cw.values), d(cw.offsets), list(w_shape),
                                                          d(b), [1, 1], [0, 0], [1, 1], groups)
        else:
            out = torch.ops.ke_fast.sparse_linear.default(d(x), d(cw.bits), d(cw.values), d(cw.offsets), list(w_shape),
                                                          d(b))
        assert out.shape == want.shape, impl_name
        assert torch.equal(out.cpu(), want), impl_name


def test_mask_and_reset_ops_on_empty_tensors(impl):
    """Empty weights through the masked weight(s), the WELS draw and the reset: empty results, the other tensors of
    the same call untouched by the empty one."""
    dev = impl.device
    e, w = torch.empty(0, 5, device=dev), torch.randn(4, 9, device=dev)
    ew, ww = bitmask.pack_mask(torch.ones(0, 5)).to(dev), bitmask.pack_mask(torch.rand(4, 9) < 0.5).to(dev)
    assert ops.masked_weight(e, ew, torch.bfloat16).shape == (0, 5)
    outs = ops.masked_weights([e, w, e], [ew, ww, ew], torch.bfloat16)
    assert [o.shape for o in outs] == [(0, 5), (4, 9), (0, 5)]
    assert torch.equal(outs[1].cpu(), (w.cpu() * bitmask.unpack_mask(ww.cpu(), w.shape)).to(torch.bfloat16))
    table, tiles = masked.masks_table((0, w.numel()), torch.device(dev))  # the op itself, an empty row in its table
    flat = torch.ops.ke_fast.masked_weights.default([e, w], [ew, ww], table, tiles, torch.float32)
    assert torch.equal(flat.cpu(), (w.cpu() * bitmask.unpack_mask(ww.cpu(), w.shape)).reshape(-1))
    assert ops.wels_mask_bits((0,), 0.5, seed=1, stream=2, device=dev).numel() == 0
    assert ops.wels_mask_bits((3, 0), 0.5, seed=1, stream=2, device=dev).numel() == 0
    before = w.clone()
    ops.ReinitPlan([e, w], [ew, torch.zeros_like(ww)], seed=3, fans=[(5, 1), None]).run(1)
    assert not torch.equal(w, before)  # the non-empty tensor was reset; the empty one did not stop the launch


# ---- compiled once for every generation ----------------------------------------------------------------

_SPECIALIZATION = r"""
import sys, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from ke_fast.kernels import bitmask, reinit
backend = make_backend(GPUTarget("cuda", 90, 32))
def spec(fn, *args, **kw):
    return repr(create_function_from_signature(fn.signature, fn.params, backend)(*args, **kw)[1])
w, m, t = torch.empty(64), torch.empty(2, dtype=torch.int32), torch.empty(8, dtype=torch.int64)
tiles = torch.empty(2, dtype=torch.int32)
values = [0, 1, 16, 17, 2 ** 31 - 1, -5, 2 ** 40, -2 ** 63, 2 ** 63 - 1]
reset = {spec(reinit._reinit_kernel, w, m, t, tiles, s, p, BQ=512, HAS_NORMAL=False) for s in values for p in values}
wels = {spec(bitmask._wels_bits_kernel, m, 2 ** 31 - 1, s, st, 1 << 23, BW=64) for s in values for st in values}
print(len(reset), len(wels))
"""


def test_reset_and_wels_specialise_once_for_every_seed_and_stream():
    """Triton's specialisation (the key of its compile cache) of the reset kernel is the same for every seed and
    stream prefix, so a new generation (a new prefix) never compiles again; likewise the WELS draw for every seed,
    stream and numel class. Computed with Triton's own binder for an sm_90 target: no GPU needed (the real JIT,
    not the interpreter, hence a subprocess)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SPECIALIZATION], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["1", "1"], out.stdout


@pytest.mark.skipif(not HAS_CUDA, reason="counts compiled CUDA kernels")
def test_reset_compiles_once_for_three_generations():
    from ke_fast.kernels.reinit import _reinit_kernel

    w = torch.randn(300, 70, device="cuda")
    plan = ops.ReinitPlan([w], [torch.rand(w.shape, device="cuda") < 0.5], seed=12345)
    plan.run(1)
    count = lambda: sum(len(c[0]) for c in _reinit_kernel.device_caches.values())  # noqa: E731
    before = count()
    for generation in (2, 3, 4):
        plan.run(generation)
    torch.cuda.synchronize()
    assert count() == before


# ---- every launch under its tensors' device; per-call host work -------------------------------------------

def _launch_sites():
    """(module, enclosing function, line) of every ``kernel[grid](...)`` call in kernels/, and whether a
    ``with launch_guard(...)`` encloses it."""
    import ast
    from pathlib import Path

    import ke_fast.kernels as pkg

    sites = []
    for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())

        def walk(node, func, guarded):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                func, guarded = node.name, False
            if isinstance(node, ast.With) and any(isinstance(i.context_expr, ast.Call) and
                                                  getattr(i.context_expr.func, "id", "") == "launch_guard"
                                                  for i in node.items):
                guarded = True
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                sites.append((path.stem, func, node.lineno, guarded))
            for child in ast.iter_child_nodes(node):
                walk(child, func, guarded)

        walk(tree, None, False)
    return sites


# launch sites that are helpers of a guarded launcher: the skinny launch (called inside sparse_conv2d /
# sparse_linear's guard) and _Fixed's launch wrapper (likewise)
_GUARDED_BY_CALLER = {("sparse_conv", "_skinny_launch"), ("sparse_conv", "launch")}


def test_every_triton_launch_runs_under_the_device_guard():
    """Source check: each launch in kernels/ sits in a ``with launch_guard(...)`` block, or in a helper only the
    guarded launchers call. A new launcher without the guard fails here."""
    sites = [s for s in _launch_sites() if s[0] not in ("aot",)]
    assert len(sites) >= 8  # masked x2, bitmask, reinit, sparse x4 (+ helpers)
    unguarded = [s for s in sites if not s[3] and (s[0], s[1]) not in _GUARDED_BY_CALLER]
    assert not unguarded, f"launches outside launch_guard: {unguarded}"


def test_sm_count_is_read_once_per_device(monkeypatch):
    """The skinny kernel's split choice reads the SM count once per device, not per call (a driver query)."""
    calls = []

    class Props:
        multi_processor_count = 132

    def props(index):
        calls.append(index)
        return Props()

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(sc, "_SM_COUNTS", {})
    for _ in range(3):
        assert sc.skinny_split(77, 300, torch.device("cuda", 5)) == sc.skinny_split(77, 300, torch.device("cuda", 5))
    assert calls == [5]
