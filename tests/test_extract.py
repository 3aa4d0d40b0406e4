"""extract_slim (KELS slim network) and extract_sparse (WELS compressed network): both must compute what the
fit-only forward of the split model computes (eval mode, BatchNorm statistics from a few train-mode
forwards), be plain / sparse modules without any MaskedLayer, and (sparse) survive a state_dict round trip
and refuse corrupt checkpoints. Also the sparse/dense dispatcher ``ke_fast.dispatch.use_sparse``."""
import io

import pytest
import torch
from torch import nn

import ke_fast
from ke_fast import MaskedLayer, SparseConv2d, SparseLinear
from ke_fast.extract import count_macs, count_params, extract_slim, extract_sparse, slim_report
from ke_fast.models import MLP, DenseNetTiny, resnet18, resnet50
from ke_fast.dispatch import use_sparse
from ke_fast.ops import reload_settings

from conftest import DEVICE, PAIRS, TOL, Impl
from test_convert import Conv2dSameLike, StdConv2dLike

FP32 = TOL[torch.float32]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """Masked layers on the PyTorch reference unless a test picks an implementation: the tests here are about
    extraction, not kernels (test_extract_sparse_equals_fit_only runs the kernels on every device)."""
    monkeypatch.setenv("KE_FAST_BACKEND", "reference")
    monkeypatch.delenv("KE_FAST_SPARSE", raising=False)
    reload_settings()


def build(name, seed=0):
    torch.manual_seed(seed)
    if name == "resnet18":
        return resnet18(num_classes=10, width=8, stem="small"), (1, 3, 6, 6)
    if name == "resnet50":
        return resnet50(num_classes=10, width=8), (2, 3, 32, 32)
    if name == "densenet":
        return DenseNetTiny(num_classes=10), (2, 3, 8, 8)
    if name == "mlp":
        return MLP(48, hidden=(40, 24), num_classes=10), (3, 3, 4, 4)
    raise AssertionError(name)


def prepared(name, mode, *, seed=0, split_seed=0):
    """A split model in eval mode whose BatchNorm running statistics come from two train-mode forwards."""
    model, shape = build(name, seed)
    ke_fast.split(model, mode, 0.5, seed=split_seed)
    gen = torch.Generator().manual_seed(100 + seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn((4, *shape[1:]), generator=gen) * 1.7 + 0.3)
    model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    return model, x


def fit_forward(model, x):
    with torch.no_grad(), ke_fast.fit_only(model):
        return model(x)


def no_masked(model):
    return not any(isinstance(m, MaskedLayer) for m in model.modules())


def nontrivial_bn(model):
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return all(not torch.equal(b.running_mean, torch.zeros_like(b.running_mean)) for b in bns)


# ---- KELS: slim network --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet", "mlp"])
def test_extract_slim_equals_fit_only(name):
    model, x = prepared(name, "kels")
    assert nontrivial_bn(model)
    ref = fit_forward(model, x)
    slim = extract_slim(model)
    assert no_masked(slim)
    for m in slim.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            assert type(m) in (nn.Conv2d, nn.Linear)
            assert not hasattr(m, "fit_mask")
    # slimmer than the split model, and the split model itself is untouched
    assert count_params(slim) < count_params(model)
    assert all(isinstance(m, MaskedLayer) for _, m in ke_fast.masked_layers(model))
    slim.eval()
    with torch.no_grad():
        out = slim(x)
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(fit_forward(model, x), ref, rtol=0, atol=0)


def test_slim_param_ratio_resnet18_imagenet():
    torch.manual_seed(0)
    model = resnet18(num_classes=1000, width=64)
    dense = count_params(model)
    ke_fast.split(model, "kels", 0.5)
    slim = extract_slim(model)
    n = count_params(slim)
    ratio = n / dense
    print(f"\nresnet18 width 64 / 1000 classes, KELS 0.5: slim {n} / dense {dense} params = {ratio:.4f}")
    assert dense == 11_689_512
    assert 0.24 <= ratio <= 0.27


def test_slim_report_consistent():
    model, x = prepared("resnet18", "kels")
    slim = extract_slim(model)
    rep = slim_report(model, slim, x)
    print(f"\nslim_report resnet18 width 8: {rep}")
    assert rep["dense_params"] == count_params(model)
    assert rep["slim_params"] == count_params(slim)
    assert rep["param_ratio"] == pytest.approx(rep["slim_params"] / rep["dense_params"])
    assert rep["dense_macs"] == count_macs(model, x)
    assert rep["slim_macs"] == count_macs(slim, x)
    assert rep["mac_ratio"] == pytest.approx(rep["slim_macs"] / rep["dense_macs"])
    assert 0 < rep["slim_params"] < rep["dense_params"] and 0 < rep["slim_macs"] < rep["dense_macs"]
    # KELS 0.5 keeps about a quarter of the interior layers
    assert 0.2 < rep["param_ratio"] < 0.35 and 0.2 < rep["mac_ratio"] < 0.4
    # count_macs leaves the training flag as it found it
    model.train()
    count_macs(model, x)
    assert model.training


def test_extract_slim_on_wels_raises():
    """extract_slim's docstring: "Raises ValueError when the masks are not channel-consistent (e.g. WELS
    masks, ...)". If it returns a network instead, the test fails, saying whether that network at least
    computes the fit hypothesis."""
    model, x = prepared("resnet18", "wels")
    try:
        slim = extract_slim(model)
    except ValueError:
        return
    with torch.no_grad():
        out = slim.eval()(x)
    ref = fit_forward(model, x)
    same = torch.allclose(out, ref, **FP32)
    pytest.fail("extract_slim on a WELS-split model did not raise ValueError as its docstring promises; "
                f"it returned a network with {count_params(slim)} of {count_params(model)} parameters "
                f"(nothing slimmed) whose output {'equals' if same else 'DIFFERS from'} the fit-only forward")


def test_extract_slim_unsplit_raises():
    model, _ = build("mlp")
    with pytest.raises(ValueError):
        extract_slim(model)


# ---- WELS: sparse network ------------------------------------------------------------------------

@pytest.fixture
def spy(monkeypatch):
    """Records which path (triton / reference) the dispatcher chose for each sparse conv / linear call."""
    calls = []
    real = ke_fast.dispatch.use_sparse

    def use_sparse_spy(*a, **kw):
        sparse = real(*a, **kw)
        calls.append("triton" if sparse else "reference")
        return sparse

    monkeypatch.setattr(ke_fast.dispatch, "use_sparse", use_sparse_spy)
    return calls


KERNEL_PAIRS = [p for p in PAIRS if p[0] != "reference"]


@pytest.mark.parametrize("pair", KERNEL_PAIRS, ids=[f"{n}-{d}" for n, d in KERNEL_PAIRS])
@pytest.mark.parametrize("sparse_env", ["on", "off"])
@pytest.mark.parametrize("mode", ["wels", "kels"])
@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_extract_sparse_equals_fit_only(name, mode, sparse_env, pair, monkeypatch, spy):
    impl = Impl(*pair)
    model, x = prepared(name, mode)  # BatchNorm warm-up on the reference implementation (fast)
    model, x = model.to(impl.device), x.to(impl.device)
    monkeypatch.setenv("KE_FAST_BACKEND", impl.name)
    monkeypatch.setenv("KE_FAST_SPARSE", sparse_env)
    reload_settings()
    assert nontrivial_bn(model)
    ref = fit_forward(model, x)
    sparse = extract_sparse(model)
    assert no_masked(sparse)
    n_layers = len(ke_fast.masked_layers(model))
    kinds = [m for m in sparse.modules() if isinstance(m, SparseConv2d | SparseLinear)]
    assert len(kinds) == n_layers
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in sparse.modules())
    assert any(isinstance(m, SparseLinear) for m in kinds)
    assert (name == "resnet18") == any(isinstance(m, SparseConv2d) for m in kinds)
    assert not sparse.training
    with torch.no_grad():
        out = sparse(x)
    torch.testing.assert_close(out, ref, **FP32)
    want = "triton" if (impl.name == "triton" and sparse_env == "on") else "reference"
    assert spy == [want] * n_layers


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_sparse_state_dict_round_trip(name):
    model, x = prepared(name, "wels")
    src = extract_sparse(model)
    with torch.no_grad():
        want = src(x)
    other, _ = prepared(name, "wels", seed=1, split_seed=1)
    dst = extract_sparse(other)
    first = next(m for m in dst.modules() if isinstance(m, SparseConv2d | SparseLinear))
    src_first = next(m for m in src.modules() if isinstance(m, SparseConv2d | SparseLinear))
    assert first.values.numel() != src_first.values.numel()  # sizes really are adopted from the checkpoint
    with torch.no_grad():
        assert not torch.allclose(dst(x), want)
    dst.load_state_dict(_save_load(src.state_dict()))
    assert first.values.numel() == src_first.values.numel()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), want, rtol=0, atol=0)


def _corrupt(sd, layer, how):
    sd = {k: v.clone() for k, v in sd.items()}
    if how == "values_truncated":
        sd[f"{layer}.values"] = sd[f"{layer}.values"][:-1].clone()
    elif how == "offsets_changed":
        sd[f"{layer}.offsets"][-1, 0] += 1
    elif how == "bits_flipped":
        sd[f"{layer}.bits"][0, 0] ^= 1 << 3
    else:
        raise AssertionError(how)
    return sd


CORRUPT_LAYER = {"resnet18": "layer1.0.conv2", "mlp": "body.0"}


@pytest.mark.parametrize("how", ["values_truncated", "offsets_changed", "bits_flipped"])
@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_sparse_corrupt_own_state_dict_rejected(name, how):
    """A corrupted copy of the model's own checkpoint: RuntimeError naming the layer; nothing changes."""
    model, x = prepared(name, "wels")
    dst = extract_sparse(model)
    with torch.no_grad():
        before = dst(x)
    layer = CORRUPT_LAYER[name]
    bad = _corrupt(_save_load(dst.state_dict()), layer, how)
    with pytest.raises(RuntimeError, match="compressed") as info:
        dst.load_state_dict(bad)
    assert layer in str(info.value)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["values_truncated", "offsets_changed", "bits_flipped"])
@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_sparse_corrupt_foreign_state_dict_leaves_target_unchanged(name, how):
    """A corrupted checkpoint of a differently seeded model: RuntimeError naming the layer, and the target
    model still computes what it computed before (no layer half-loaded from the rejected checkpoint)."""
    model, x = prepared(name, "wels")
    src = extract_sparse(model)
    other, _ = prepared(name, "wels", seed=1, split_seed=1)
    dst = extract_sparse(other)
    with torch.no_grad():
        before = dst(x)
    layer = CORRUPT_LAYER[name]
    bad = _corrupt(_save_load(src.state_dict()), layer, how)
    with pytest.raises(RuntimeError, match="compressed") as info:
        dst.load_state_dict(bad)
    assert layer in str(info.value)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), before, rtol=0, atol=0)


def test_extract_sparse_unsplit_raises():
    model, _ = build("resnet18")
    with pytest.raises(ValueError, match="split"):
        extract_sparse(model)


def test_extract_sparse_grouped_conv_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 5))
    ke_fast.split(model, "wels", 0.5)
    with pytest.raises(ValueError, match="groups"):
        extract_sparse(model)


def test_extract_sparse_depthwise_ok():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6),
                          nn.Flatten(), nn.Linear(6 * 5 * 5, 4)).eval()
    ke_fast.split(model, "wels", 0.5)
    x = torch.randn(2, 3, 5, 5)
    sparse = extract_sparse(model)
    assert no_masked(sparse)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), fit_forward(model, x), **FP32)


# ---- subclasses of the torch layers --------------------------------------------------------------

class _TaggedConv2d(nn.Conv2d):
    """A subclass that keeps the torch forward and only adds a method."""

    def tag(self):
        return "tagged"


def _with_subclass(cls):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), cls(6, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("cls", [StdConv2dLike, Conv2dSameLike])
def test_extract_refuses_subclass_with_a_forward_of_its_own(cls):
    """Weight standardisation over a filter's kept inputs only, or a plain conv without the padding computed
    in forward, would not be the fit hypothesis: both extractions refuse the layer by name."""
    for mode, extract in (("kels", extract_slim), ("wels", extract_sparse)):
        model = ke_fast.split(_with_subclass(cls), mode, 0.5)
        with pytest.raises(ValueError, match=rf"layer '2' is a {cls.__qualname__}, whose own forward"):
            extract(model)


@pytest.mark.parametrize("mode", ["kels", "wels"])
def test_extract_subclass_with_the_torch_forward_equals_fit_only(mode):
    model = ke_fast.split(_with_subclass(_TaggedConv2d), mode, 0.5)
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    out = extract_slim(model) if mode == "kels" else extract_sparse(model)
    assert no_masked(out)
    if mode == "kels":
        assert type(out[2]) is _TaggedConv2d and out[2].tag() == "tagged" and out[2].out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(out(x), fit_forward(model, x), **FP32)


# ---- the dispatcher ------------------------------------------------------------------------------

CPU = torch.device("cpu")
TRITON_DEVICE = torch.device(DEVICE)  # where Triton runs on this host: CUDA, or the CPU under the interpreter


@pytest.mark.parametrize("sparse_env", ["auto", "on", "off"])
def test_use_sparse_cpp_never(monkeypatch, sparse_env):
    monkeypatch.setenv("KE_FAST_BACKEND", "cpp")
    monkeypatch.setenv("KE_FAST_SPARSE", sparse_env)
    reload_settings()
    assert use_sparse(1, 0.1, CPU) is False
    assert use_sparse(10_000, 1.0, CPU) is False


def test_use_sparse_respects_env(monkeypatch):
    dev = TRITON_DEVICE
    monkeypatch.setenv("KE_FAST_BACKEND", "triton")
    monkeypatch.setenv("KE_FAST_SPARSE", "off")
    reload_settings()
    assert use_sparse(1, 0.1, dev) is False
    monkeypatch.setenv("KE_FAST_SPARSE", "on")
    reload_settings()
    assert use_sparse(1, 0.1, dev) is True
    assert use_sparse(10_000, 1.0, dev) is True
    monkeypatch.setenv("KE_FAST_SPARSE", "auto")
    reload_settings()
    assert use_sparse(1, 0.5, dev) is True
    assert use_sparse(10_000, 0.5, dev) is False
    assert use_sparse(1, 0.95, dev) is False
    monkeypatch.delenv("KE_FAST_SPARSE")
    reload_settings()
    assert use_sparse(1, 0.5, dev) is True


@pytest.mark.parametrize("pair", KERNEL_PAIRS, ids=[f"{n}-{d}" for n, d in KERNEL_PAIRS])
def test_use_sparse_bogus_env_raises(monkeypatch, pair):
    monkeypatch.setenv("KE_FAST_BACKEND", pair[0])
    monkeypatch.setenv("KE_FAST_SPARSE", "bogus")
    reload_settings()
    with pytest.raises(ValueError, match="KE_FAST_SPARSE"):
        use_sparse(1, 0.5, torch.device(pair[1]))
