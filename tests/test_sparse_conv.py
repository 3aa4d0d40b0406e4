"""Sparse WELS conv2d / linear (the ke_fast::sparse_conv2d / sparse_linear ops): every implementation the host
runs (Triton on the GPU or the interpreter, the reference) against F.conv2d / F.linear on W*M, the compressed format's round trip, its validation, and its size.

Inputs are rounded to the dtype under test first; the reference runs in fp64 on those rounded values, so
the only error allowed is the kernel's own (accumulation order and the final rounding), judged with TOL."""
import contextlib
import inspect
import linecache
import math

import pytest
import torch
import torch.nn.functional as F

from ke_fast.kernels import sparse_conv as sc
from ke_fast.ops import reload_settings

from conftest import DEVICE, DTYPES, INTERPRETING, PAIRS, TOL, Impl

SPARSE_PAIRS = [p for p in PAIRS if p[0] != "cpp"]  # the sparse ops have no C++ kernel (cpp runs the reference)


@pytest.fixture(params=SPARSE_PAIRS, ids=[f"{n}-{d}" for n, d in SPARSE_PAIRS])
def impl(request, monkeypatch):
    name, device = request.param
    monkeypatch.setenv("KE_FAST_BACKEND", name)
    reload_settings()
    return Impl(name, device)


def conv(x, cw, bias=None, stride=1, padding=0, dilation=1, groups=1):
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return torch.ops.ke_fast.sparse_conv2d.default(x, cw.bits, cw.values, cw.offsets, list(cw.shape), bias,
                                                   pair(stride), pair(padding), pair(dilation), groups)


def linear(x, cw, bias=None):
    return torch.ops.ke_fast.sparse_linear.default(x, cw.bits, cw.values, cw.offsets, list(cw.shape), bias)


def _mask(shape, density, gen):
    if density == 0:
        return torch.zeros(shape, dtype=torch.bool)
    if density == 1:
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=gen) < density


def _data(seed, x_shape, w_shape, density, dtype, bias, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    fan_in = math.prod(w_shape[1:])
    x = torch.randn(x_shape, generator=gen).to(dtype)
    w = (torch.randn(w_shape, generator=gen) / math.sqrt(fan_in)).to(dtype)
    m = _mask(w_shape, density, gen)
    b = torch.randn(w_shape[0], generator=gen).to(dtype) if bias else None
    return x.to(device), w.to(device), m.to(device), None if b is None else b.to(device)


def _check(out, ref, dtype):
    assert out.dtype == dtype
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


# (C_in, C_out, groups, kernel, stride, padding, dilation, batch, density, bias): a representative set rather
# than the full cross product (the interpreter is slow). Every option value appears several times, paired
# with different others; C_in = 32 with 3x3 gives K = 288 > 256: more than one 8-word chunk per row.
CONV_CASES = [
    (3, 5, 1, 3, 1, 0, 1, 1, 0.5, True),
    (3, 8, 1, 3, 2, 1, 1, 3, 0.3, False),
    (5, 7, 1, 3, 1, 1, 2, 3, 0.1, True),
    (5, 4, 1, 3, 2, 0, 2, 1, 1.0, False),
    (17, 9, 1, 3, 1, 1, 1, 3, 0.5, False),
    (17, 19, 1, 3, 2, 1, 2, 1, 0.0, True),
    (17, 33, 1, 1, 1, 0, 1, 3, 0.3, True),
    (17, 6, 1, 3, 2, 0, 1, 3, 1.0, True),
    (32, 6, 1, 3, 1, 1, 1, 1, 0.5, True),
    (32, 17, 1, 3, 2, 1, 2, 3, 0.1, False),
    # depthwise: groups = C_in = C_out
    (6, 6, 6, 3, 1, 1, 1, 3, 0.5, True),
    (6, 6, 6, 3, 2, 0, 2, 1, 0.3, False),
    (6, 6, 6, 3, 1, 1, 2, 3, 1.0, True),
    (6, 6, 6, 3, 2, 1, 1, 1, 0.0, True),
    (6, 6, 6, 3, 1, 0, 1, 1, 0.1, False),
    (5, 5, 5, 7, 1, 3, 1, 1, 0.5, True),  # K = 49 > 32: popcounts of earlier words of the chunk
]


def _conv_id(case):
    c, n, g, k, s, p, d, b, dens, bias = case
    return f"C{c}-N{n}-g{g}-k{k}-s{s}-p{p}-d{d}-B{b}-dens{dens}-{'bias' if bias else 'nobias'}"


def _pairwise(cases):
    """Under the interpreter: every case in fp32, and fp16 / bf16 each on every third case (a pairwise sample;
    the other pairs run every combination)."""
    return lambda p: p["dtype"] == torch.float32 or cases.index(p["case"]) % 3 == DTYPES.index(p["dtype"])


@pytest.mark.interpreter_sample(keep=_pairwise(CONV_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_sparse_conv2d_matches_reference(impl, case, dtype):
    c_in, c_out, groups, ksz, stride, padding, dilation, batch, density, bias = case
    x, w, m, b = _data(hash(case) % 2**31, (batch, c_in, 7, 7), (c_out, c_in // groups, ksz, ksz), density, dtype,
                       bias, impl.device)
    cw = sc.compress(w, m).validate()
    out = conv(x, cw, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = F.conv2d(x.double(), w.double() * m, None if b is None else b.double(), stride, padding, dilation, groups)
    _check(out, ref, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)  # every implementation's layout


def test_sparse_conv2d_tuple_args_and_channels_last_input(impl):
    x, w, m, b = _data(7, (2, 5, 7, 7), (9, 5, 3, 3), 0.5, torch.float32, True, impl.device)
    x = x.to(memory_format=torch.channels_last)
    cw = sc.compress(w, m)
    out = conv(x, cw, b, stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    ref = F.conv2d(x.double(), w.double() * m, b.double(), (2, 1), (1, 0), (1, 2))
    _check(out, ref, torch.float32)


def test_sparse_conv2d_rejects_grouped_and_wrong_input(impl):
    x, w, m, _ = _data(8, (1, 6, 7, 7), (6, 3, 3, 3), 0.5, torch.float32, False, impl.device)
    with pytest.raises(ValueError, match="groups"):
        conv(x, sc.compress(w, m), groups=2)
    with pytest.raises(ValueError, match="x must be"):
        conv(x[:, :5], sc.compress(w, m), groups=2)


# (K, N, leading shape of x, density, bias); K = 300 and 520 span 2 and 3 chunks of 8 words.
LINEAR_CASES = [
    (70, 9, (5,), 0.5, True),
    (300, 13, (2, 3), 0.3, True),
    (300, 40, (4,), 0.1, False),
    (33, 5, (1,), 1.0, True),
    (70, 17, (3,), 0.0, True),
    (520, 7, (2,), 0.5, True),
]


@pytest.mark.interpreter_sample(keep=_pairwise(LINEAR_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"K{c[0]}-N{c[1]}-x{c[2]}-dens{c[3]}-bias{c[4]}")
def test_sparse_linear_matches_reference(impl, case, dtype):
    k, n, lead, density, bias = case
    x, w, m, b = _data(hash(case) % 2**31, (*lead, k), (n, k), density, dtype, bias, impl.device)
    cw = sc.compress(w, m).validate()
    ref = F.linear(x.double(), w.double() * m, None if b is None else b.double())
    _check(linear(x, cw, b), ref, dtype)


# ---- the skinny (split-K) kernel: up to SKINNY_MAX_ROWS GEMM rows ----------------------------------

def _skinny_cases():
    """Every (rows, density) pair once; dtype and number of K splits cycle so each appears with every row count.
    N = 77 spans two 64-wide output tiles, K = 283 two 8-word chunks (so up to two splits: 3 asks for more)."""
    out = []
    for i, rows in enumerate((1, 3, 8, 16)):
        for j, density in enumerate((0.0, 0.1, 0.3, 0.5, 1.0)):
            dtype = DTYPES[(i + j) % 3]
            split = (None, 1, 3)[(i + 2 * j) % 3]
            out.append(pytest.param(rows, density, dtype, split, id=f"rows{rows}-dens{density}-{str(dtype)[6:]}-"
                                                                     f"split{split}"))
    return out


@pytest.mark.skipif(not any(p[0] == "triton" for p in SPARSE_PAIRS), reason="Triton needs CUDA or the interpreter")
@pytest.mark.parametrize("rows,density,dtype,split_k", _skinny_cases())
def test_skinny_linear_matches_reference(rows, density, dtype, split_k):
    assert rows <= sc.SKINNY_MAX_ROWS
    x, w, m, b = _data(rows * 31 + int(density * 10), (rows, 283), (77, 283), density, dtype, rows % 2 == 1)
    cw = sc.compress(w, m).validate()
    out = sc.sparse_linear(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, split_k=split_k)
    _check(out, F.linear(x.double(), w.double() * m, None if b is None else b.double()), dtype)


def test_skinny_split_is_whole_chunks():
    dev = torch.device("cpu")
    for n, t, want in ((77, 17, None), (77, 17, 3), (77, 17, 2), (4096, 128, None), (5, 1, 8), (5, 300, 1000)):
        splits, words = sc.skinny_split(n, t, dev, want)
        assert words % sc.CHUNK_WORDS == 0 and 1 <= splits and (splits - 1) * words < t <= splits * words
        if want is not None:
            assert splits <= max(want, 1)


@pytest.mark.skipif(not any(p[0] == "triton" for p in SPARSE_PAIRS), reason="Triton needs CUDA or the interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw,stride,padding", [((7, 5), (2, 1), (1, 0)), ((2, 2), (2, 2), (1, 1))],
                         ids=["12rows", "1row-padded"])
def test_skinny_conv_matches_reference(dtype, hw, stride, padding):
    """Batch-1 convs the skinny kernel runs: 4x3 = 12 output pixels, and one output pixel whose window reaches
    into the padding (the one-row FMA path); K = 17*9 = 153."""
    x, w, m, b = _data(5, (1, 17, *hw), (19, 17, 3, 3), 0.3, dtype, True)
    cw = sc.compress(w, m)
    out = sc.sparse_conv2d(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, list(stride), list(padding),
                           [1, 1], 1, split_k=1)
    ref = F.conv2d(x.double(), w.double() * m, b.double(), stride, padding)
    assert ref.shape[2] * ref.shape[3] <= sc.SKINNY_MAX_ROWS
    _check(out, ref, dtype)


# ---- the split-K reduction in any order of its programs ------------------------------------------------
# The interpreter runs a launch's programs one after another in grid order, so the program that draws a tile's
# last ticket was always its last split: a reduction keyed on the split index instead of the ticket would pass.
# This harness runs the real kernel under the interpreter with the programs of each launch in a chosen order
# (it remaps the interpreter's sequential program ids), on a workspace whose partials are poisoned with NaN.
#
# What it proves: for every order tried - each split in turn the last of its tile, reversed, random - the
# ticket protocol picks the program that runs last, that program sums every split's partial of this launch
# (none is read before it is written: a stale or missing one would be NaN), the result is bit-identical
# whatever the order (partials summed in split order), and the kernel leaves every ticket counter at zero for
# the next launch on the same workspace. With 3 and 4 splits, linear and conv, one row (FMA) and several (dot).
# Since each program's partial store precedes its ticket and the reduction follows the last ticket, any
# concurrent interleaving reads the same values as one of these sequential orders *if* the memory ordering
# holds. What it cannot prove: that memory ordering on a GPU (debug_barrier, the acq_rel atomic, .cg loads
# making every partial visible to the last program), nor races inside a program: that needs a GPU
# (test_skinny_split_k_repeats_bit_identically_on_cuda).

def _grid_orders(splits: int):
    """(name, order function) pairs: an order function maps the grid (tiles, splits, 1) to the programs' order."""
    def split_last(s):
        return lambda grid: ([(j, k, 0) for k in reversed(range(grid[1])) if k != s for j in range(grid[0])]
                             + [(j, s, 0) for j in range(grid[0])])

    def shuffled(seed):
        def order(grid):
            progs = [(j, k, 0) for j in range(grid[0]) for k in range(grid[1])]
            perm = torch.randperm(len(progs), generator=torch.Generator().manual_seed(seed)).tolist()
            return [progs[i] for i in perm]
        return order

    return ([("in-order", None), ("reversed", lambda g: [(j, k, 0) for j in reversed(range(g[0]))
                                                         for k in reversed(range(g[1]))])]
            + [(f"split{s}-last", split_last(s)) for s in range(splits)]
            + [("random", shuffled(splits))])


@contextlib.contextmanager
def _programs_in_order(order_fn):
    """Run every interpreted launch's programs in ``order_fn(grid)``'s order (None: grid order). Yields the list
    of orders actually run, one per launch."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    runs: list[list[tuple[int, int, int]]] = []

    def grid_dim(nx, ny, nz):
        set_dim(nx, ny, nz)
        full = [(x, y, z) for x in range(nx) for y in range(ny) for z in range(nz)]
        order = full if order_fn is None else order_fn((nx, ny, nz))
        assert sorted(order) == full, "an order must run every program once"
        runs.append(list(order))
        grid_dim.next = iter(order)

    builder.set_grid_dim = grid_dim
    builder.set_grid_idx = lambda x, y, z: set_idx(*next(grid_dim.next))
    try:
        yield runs
    finally:
        builder.set_grid_dim, builder.set_grid_idx = set_dim, set_idx


_SPLIT_CASES = [  # (name, x shape, weight shape, conv stride/padding or None, split_k asked, splits expected)
    ("linear-1row-3splits", (1, 520), (50, 520), None, 3, 3),  # K = 520: 17 words, chunks of 8, 8, 1
    ("linear-5rows-3splits-2tiles", (5, 520), (77, 520), None, 3, 3),  # two output tiles: one counter each
    ("conv-1px-4splits", (1, 89, 3, 3), (40, 89, 3, 3), ((1, 1), (0, 0)), 4, 4),  # K = 801: 26 words
    ("conv-6px-padded-3splits", (1, 58, 3, 2), (40, 58, 3, 3), ((1, 1), (1, 1)), 3, 3),  # windows in the padding
]


def _split_run(case, dtype=torch.float32, seed=0):
    """(out, reference in fp64, splits, the workspace) of one skinny launch of a case with a poisoned workspace."""
    _, x_shape, w_shape, geometry, split_k, _ = case
    x, w, m, b = _data(seed, x_shape, w_shape, 0.4, dtype, True, "cpu")
    cw = sc.compress(w, m)
    k = math.prod(w_shape[1:])
    if geometry is None:
        rows = math.prod(x_shape[:-1])
        ref = F.linear(x.double(), w.double() * m, b.double())
    else:
        ref = F.conv2d(x.double(), w.double() * m, b.double(), *geometry)
        rows = ref.shape[0] * ref.shape[2] * ref.shape[3]
    splits, _ = sc.skinny_split(w_shape[0], (k + 31) // 32, x.device, split_k)
    part, count = sc.skinny_workspace(x.device, splits, rows, w_shape[0])
    part.fill_(float("nan"))  # a partial read before this launch wrote it shows up as NaN
    if geometry is None:
        out = sc.sparse_linear(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, split_k=split_k)
    else:
        out = sc.sparse_conv2d(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, list(geometry[0]),
                               list(geometry[1]), [1, 1], 1, split_k=split_k)
    return out, ref, splits, count


_INTERPRETED = pytest.mark.skipif(not INTERPRETING, reason="orders the programs of an interpreted launch; a GPU runs "
                                                           "them concurrently (see the CUDA repeat test)")


@_INTERPRETED
@pytest.mark.parametrize("case", _SPLIT_CASES, ids=[c[0] for c in _SPLIT_CASES])
def test_skinny_split_k_reduction_in_any_program_order(case):
    """The skinny kernel's split-K result is correct and bit-identical for every order of its programs; the ticket
    counters are zero after every launch (see the harness notes above)."""
    results = {}
    for name, order_fn in _grid_orders(case[5]):
        with _programs_in_order(order_fn) as runs:
            out, ref, splits, count = _split_run(case)
        assert splits == case[5] >= 3 and len(runs) == 1 and len(runs[0]) == splits * -(-case[2][0] // sc.SKINNY_BLOCK_N)
        _check(out, ref, torch.float32)
        assert not bool(count.any()), f"{name}: ticket counters left at {count.tolist()}"
        results[name] = out
    first = results["in-order"]
    for name, out in results.items():
        assert torch.equal(out, first), f"{name} differs from grid order: the reduction depends on the order"


@_INTERPRETED
def test_skinny_split_k_workspace_reused_across_launches():
    """Two launches of one shape share the workspace (no memset between them): the second, with other inputs and
    its programs reversed, is still right, so the kernel really left its tickets at zero."""
    case = _SPLIT_CASES[1]
    out1, ref1, splits, count1 = _split_run(case, seed=1)
    with _programs_in_order(lambda g: [(j, k, 0) for j in reversed(range(g[0])) for k in reversed(range(g[1]))]):
        out2, ref2, _, count2 = _split_run(case, seed=2)
    assert count1 is count2 and splits == case[5]
    _check(out1, ref1, torch.float32)
    _check(out2, ref2, torch.float32)


@_INTERPRETED
def test_split_k_harness_catches_a_reduction_keyed_on_the_split_index(monkeypatch):
    """A kernel whose reduction is done by the last *split* instead of the last *ticket* passes in grid order (what
    the interpreter always ran) and fails as soon as another split runs last: the harness can fail."""
    src = inspect.getsource(sc._skinny_kernel.fn)
    broken = src.replace("if ticket == SPLIT_K - 1:", "if pid_k == SPLIT_K - 1:")
    assert broken != src, "the kernel's reduction test changed: update this mutation"
    filename = "<skinny kernel reduced by the last split>"
    linecache.cache[filename] = (len(broken), None, broken.splitlines(True), filename)  # the interpreter reads source
    namespace = dict(vars(sc))
    exec(compile(broken, filename, "exec"), namespace)
    monkeypatch.setattr(sc, "_skinny_kernel", namespace["_skinny_kernel"])
    case = _SPLIT_CASES[0]
    out, ref, _, _ = _split_run(case)
    _check(out, ref, torch.float32)  # grid order: the last split is the last program, and it passes
    with _programs_in_order(_grid_orders(case[5])[2][1]):  # split 0 last
        out, ref, _, _ = _split_run(case)
    assert torch.isnan(out).any() or not torch.allclose(out.double(), ref, **TOL[torch.float32])


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU: its programs run concurrently")
@pytest.mark.parametrize("case", _SPLIT_CASES, ids=[c[0] for c in _SPLIT_CASES])
def test_skinny_split_k_repeats_bit_identically_on_cuda(case):
    """On a GPU the split programs race for the tickets: 200 launches give bit-identical results (partials summed in
    split order whichever program draws the last ticket), close to the fp64 reference, counters back at zero."""
    _, x_shape, w_shape, geometry, split_k, _ = case
    x, w, m, b = _data(0, x_shape, w_shape, 0.4, torch.float32, True, "cuda")
    cw = sc.compress(w, m)
    if geometry is None:
        run = lambda: sc.sparse_linear(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, split_k=split_k)  # noqa
        ref = F.linear(x.double(), w.double() * m, b.double())
    else:
        run = lambda: sc.sparse_conv2d(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b,  # noqa: E731
                                       list(geometry[0]), list(geometry[1]), [1, 1], 1, split_k=split_k)
        ref = F.conv2d(x.double(), w.double() * m, b.double(), *geometry)
    first = run().clone()
    _check(first, ref, torch.float32)
    for _ in range(200):
        assert torch.equal(run(), first)
    for part, count in sc._WORKSPACES.values():
        assert not bool(count.any())


@pytest.mark.skipif(DEVICE != "cuda", reason="captures a CUDA graph")
def test_skinny_split_k_in_a_cuda_graph(monkeypatch):
    """A 3-split skinny launch captured once and replayed with new inputs equals eager every time: the workspace
    (first used inside the capture: allocated from the graph's pool, then kept) outlives the capture, and the
    kernel resets its tickets on every replay (no memset node, no allocation per call)."""
    monkeypatch.setattr(sc, "_WORKSPACES", {})
    _, x_shape, w_shape, _, split_k, _ = _SPLIT_CASES[1]
    x, w, m, b = _data(0, x_shape, w_shape, 0.4, torch.float32, True, "cuda")
    cw = sc.compress(w, m)
    run = lambda: sc.sparse_linear(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, split_k=split_k)  # noqa
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (1, 2, 3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        torch.cuda.synchronize()
        _check(out, F.linear(x.double(), w.double() * m, b.double()), torch.float32)
        assert torch.equal(out, run())
    assert all(not bool(count.any()) for _, count in sc._WORKSPACES.values())


# ---- the compressed format -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 17, 3, 3), (6, 1, 7, 7), (4, 32, 3, 3), (9, 300), (3, 70), (2, 32)],
                         ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_compress_decompress_round_trip(shape, dtype, density):
    _, w, m, _ = _data(1, (1,), shape, density, dtype, False)
    cw = sc.compress(w, m).validate()
    assert cw.shape == tuple(shape) and cw.values.dtype == dtype
    assert cw.values.numel() == int(m.sum())
    back = sc.decompress(cw)
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(back, w * m)
    assert sc.density_of(cw) == pytest.approx(float(m.float().mean()))


def test_values_are_chunk_major():
    """A block of consecutive rows reads one contiguous run of values per 256-wide chunk: rows a..b-1 of chunk c
    are values[offsets[a, c]:offsets[b, c]], their kept weights in (row, k) order."""
    _, w, m, _ = _data(2, (1,), (7, 600), 0.4, torch.float32, False)  # 3 chunks, the last one partial
    cw = sc.compress(w, m).validate()
    for c in range(3):
        cols = slice(256 * c, min(256 * (c + 1), 600))
        for a, b in ((0, 7), (2, 5)):
            end = cw.offsets[b, c] if b < 7 else (cw.offsets[0, c + 1] if c < 2 else cw.values.numel())
            assert torch.equal(cw.values[cw.offsets[a, c]:end], w[a:b, cols][m[a:b, cols]])


def _valid():
    """A linear weight with K = 300: T = 10 words per row, 2 chunks, a 12-bit tail word."""
    _, w, m, _ = _data(3, (1,), (6, 300), 0.5, torch.float32, False)
    return sc.compress(w, m).validate()


def _replace(cw, **kw):
    fields = dict(shape=cw.shape, bits=cw.bits.clone(), values=cw.values.clone(), offsets=cw.offsets.clone())
    fields.update(kw)
    return sc.Compressed(**fields)


def test_validate_catches_bad_bits_shape():
    cw = _valid()
    with pytest.raises(ValueError, match="bits"):
        _replace(cw, bits=cw.bits[:, :-1].contiguous()).validate()
    with pytest.raises(ValueError, match="bits"):
        _replace(cw, bits=cw.bits[:-1].contiguous()).validate()


def test_validate_catches_bad_dtypes():
    cw = _valid()
    with pytest.raises(ValueError, match="bits"):
        _replace(cw, bits=cw.bits.to(torch.int64)).validate()
    with pytest.raises(ValueError, match="offsets"):
        _replace(cw, offsets=cw.offsets.to(torch.int32)).validate()
    with pytest.raises(ValueError, match="values"):
        _replace(cw, values=cw.values.to(torch.float64)).validate()
    with pytest.raises(ValueError, match="values"):
        _replace(cw, values=cw.values.view(1, -1)).validate()


def test_validate_catches_values_too_short_or_long():
    cw = _valid()
    with pytest.raises(ValueError, match="values hold"):
        _replace(cw, values=cw.values[:-1].clone()).validate()
    with pytest.raises(ValueError, match="values hold"):
        _replace(cw, values=torch.cat([cw.values, cw.values[:1]])).validate()


def test_validate_catches_tampered_offsets():
    cw = _valid()
    assert cw.offsets.shape == (6, 2)
    for r, c in ((0, 1), (3, 0), (5, 1)):
        bad = cw.offsets.clone()
        bad[r, c] += 1
        with pytest.raises(ValueError, match="offsets do not match"):
            _replace(cw, offsets=bad).validate()
    with pytest.raises(ValueError, match="offsets"):
        _replace(cw, offsets=cw.offsets[:, :1].contiguous()).validate()


def test_validate_catches_tail_bits():
    cw = _valid()
    assert 300 % 32 == 12
    for bit in (12, 20, 31):  # bit 31 is the sign bit of the int32 word
        bits = cw.bits.clone()
        word = int(bits[2, -1]) & 0xFFFFFFFF | (1 << bit)
        bits[2, -1] = word - (1 << 32) if word >= 1 << 31 else word
        with pytest.raises(ValueError, match="beyond the row length"):
            _replace(cw, bits=bits).validate()


def test_validate_catches_flipped_bit():
    cw = _valid()
    bits = cw.bits.clone()
    bits[1, 4] ^= 1 << 5
    with pytest.raises(ValueError):
        _replace(cw, bits=bits).validate()


def test_compress_rejects_bad_mask():
    _, w, m, _ = _data(4, (1,), (4, 70), 0.5, torch.float32, False)
    with pytest.raises(ValueError, match="mask"):
        sc.compress(w, m.to(torch.uint8))
    with pytest.raises(ValueError, match="mask"):
        sc.compress(w, m[:, :-1])


def test_memory_bf16_half_density():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, 3, 3, generator=gen).to(torch.bfloat16)
    m = torch.rand(w.shape, generator=gen) < 0.5
    cw = sc.compress(w, m).validate()
    dense = w.numel() * w.element_size()
    ratio = cw.nbytes() / dense
    print(f"\ncompressed 256x256x3x3 bf16 at density {float(m.float().mean()):.4f}: {cw.nbytes()} B / {dense} B "
          f"= {ratio:.4f}")
    assert 0.55 <= ratio <= 0.60


# ---- every autotuning config (the suite otherwise runs one: KE_FAST_AUTOTUNE=0 on GPUs) ------------

def _config_cases():
    out = []
    for dtype in DTYPES:
        for cfg in sc.gpu_configs(fp32=dtype == torch.float32):
            out.append(pytest.param(dtype, cfg, id=f"{str(dtype)[6:]}-{cfg.kwargs['BLOCK_M']}x"
                                                   f"{cfg.kwargs['BLOCK_N']}-w{cfg.num_warps}-s{cfg.num_stages}"))
    return out


def _one_half_dtype_per_tile(p):
    """Under the interpreter: every fp32 config, and each half-precision tile once, fp16 and bf16 in turn
    (the two lists hold the same tiles; the dtype paths are each checked on every other tile)."""
    if p["dtype"] == torch.float32:
        return True
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in sc.gpu_configs(fp32=False)]
    c = p["config"]
    i = tiles.index((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
    return (p["dtype"] == torch.float16) == (i % 2 == 0)


@pytest.mark.interpreter_sample(keep=_one_half_dtype_per_tile)
@pytest.mark.parametrize("dtype,config", _config_cases())
def test_every_gpu_config_matches_reference(dtype, config):
    """Each config the GPU autotuner may pick, forced, on a conv and a linear that span several tiles and
    chunks (Triton on the GPU; under the interpreter on CPU hosts). The conv's 81 output rows and 130 filters
    span 2-6 tiles of every config (rows for BLOCK_M <= 64, filters for all); the linear's K = 300 spans two
    chunks of 8 words."""
    x, w, m, b = _data(11, (1, 9, 9, 9), (130, 9, 3, 3), 0.4, dtype, True)
    cw = sc.compress(w, m)
    out = sc.sparse_conv2d(x, cw.bits, cw.values, cw.offsets, list(cw.shape), b, [1, 1], [1, 1], [1, 1], 1,
                           config=config)
    _check(out, F.conv2d(x.double(), w.double() * m, b.double(), 1, 1), dtype)
    x, w, m, b = _data(12, (3, 300), (140, 300), 0.4, dtype, False)
    cw = sc.compress(w, m)
    out = sc.sparse_linear(x, cw.bits, cw.values, cw.offsets, list(cw.shape), None, config=config)
    _check(out, F.linear(x.double(), w.double() * m), dtype)
