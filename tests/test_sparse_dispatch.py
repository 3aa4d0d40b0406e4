"""The sparse/dense dispatcher (``ke_fast.dispatch.sparse_conv2d / sparse_linear``): decisions timed on first use and
cached per (layer, input shape, dtype, device), cleared, saved and loaded; no timing while torch.compile traces;
the dense path's kept W*M (decompressed once per layer); and extract_sparse / extract_slim networks compiled
with fullgraph=True (no graph break).

Timing is replaced by a fake (``dispatch.path_seconds``) where a test is about the cache, so decisions do not
depend on this host's speed; one test times for real."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ke_fast
from ke_fast import SparseConv2d, SparseLinear, dispatch, ops
from ke_fast.kernels import compressed as kformat
from ke_fast.kernels import sparse_conv as sc

from conftest import DEVICE, HAS_CUDA, INTERPRETING, TOL

TRITON_DEVICE = torch.device(DEVICE)  # where Triton runs here: CUDA, or CPU tensors under the interpreter
needs_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRETING), reason="Triton needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setenv("KE_FAST_BACKEND", "triton" if (HAS_CUDA or INTERPRETING) else "reference")
    monkeypatch.setenv("KE_FAST_SPARSE", "auto")
    ops.reload_settings()
    dispatch.clear_sparse_decisions()
    yield
    dispatch.clear_sparse_decisions()


@pytest.fixture
def fake_timer(monkeypatch):
    """dispatch.path_seconds replaced: ``times[path]`` seconds for path "run_sparse" / "run_dense"; ``calls`` lists
    the paths timed."""
    state = {"times": {"run_sparse": 1.0, "run_dense": 2.0}, "calls": []}

    def path_seconds(fn, device):
        state["calls"].append(fn.__name__)
        return state["times"][fn.__name__]

    monkeypatch.setattr(dispatch, "path_seconds", path_seconds)
    return state


def _linear_case(k=70, n=9, rows=1, density=0.5, dtype=torch.float32, seed=0, device=TRITON_DEVICE):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    m = torch.rand(n, k, generator=g) < density
    x = torch.randn(rows, k, generator=g).to(dtype)
    return x.to(device), sc.compress(w.to(device), m.to(device)), (w * m).to(device)


@needs_triton
def test_decision_cached_per_shape_and_dtype_and_cleared(fake_timer):
    x, cw, wm = _linear_case()
    out = dispatch.sparse_linear(x, cw)
    torch.testing.assert_close(out, F.linear(x, wm), **TOL[torch.float32])
    assert fake_timer["calls"] == ["run_sparse", "run_dense"]
    assert list(dispatch.sparse_decisions().values()) == ["sparse"]
    dispatch.sparse_linear(x, cw)
    assert len(fake_timer["calls"]) == 2  # cached: not timed again
    fake_timer["times"] = {"run_sparse": 3.0, "run_dense": 2.0}
    x3 = torch.cat([x, x, x])
    torch.testing.assert_close(dispatch.sparse_linear(x3, cw), F.linear(x3, wm), **TOL[torch.float32])
    assert len(fake_timer["calls"]) == 4  # another row count: another decision
    dispatch.sparse_linear(x.half(), cw)
    assert len(fake_timer["calls"]) == 6  # another dtype: another decision
    decisions = dispatch.sparse_decisions()
    assert sorted(decisions.values()) == ["dense", "dense", "sparse"]
    keys = sorted(decisions)
    assert any("|x1x70|float32|" in k for k in keys) and any("|x3x70|float32|" in k for k in keys)
    assert any("|x1x70|float16|" in k for k in keys)
    assert all(f"|{x.device}|" in k for k in keys)
    dispatch.clear_sparse_decisions()
    assert dispatch.sparse_decisions() == {}
    dispatch.sparse_linear(x, cw)
    assert len(fake_timer["calls"]) == 8  # cleared: timed again


def test_decision_key_names_the_device():
    x, cw, _ = _linear_case(device="cpu")
    other = "cuda:0" if HAS_CUDA else "meta"
    keys = {dispatch._key_str(dispatch._decision_key("linear", cw, x.to(d), True)) for d in ("cpu", other)}
    assert len(keys) == 2 and {k.split("|")[6] for k in keys} == {"cpu", other}
    assert all(dispatch._key_str(dispatch._key_from_str(k)) == k for k in keys)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device next to the CPU")
def test_decision_per_device_cuda_and_cpu(fake_timer, monkeypatch):
    x, cw, _ = _linear_case(device="cuda")
    dispatch.sparse_linear(x, cw)
    monkeypatch.setenv("KE_FAST_BACKEND", "auto")
    ops.reload_settings()
    xc, cwc, _ = _linear_case(device="cpu")
    dispatch.sparse_linear(xc, cwc)  # the CPU has no sparse kernel: dense, nothing timed or cached
    assert len(fake_timer["calls"]) == 2 and len(dispatch.sparse_decisions()) == 1


@needs_triton
def test_conv_decision_and_geometry_in_key(fake_timer):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, 3, 3, generator=g)
    m = torch.rand(w.shape, generator=g) < 0.5
    x = torch.randn(1, 5, 5, 5, generator=g).to(TRITON_DEVICE)
    cw = sc.compress(w.to(TRITON_DEVICE), m.to(TRITON_DEVICE))
    for stride in (1, 2):
        out = dispatch.sparse_conv2d(x, cw, None, stride, 1)
        torch.testing.assert_close(out, F.conv2d(x, (w * m).to(TRITON_DEVICE), None, stride, 1), **TOL[torch.float32])
    assert len(dispatch.sparse_decisions()) == 2 and len(fake_timer["calls"]) == 4


@needs_triton
def test_env_on_off_skip_timing(fake_timer, monkeypatch):
    x, cw, wm = _linear_case()
    for env in ("on", "off"):
        monkeypatch.setenv("KE_FAST_SPARSE", env)
        ops.reload_settings()
        torch.testing.assert_close(dispatch.sparse_linear(x, cw), F.linear(x, wm), **TOL[torch.float32])
    assert fake_timer["calls"] == [] and dispatch.sparse_decisions() == {}


@needs_triton
def test_real_timing_picks_a_path(monkeypatch):
    """Timed for real: both paths run and the decision is cached (the interpreter always loses to F.linear)."""
    x, cw, wm = _linear_case(k=40, n=8)
    torch.testing.assert_close(dispatch.sparse_linear(x, cw), F.linear(x, wm), **TOL[torch.float32])
    (choice,) = dispatch.sparse_decisions().values()
    if INTERPRETING and not HAS_CUDA:
        assert choice == "dense"


@needs_triton
def test_save_load_decisions(fake_timer, tmp_path):
    x, cw, _ = _linear_case()
    dispatch.sparse_linear(x, cw)
    dispatch.sparse_linear(torch.cat([x, x]), cw)
    saved = dispatch.sparse_decisions()
    path = tmp_path / "model.sparse.json"
    dispatch.save_sparse_decisions(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == dispatch.DECISIONS_FORMAT and doc["decisions"] == saved
    assert set(doc["devices"]) == {str(x.device)}
    dispatch.clear_sparse_decisions()
    assert dispatch.load_sparse_decisions(path) == 2
    assert dispatch.sparse_decisions() == saved
    dispatch.sparse_linear(x, cw)
    assert len(fake_timer["calls"]) == 4  # loaded: not timed again
    doc["devices"] = {k: "another device" for k in doc["devices"]}
    path.write_text(json.dumps(doc))
    dispatch.clear_sparse_decisions()
    assert dispatch.load_sparse_decisions(path) == 0 and dispatch.sparse_decisions() == {}
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format"):
        dispatch.load_sparse_decisions(path)
    doc["devices"] = {str(x.device): dispatch._device_names()[str(x.device)]}
    doc["decisions"]["bogus|key"] = "sparse"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not a sparse decision key"):
        dispatch.load_sparse_decisions(path)
    assert dispatch.sparse_decisions() == {}  # a bad file adds nothing


# ---- the kept W*M ----------------------------------------------------------------------------------

def _wels_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 10))
    ke_fast.split(net, "wels", 0.5, seed=seed)
    return net.eval(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _fit(net, x):
    with torch.no_grad(), ke_fast.fit_only(net):
        return net(x)


@pytest.fixture
def decompress_calls(monkeypatch):
    calls = []
    real = kformat.decompress

    def counting(cw):
        calls.append(cw.shape)
        return real(cw)

    monkeypatch.setattr(kformat, "decompress", counting)
    return calls


@pytest.mark.parametrize("keep", [True, False])
def test_dense_path_keeps_wm(keep, decompress_calls, monkeypatch):
    monkeypatch.setenv("KE_FAST_BACKEND", "reference")  # the dense path on every layer
    ops.reload_settings()
    net, x = _wels_net()
    sparse = ke_fast.extract_sparse(net, keep_dense=keep)
    layers = [m for m in sparse.modules() if isinstance(m, SparseConv2d | SparseLinear)]
    assert len(decompress_calls) == (len(layers) if keep else 0)
    assert all((m.dense is not None) == keep for m in layers)
    assert not any(k.endswith(".dense") for k in sparse.state_dict())  # not saved: rebuilt from the compressed
    before = len(decompress_calls)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(sparse(x), _fit(net, x), **TOL[torch.float32])
    assert len(decompress_calls) - before == (0 if keep else 2 * len(layers))


def test_kept_wm_rebuilt_after_load_state_dict(monkeypatch):
    monkeypatch.setenv("KE_FAST_BACKEND", "reference")
    ops.reload_settings()
    net_a, x = _wels_net(0)
    net_b, _ = _wels_net(1)
    a, b = ke_fast.extract_sparse(net_a), ke_fast.extract_sparse(net_b)
    b.load_state_dict(a.state_dict())
    for ma, mb in zip(a.modules(), b.modules()):
        if isinstance(ma, SparseConv2d | SparseLinear):
            assert torch.equal(ma.dense, mb.dense)
    with torch.no_grad():
        torch.testing.assert_close(b(x), _fit(net_a, x), **TOL[torch.float32])


def test_kept_wm_follows_dtype_and_refresh(monkeypatch):
    monkeypatch.setenv("KE_FAST_BACKEND", "reference")
    ops.reload_settings()
    net, x = _wels_net()
    sparse = ke_fast.extract_sparse(net).double()
    layer = next(m for m in sparse.modules() if isinstance(m, SparseLinear))
    assert layer.dense.dtype == layer.values.dtype == torch.float64
    with torch.no_grad():
        layer.values.mul_(2)
    layer.refresh_dense()
    assert torch.equal(layer.dense, kformat.decompress(layer.compressed))


# ---- whole fit networks under torch.compile ---------------------------------------------------------

def _graphs_of(model, x, **compile_kwargs):
    """Compile with fullgraph=True and a backend that records the FX graphs; returns (output, graphs)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend, **compile_kwargs)
    with torch.no_grad():
        return compiled(x), graphs


def _targets(graphs):
    return {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}


def test_extract_sparse_compiles_fullgraph_without_timing(fake_timer):
    """Dynamo traces the dispatcher: one graph; nothing is timed while tracing (no cached decision: the static
    rule, nothing cached); after an eager warm-up the graph holds the path each cached decision names."""
    net, x = _wels_net()
    ref = _fit(net, x)
    sparse = ke_fast.extract_sparse(net).to(TRITON_DEVICE)
    xd = x.to(TRITON_DEVICE)
    out, graphs = _graphs_of(sparse, xd)
    assert len(graphs) == 1 and fake_timer["calls"] == [] and dispatch.sparse_decisions() == {}
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])
    if not (HAS_CUDA or INTERPRETING):
        return
    for faster, in_graph in (("run_sparse", True), ("run_dense", False)):
        dispatch.clear_sparse_decisions()
        fake_timer["times"] = {"run_sparse": 1.0, "run_dense": 2.0} if faster == "run_sparse" else \
            {"run_sparse": 2.0, "run_dense": 1.0}
        with torch.no_grad():
            sparse(xd)  # eager warm-up: every layer decided (by the fake timer)
        assert len(dispatch.sparse_decisions()) == 3
        calls = len(fake_timer["calls"])
        out, graphs = _graphs_of(sparse, xd)
        assert len(graphs) == 1 and len(fake_timer["calls"]) == calls
        targets = _targets(graphs)
        assert ("ke_fast.sparse_conv2d.default" in targets) == in_graph
        assert ("ke_fast.sparse_linear.default" in targets) == in_graph
        torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


def test_static_choice_boundaries():
    assert dispatch.static_choice(dispatch.SPARSE_MAX_ROWS, dispatch.SPARSE_MAX_DENSITY)
    assert not dispatch.static_choice(dispatch.SPARSE_MAX_ROWS + 1, 0.5)
    assert not dispatch.static_choice(1, dispatch.SPARSE_MAX_DENSITY + 0.01)


@pytest.mark.parametrize("split_rate", [0.5, 0.9])
def test_static_rule_while_tracing(fake_timer, split_rate):
    """Without a cached decision, torch.compile's trace takes dispatch.static_choice per layer (nothing timed,
    nothing cached). _wels_net's GEMM rows at batch 2: conv 3->8 on 8x8 (padding 1) 128, conv 8->8 stride 2
    18, linear 2; at split rate 0.5 (density <= 0.7) the last two are sparse, at 0.9 none is."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 10))
    ke_fast.split(net, "wels", split_rate, seed=0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sparse = ke_fast.extract_sparse(net.eval()).to(TRITON_DEVICE)
    layers = [m for m in sparse.modules() if isinstance(m, SparseConv2d | SparseLinear)]
    densities = [kformat.density_of(m.compressed) for m in layers]
    assert all(d <= dispatch.SPARSE_MAX_DENSITY for d in densities) == (split_rate == 0.5)
    _, graphs = _graphs_of(sparse, x.to(TRITON_DEVICE))
    nodes = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert fake_timer["calls"] == [] and dispatch.sparse_decisions() == {}
    triton = HAS_CUDA or INTERPRETING  # elsewhere the implementation is not Triton: every layer dense
    want = [triton and dispatch.static_choice(rows, d) for rows, d in zip((128, 18, 2), densities)]
    assert want == ([False, True, True] if triton and split_rate == 0.5 else [False, False, False])
    assert nodes.count("ke_fast.sparse_conv2d.default") == sum(want[:2])
    assert nodes.count("ke_fast.sparse_linear.default") == want[2]


def test_extract_slim_compiles_fullgraph():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10))
    ke_fast.split(net, "kels", 0.5, seed=0)
    net.eval()
    x = torch.randn(1, 3, 8, 8)
    slim = ke_fast.extract_slim(net).eval()
    out, graphs = _graphs_of(slim, x)
    assert len(graphs) == 1
    torch.testing.assert_close(out, _fit(net, x), **TOL[torch.float32])


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need CUDA")
def test_extract_sparse_reduce_overhead_cuda():
    """mode="reduce-overhead" (CUDA graphs) on the sparse network, decisions made by an eager warm-up."""
    net, x = _wels_net()
    net, x = net.cuda(), x.cuda()
    sparse = ke_fast.extract_sparse(net)
    with torch.no_grad():
        sparse(x)
        torch._dynamo.reset()
        compiled = torch.compile(sparse, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            out = compiled(x).clone()
    torch.testing.assert_close(out, _fit(net, x), **TOL[torch.float32])
