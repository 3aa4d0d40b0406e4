"""split / revert / adopt / reinit_ / fit_only on whole models: KELS and WELS rules per layer, graph roles
(first layer, classifier, residual adds, concatenations), all-or-nothing error handling."""
import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import ke_fast
import ke_fast.kernels as K
from ke_fast import MaskedConv2d, MaskedLayer, MaskedLinear
from ke_fast.models import MLP, DenseNetTiny, resnet18, resnet50
from ke_fast.ops import reload_settings
from ke_fast.state import split_state

from conftest import PAIRS


def c(s, n):
    return math.ceil(s * n)


def kels_expected(shape, s, *, first=False, last=False, segments=None):
    mask = torch.zeros(shape, dtype=torch.bool)
    rows = shape[0] if last else c(s, shape[0])
    if first:
        mask[:rows] = True
    elif segments is not None:
        assert sum(segments) == shape[1]
        start = 0
        for seg in segments:
            mask[:rows, start:start + c(s, seg)] = True
            start += seg
    else:
        mask[:rows, :c(s, shape[1])] = True
    return mask


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_unsplit(model, sd_before, classes_before):
    assert not ke_fast.masked_layers(model)
    assert not any(isinstance(m, MaskedLayer) for m in model.modules())
    assert [type(m) for m in model.modules()] == classes_before
    assert same_state(state(model), sd_before)


def build(name):
    torch.manual_seed(0)
    if name == "resnet18":
        return resnet18(num_classes=10, width=8)
    if name == "resnet50":
        return resnet50(num_classes=10, width=8)
    if name == "densenet":
        return DenseNetTiny(num_classes=10)
    if name == "mlp":
        return MLP(in_features=20, hidden=(17, 9), num_classes=5)
    raise KeyError(name)


FIRST = {"resnet18": "conv1", "resnet50": "conv1", "densenet": "stem", "mlp": "body.0"}
LAST = {"resnet18": "fc", "resnet50": "fc", "densenet": "classifier", "mlp": "classifier"}
# DenseNetTiny(growth=8, layers_per_block=(3, 3), init_channels=16): concatenation inputs, segment by segment
DENSE_SEGMENTS = {
    "features.1.conv": [16, 8],
    "features.2.conv": [16, 8, 8],
    "features.3.conv": [16, 8, 8, 8],  # the transition reads the whole first block
    "features.5.conv": [20, 8],
    "features.6.conv": [20, 8, 8],
    "classifier": [20, 8, 8, 8],  # pooled features of the last block's concatenation
}

# ---------------------------------------------------------------- KELS rules


@pytest.mark.parametrize("s", [0.5, 0.3])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet", "mlp"])
def test_kels_pattern_per_layer(name, s):
    model = build(name)
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    ke_fast.split(model, "kels", s)
    masks = ke_fast.masks(model)
    assert list(masks) == [n for n, _ in layers]  # every conv/linear converted, nothing else
    for n, m in layers:
        assert isinstance(m, MaskedLayer) and m.split_mode == "kels"
        segs = DENSE_SEGMENTS.get(n) if name == "densenet" else None
        want = kels_expected(m.weight.shape, s, first=n == FIRST[name], last=n == LAST[name], segments=segs)
        assert torch.equal(masks[n], want), n


def test_kels_first_conv_and_classifier_explicit():
    model = ke_fast.split(build("resnet18"), "kels", 0.5)
    m = ke_fast.masks(model)
    assert m["conv1"].shape == (8, 3, 7, 7)
    assert m["conv1"][:4].all() and not m["conv1"][4:].any()  # all 3 input channels, first 4 filters
    assert m["fc"].shape == (10, 64)
    assert m["fc"][:, :32].all() and not m["fc"][:, 32:].any()  # all 10 outputs, first 32 inputs
    assert m["layer2.0.conv1"][:8, :4].all() and m["layer2.0.conv1"].sum() == 8 * 4 * 9


def test_densenet_concat_segments_explicit():
    """The second dense layer of block 1 reads cat(stem_out[16], growth[8]): keep 0..7 and 16..19, first 4 filters."""
    model = ke_fast.split(build("densenet"), "kels", 0.5)
    m = ke_fast.masks(model)["features.1.conv"]
    assert m.shape == (8, 24, 3, 3)
    per_channel = m.all(dim=(2, 3))
    assert torch.equal(m.any(dim=(2, 3)), per_channel)  # whole kernels, never part of one
    assert torch.equal(per_channel.any(dim=1), torch.tensor([True] * 4 + [False] * 4))  # first 4 filters
    want_inputs = torch.zeros(24, dtype=torch.bool)
    want_inputs[0:8] = True  # first half of the stem segment (16 channels)
    want_inputs[16:20] = True  # first half of the growth segment (8 channels)
    assert torch.equal(per_channel[:4], want_inputs.expand(4, -1))
    assert int(m.sum()) == 4 * 12 * 9
    # the naive "first half of the inputs" rule would keep 0..11: channels 8..11 belong to the reset half
    # of the stem's output
    assert not m[:, 8:16].any()


def _kept_outputs(mask):
    return frozenset(mask.reshape(mask.shape[0], -1).any(dim=1).nonzero().flatten().tolist())


def _kept_inputs(mask):
    return frozenset(mask.transpose(0, 1).reshape(mask.shape[1], -1).any(dim=1).nonzero().flatten().tolist())


@pytest.mark.parametrize("s", [0.5, 0.3])
def test_kels_residual_adds_are_channel_consistent(s):
    model = ke_fast.split(build("resnet18"), "kels", s)
    m = ke_fast.masks(model)
    stream = _kept_outputs(m["conv1"])  # channels carried by the residual stream
    for li in range(1, 5):
        for bi in range(2):
            p = f"layer{li}.{bi}"
            assert _kept_inputs(m[f"{p}.conv1"]) == stream, p
            out = _kept_outputs(m[f"{p}.conv2"])
            if f"{p}.downsample.0" in m:
                assert _kept_inputs(m[f"{p}.downsample.0"]) == stream
                assert _kept_outputs(m[f"{p}.downsample.0"]) == out, p
            else:
                assert out == stream, p  # identity shortcut: the add keeps the same channels
            assert _kept_outputs(m[f"{p}.conv1"]) == _kept_inputs(m[f"{p}.conv2"])
            stream = out
    assert _kept_inputs(m["fc"]) == stream


# ---------------------------------------------------------------- WELS


@pytest.mark.parametrize("s", [0.5, 0.2])
def test_wels_density_within_three_sigma(s):
    model = ke_fast.split(build("resnet18"), "wels", s, seed=0)
    for n, mask in ke_fast.masks(model).items():
        numel = mask.numel()
        sigma = math.sqrt(s * (1 - s) / numel)
        assert abs(mask.float().mean().item() - s) <= 3 * sigma, n
        layer = model.get_submodule(n)
        assert layer.density == pytest.approx(mask.float().mean().item())


def test_wels_seeds():
    a = ke_fast.masks(ke_fast.split(build("resnet18"), "wels", 0.5, seed=7))
    b = ke_fast.masks(ke_fast.split(build("resnet18"), "wels", 0.5, seed=7))
    d = ke_fast.masks(ke_fast.split(build("resnet18"), "wels", 0.5, seed=8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], d[k]) for k in a)
    # each layer has a stream of its own: two layers of the same shape get different masks
    assert not torch.equal(a["layer1.0.conv1"], a["layer1.0.conv2"])


def test_wels_independent_of_implementation_and_device(monkeypatch):
    out = {}
    for name, device in PAIRS:
        monkeypatch.setenv("KE_FAST_BACKEND", name)
        reload_settings()
        torch.manual_seed(0)
        model = MLP(in_features=20, hidden=(17, 9), num_classes=5).to(device)
        out[name, device] = {k: v.cpu() for k, v in ke_fast.masks(ke_fast.split(model, "wels", 0.5, seed=3)).items()}
    first = out[PAIRS[0]]
    for pair in PAIRS[1:]:
        assert all(torch.equal(first[k], out[pair][k]) for k in first), pair


# ---------------------------------------------------------------- grouped convs


def test_depthwise_conv_splits_under_kels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1),
                          nn.Flatten(), nn.Linear(4, 2))
    ke_fast.split(model, "kels", 0.5)
    m = ke_fast.masks(model)
    assert m["2"].shape == (8, 1, 3, 3)
    assert m["2"][:4].all() and not m["2"][4:].any()  # first 4 channels, the same as conv 0 keeps
    assert _kept_outputs(m["0"]) == _kept_outputs(m["2"]) == _kept_inputs(m["3"])
    with ke_fast.fit_only(model):
        assert model(torch.randn(2, 3, 5, 5)).shape == (2, 2)


def test_grouped_conv_under_kels_raises_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(),
                          nn.Linear(8, 2))
    sd, classes = state(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="groups"):
        ke_fast.split(model, "kels", 0.5)
    assert_unsplit(model, sd, classes)
    assert type(model[0]) is nn.Conv2d  # the layer before the bad one was not converted either
    ke_fast.split(model, "wels", 0.5)  # WELS has no channel rule: grouped convs are fine
    assert isinstance(model[2], MaskedConv2d)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs", [dict(split_rate=0), dict(split_rate=-0.1), dict(split_rate=1.5),
                                    dict(mode="foo")], ids=["rate0", "rate-0.1", "rate1.5", "mode-foo"])
def test_bad_arguments_raise_and_change_nothing(kwargs):
    model = build("mlp")
    sd, classes = state(model), [type(m) for m in model.modules()]
    args = dict(mode="kels", split_rate=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError):
        ke_fast.split(model, args["mode"], args["split_rate"])
    assert_unsplit(model, sd, classes)


def test_model_without_layers_raises():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4))
    sd, classes = state(model), [type(m) for m in model.modules()]
    for mode in ("kels", "wels"):
        with pytest.raises(ValueError):
            ke_fast.split(model, mode, 0.5)
        assert_unsplit(model, sd, classes)


def test_split_twice_raises_and_keeps_first_split():
    model = ke_fast.split(build("mlp"), "wels", 0.5, seed=1)
    sd, masks = state(model), ke_fast.masks(model)
    with pytest.raises(ValueError):
        ke_fast.split(model, "wels", 0.5, seed=2)
    with pytest.raises(ValueError):
        ke_fast.split(model, "kels", 0.5)
    assert same_state(state(model), sd)
    after = ke_fast.masks(model)
    assert all(torch.equal(masks[k], after[k]) for k in masks)


# ---------------------------------------------------------------- revert


@pytest.mark.parametrize("mode", ["kels", "wels"])
def test_revert_restores_plain_classes_and_outputs(mode):
    model = build("resnet18").eval()
    classes, keys = [type(m) for m in model.modules()], list(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    ke_fast.split(model, mode, 0.5, seed=1)
    with torch.no_grad(), ke_fast.fit_only(model):
        assert not torch.allclose(model(x), before)
    ke_fast.revert(model)
    assert [type(m) for m in model.modules()] == classes
    assert list(model.state_dict()) == keys
    assert not any(hasattr(m, "fit_mask") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    ke_fast.split(model, mode, 0.5)  # and it can be split again


# ---------------------------------------------------------------- adopt


class OfficialKEConv(nn.Conv2d):
    """Mimics the official KE layer: a float 0/1 mask Parameter that is not trained."""

    def __init__(self, *args, split_rate=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        g = torch.Generator().manual_seed(self.out_channels)
        self.mask = nn.Parameter((torch.rand(self.weight.shape, generator=g) < split_rate).float(),
                                 requires_grad=False)

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def test_adopt_official_ke_mask():
    torch.manual_seed(0)
    model = nn.Sequential(OfficialKEConv(3, 6, 3, bias=False), nn.ReLU(), OfficialKEConv(6, 5, 3, padding=1,
                                                                                         bias=False))
    given = {n: m.mask.detach().bool().clone() for n, m in model.named_modules() if isinstance(m, OfficialKEConv)}
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        official = model(x)
    ke_fast.adopt(model)
    for n in given:
        layer = model.get_submodule(n)
        assert isinstance(layer, MaskedConv2d)
        assert not hasattr(layer, "mask") and "mask" not in dict(layer.named_parameters())
    got = ke_fast.masks(model)
    assert got.keys() == given.keys() and all(torch.equal(got[n], given[n]) for n in given)
    assert not any(k.endswith(".mask") for k in model.state_dict())
    with torch.no_grad(), ke_fast.fit_only(model):
        torch.testing.assert_close(model(x), official)


def test_adopt_torch_prune_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3))
    prune.random_unstructured(model[0], "weight", amount=0.4)
    weight_mask = model[0].weight_mask.clone().bool()
    weight_orig = model[0].weight_orig.detach().clone()
    assert weight_mask.any(dim=1).all()  # every row keeps a weight, so the bias is fit everywhere
    x = torch.randn(4, 13)
    with torch.no_grad():
        pruned = model(x)
    ke_fast.adopt(model, attr="weight_mask")
    layer = model[0]
    assert isinstance(layer, MaskedLinear) and type(model[2]) is nn.Linear
    assert torch.equal(ke_fast.masks(model)["0"], weight_mask)
    assert isinstance(layer.weight, nn.Parameter) and torch.equal(layer.weight, weight_orig)
    assert not hasattr(layer, "weight_orig") and not hasattr(layer, "weight_mask")
    assert not layer._forward_pre_hooks  # the pruning re-parametrisation is gone
    with torch.no_grad(), ke_fast.fit_only(model):
        torch.testing.assert_close(model(x), pruned)
    with torch.no_grad():
        assert not torch.allclose(model(x), pruned)  # dense mode uses weight_orig


class _ScaledConv(nn.Conv2d):
    """A user subclass with a forward of its own (it does more than the torch layer's)."""

    def forward(self, x):
        return 2.0 * super().forward(x) + 1.0


def test_adopt_pruned_subclass_keeps_its_own_forward():
    torch.manual_seed(0)
    model = nn.Sequential(_ScaledConv(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 5, 2))
    prune.random_unstructured(model[0], "weight", amount=0.5)
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    dense_values = model[0].weight_orig.detach().clone()
    unpruned = nn.Sequential(_ScaledConv(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 5, 2))
    with torch.no_grad():
        pruned = model(x)  # the subclass's forward on W*M
        unpruned[0].weight.copy_(dense_values)
        unpruned[0].bias.copy_(model[0].bias)
        unpruned[3].load_state_dict(model[3].state_dict())
        dense = unpruned(x)  # the subclass's forward on W
    ke_fast.adopt(model, attr="weight_mask", seed=4)
    assert isinstance(model[0], _ScaledConv) and isinstance(model[0], MaskedConv2d)
    assert type(model[0]) is ke_fast.nn.masked_class(_ScaledConv) and model[0].ke_seed == 4
    with torch.no_grad(), ke_fast.fit_only(model):
        torch.testing.assert_close(model(x), pruned)  # fit mode: the subclass's forward on W*M
    with torch.no_grad():
        assert torch.equal(model(x), dense)  # dense mode: the subclass's forward on the dense values
    assert torch.equal(model[0].weight, dense_values)
    ke_fast.revert(model)
    assert type(model[0]) is _ScaledConv


def test_adopt_wrong_shape_raises_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(OfficialKEConv(3, 6, 3, bias=False), nn.ReLU(), OfficialKEConv(6, 5, 3, bias=False))
    model[2].mask = nn.Parameter(torch.ones(5, 6, 2, 2), requires_grad=False)  # wrong shape on the 2nd layer
    sd, classes = state(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError):
        ke_fast.adopt(model)
    assert [type(m) for m in model.modules()] == classes
    assert same_state(state(model), sd)
    assert hasattr(model[0], "mask") and not ke_fast.masked_layers(model)


def test_adopt_non_binary_mask_raises():
    model = nn.Sequential(OfficialKEConv(3, 6, 3, bias=False))
    with torch.no_grad():
        model[0].mask[0, 0, 0, 0] = 0.5
    with pytest.raises(ValueError):
        ke_fast.adopt(model)
    assert type(model[0]) is OfficialKEConv


# ---------------------------------------------------------------- reinit_


def _reinit_pair(mode, seed=3):
    return ke_fast.split(build("resnet18"), mode, 0.5, seed=seed)


@pytest.mark.parametrize("mode", ["kels", "wels"])
def test_reinit_keeps_fit_and_redraws_reset(mode):
    model = _reinit_pair(mode)
    before = state(model)
    masks = ke_fast.masks(model)
    ke_fast.reinit_(model, 1)
    after = state(model)
    for n, m in masks.items():
        w0, w1 = before[f"{n}.weight"], after[f"{n}.weight"]
        assert torch.equal(w1[m].view(torch.int32), w0[m].view(torch.int32)), n  # bit-identical
        assert (w1[~m] != w0[~m]).all(), n
        bound = 1 / math.sqrt(K.fans_of(w0.shape)[0])
        assert (w1[~m].abs() <= bound).all(), n
    # BN and other non-masked tensors untouched
    for k in before:
        if not any(k == f"{n}.weight" or k == f"{n}.bias" for n in masks):
            assert torch.equal(before[k], after[k]), k
    # deterministic for a (seed, generation); generations differ
    again = _reinit_pair(mode)
    ke_fast.reinit_(again, 1)
    assert same_state(state(again), after)
    other = _reinit_pair(mode)
    ke_fast.reinit_(other, 2)
    o = state(other)
    for n, m in masks.items():
        assert (o[f"{n}.weight"][~m] != after[f"{n}.weight"][~m]).all(), n
    # a different run seed draws different resets
    seeded = _reinit_pair(mode, seed=4)
    if mode == "kels":  # same masks under KELS: compare the reset entries directly
        ke_fast.reinit_(seeded, 1)
        s = state(seeded)
        assert all((s[f"{n}.weight"][~m] != after[f"{n}.weight"][~m]).all() for n, m in masks.items())


def test_reinit_redraws_reset_biases():
    torch.manual_seed(0)
    model = MLP(in_features=20, hidden=(17, 9), num_classes=5)
    ke_fast.split(model, "kels", 0.5, seed=1)
    with torch.no_grad():
        for _, m in ke_fast.masked_layers(model):
            m.bias.fill_(5.0)  # far outside the reset distribution
    ke_fast.reinit_(model, 1)
    for name, fan_in, out, kept in (("body.0", 20, 17, 9), ("body.2", 17, 9, 5), ("classifier", 9, 5, 5)):
        b = model.get_submodule(name).bias.detach()
        assert b.shape == (out,)
        assert (b[:kept] == 5.0).all(), name  # fit outputs keep their bias
        reset = b[kept:]
        assert (reset != 5.0).all() and (reset.abs() <= 1 / math.sqrt(fan_in)).all(), name
        if reset.numel() > 2:
            assert len(set(reset.tolist())) == reset.numel()  # drawn, not a constant


def test_reinit_without_split_raises():
    with pytest.raises(ValueError):
        ke_fast.reinit_(build("mlp"), 1)


# ---------------------------------------------------------------- fit_only


def test_fit_only_switches_and_restores():
    model = ke_fast.split(build("mlp"), "kels", 0.5)
    model.classifier.set_mode("fit")
    before = [m.mode for _, m in ke_fast.masked_layers(model)]
    assert before == ["dense", "dense", "fit"]
    x = torch.randn(3, 20)
    with ke_fast.fit_only(model) as got:
        assert got is model
        assert all(m.mode == "fit" for _, m in ke_fast.masked_layers(model))
        fit = model(x)
    assert [m.mode for _, m in ke_fast.masked_layers(model)] == before
    with pytest.raises(RuntimeError, match="boom"):
        with ke_fast.fit_only(model):
            assert all(m.mode == "fit" for _, m in ke_fast.masked_layers(model))
            raise RuntimeError("boom")
    assert [m.mode for _, m in ke_fast.masked_layers(model)] == before
    ke_fast.set_mode(model, "fit")
    assert torch.equal(model(x), fit)
    ke_fast.set_mode(model, "dense")
    assert not torch.equal(model(x), fit)
    with pytest.raises(ValueError):
        ke_fast.set_mode(model, "bogus")


# ---------------------------------------------------------------- untraceable models


class Untraceable(nn.Module):
    """Data-dependent control flow; modules registered in an order unlike the execution order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 4)
        self.body = nn.Conv2d(8, 6, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = F.relu(x)
        else:
            x = -x
        x = self.body(x)
        return self.head(x.mean(dim=(2, 3)))


def test_untraceable_needs_example_input():
    torch.manual_seed(0)
    model = Untraceable()
    sd, classes = state(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="example_input"):
        ke_fast.split(model, "kels", 0.5)
    assert_unsplit(model, sd, classes)
    model.train()
    ke_fast.split(model, "kels", 0.5, example_input=torch.randn(2, 3, 6, 6))
    assert model.training  # the hook run did not leave the model in eval mode
    m = ke_fast.masks(model)
    assert torch.equal(m["stem"], kels_expected((8, 3, 3, 3), 0.5, first=True))
    assert torch.equal(m["body"], kels_expected((6, 8, 3, 3), 0.5))
    assert torch.equal(m["head"], kels_expected((4, 6), 0.5, last=True))
    with ke_fast.fit_only(model):
        assert model(torch.randn(1, 3, 6, 6)).shape == (1, 4)


def test_reinit_channels_last_model_matches_contiguous():
    """Masks follow the row-major order; a channels_last model is reset to the same values."""
    a = resnet18(num_classes=10, width=8, stem="small")
    ke_fast.split(a, "wels", 0.5)
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    assert not b.layer1[0].conv1.weight.is_contiguous()
    ke_fast.reinit_(a, 1)
    ke_fast.reinit_(b, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not b.layer1[0].conv1.weight.is_contiguous()  # the layout the user chose is kept


def test_split_with_example_input_leaves_batchnorm_statistics():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ke_fast.split(m, "kels", 0.5, example_input=torch.randn(2, 3, 8, 8))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.training


class _DepthwiseOnCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.dw(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_kels_depthwise_reading_a_concatenation_keeps_segment_filters():
    m = ke_fast.split(_DepthwiseOnCat(), "kels", 0.5)
    keep = ke_fast.masks(m)["dw"][:, 0, 0, 0]
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4
    # the fit hypothesis then reads exactly the kept channels of both segments
    head_in = ke_fast.masks(m)["head"][0, :, 0, 0]
    assert torch.equal(head_in, keep)


def test_model_reinit_plan_follows_storage_changes():
    """ke_fast.reinit_ caches its launch plan per model; new storage (e.g. .half()) rebuilds it."""
    a = ke_fast.split(resnet18(num_classes=10, width=8, stem="small"), "wels", 0.5)
    b = copy.deepcopy(a)
    ke_fast.reinit_(a, 1)
    a.half()
    ke_fast.reinit_(a, 2)
    ke_fast.reinit_(b, 1)
    b.half()
    ke_fast.reinit_(b, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = copy.deepcopy(b).float()
    ke_fast.reinit_(c, 3)
    fresh = copy.deepcopy(b).float()
    split_state(fresh).drop_caches()
    ke_fast.reinit_(fresh, 3)
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), fresh.parameters()))


# ---------------------------------------------------------------- KELS roles: the model's input and output


def test_kels_classifier_left_out_makes_the_last_conv_a_hidden_layer():
    mlp = build("mlp")
    ke_fast.split(mlp, "kels", 0.5, filter_fn=lambda n, m: n != "classifier")
    m = ke_fast.masks(mlp)
    assert list(m) == ["body.0", "body.2"]
    assert torch.equal(m["body.0"], kels_expected((17, 20), 0.5, first=True))
    assert torch.equal(m["body.2"], kels_expected((9, 17), 0.5))  # ceil(s*9) = 5 of 9 outputs
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4))
    ke_fast.split(convs, "kels", 0.5, filter_fn=lambda n, m: not isinstance(m, nn.Linear))
    assert torch.equal(ke_fast.masks(convs)["2"], kels_expected((6, 8, 3, 3), 0.5))
    untraceable = Untraceable()
    ke_fast.split(untraceable, "kels", 0.5, example_input=torch.randn(2, 3, 6, 6), filter_fn=lambda n, m: n != "head")
    assert torch.equal(ke_fast.masks(untraceable)["body"], kels_expected((6, 8, 3, 3), 0.5))  # by execution order


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), nn.Conv2d(2, 3, 3)], ids=["linear", "conv2d"])
def test_kels_model_that_is_one_layer_keeps_everything(layer):
    x = torch.randn(4, 5) if isinstance(layer, nn.Linear) else torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        dense = layer(x)
    ke_fast.split(layer, "kels", 0.5)
    assert ke_fast.masks(layer)[""].all()  # all outputs (it produces the output) and all inputs (it reads the input)
    with torch.no_grad(), ke_fast.fit_only(layer):
        assert torch.equal(layer(x), dense)


# ---------------------------------------------------------------- tied weights: one Parameter, one mask


class _Tied(nn.Module):
    """Two hidden layers sharing weight and bias (``b.weight = a.weight``), between a stem and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(F.relu(self.stem(x)))))))


@pytest.mark.parametrize("mode", ["wels", "kels"])
def test_tied_weights_share_one_mask_and_reinit_keeps_fit(mode):
    model = ke_fast.split(_Tied(), mode, 0.5, seed=1)
    masks = ke_fast.masks(model)
    assert torch.equal(masks["a"], masks["b"])
    assert model.a.layer_index == model.b.layer_index  # one Parameter, one stream
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ke_fast.fit_only(model):
        fit_before = model(x)
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    ke_fast.reinit_(model, 1)
    (plan,) = split_state(model).cached("reset")
    listed = [w.data_ptr() for w in plan.weights]
    assert len(listed) == len(set(listed)) == 6  # stem, a, head: the shared weight and bias once
    for name, m in ke_fast.masked_layers(model):
        keep, w0, w1 = masks[name], before[f"{name}.weight"], m.weight.detach()
        assert torch.equal(w1[keep].view(torch.int32), w0[keep].view(torch.int32)), name  # bit-exact
        assert (w1[~keep] != w0[~keep]).all(), name
        bias_keep = keep.any(dim=1)
        assert torch.equal(m.bias.detach()[bias_keep].view(torch.int32), before[f"{name}.bias"][bias_keep].view(
            torch.int32)), name
    with torch.no_grad(), ke_fast.fit_only(model):
        assert torch.equal(model(x), fit_before)


def test_tied_weights_with_different_kels_roles_are_refused():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model[2].weight = model[0].weight  # layer 0 reads the input (keeps all inputs), layer 2 does not
    sd, classes = state(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"'0'.*'2'.*share a Parameter.*reads the model input.*hidden layer"):
        ke_fast.split(model, "kels", 0.5)
    assert_unsplit(model, sd, classes)
    ke_fast.split(model, "wels", 0.5)  # WELS has no roles: one mask for both
    assert torch.equal(ke_fast.masks(model)["0"], ke_fast.masks(model)["2"])


class _TiedEmbedding(nn.Module):
    """Language-model style weight tying: the classifier shares the embedding matrix."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(3, 8), nn.Linear(8, 3, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.emb(tokens))


def test_parameter_shared_with_a_dense_module_is_refused():
    for model, kwargs, names in ((_TiedEmbedding(), {}, ("'head'", "'emb'", "Embedding")),
                                 (_Tied(), dict(filter_fn=lambda n, m: n != "b"), ("'a'", "'b'", "Linear"))):
        sd, classes = state(model), [type(m) for m in model.modules()]
        for mode in ("wels", "kels"):
            with pytest.raises(ValueError, match="shares a Parameter") as err:
                ke_fast.split(model, mode, 0.5, **kwargs)
            assert all(n in str(err.value) for n in names), str(err.value)
            assert_unsplit(model, sd, classes)


def test_reinit_refuses_tied_layers_whose_masks_diverged():
    model = ke_fast.split(_Tied(), "wels", 0.5, seed=1)
    model.b.set_fit_mask(K.pack_mask(torch.ones(8, 8, dtype=torch.bool)))
    before = state(model)
    with pytest.raises(ValueError, match=r"'a' and 'b' share a Parameter"):
        ke_fast.reinit_(model, 1)
    assert same_state(state(model), before)


def test_fit_only_refuses_tied_layers_whose_masks_diverged():
    model = ke_fast.split(_Tied(), "wels", 0.5, seed=1)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ke_fast.fit_only(model):  # agreeing masks (split gave both one mask): fine
        model(x)
    model.b.set_fit_mask(K.pack_mask(torch.ones(8, 8, dtype=torch.bool)))
    modes = [m.mode for _, m in ke_fast.masked_layers(model)]
    with pytest.raises(ValueError, match=r"layers 'a' and 'b' share a weight Parameter but hold different fit masks"):
        with ke_fast.fit_only(model):
            pass
    with pytest.raises(ValueError, match=r"'a' and 'b' share a weight Parameter"):
        ke_fast.set_mode(model, "fit")
    assert [m.mode for _, m in ke_fast.masked_layers(model)] == modes  # nothing switched
    ke_fast.set_mode(model, "dense")  # dense mode reads no mask: allowed
    model.b.set_fit_mask(model.a.fit_mask.clone())  # agreeing again
    with torch.no_grad(), ke_fast.fit_only(model):
        model(x)


# ---------------------------------------------------------------- subclasses of the torch layers


def _same_pad(size, k, s, d):
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


class StdConv2dLike(nn.Conv2d):
    """timm's StdConv2d: the weight is standardised per filter in forward."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSameLike(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow "same" padding, computed from the input size in forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x):
        ph = _same_pad(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = _same_pad(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class SplitConvLike(nn.Conv2d):
    """The official KE layer's own attributes, which the masked layer uses too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.split_mode, self.split_rate = "theirs", 0.25


def _subclass_net():
    torch.manual_seed(0)
    return nn.Sequential(StdConv2dLike(3, 8, 3, padding=1), nn.ReLU(), Conv2dSameLike(8, 6, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


X_SUB = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))


def _own_forward_on_masked(plain, split_model, x):
    """The unsplit model's own forward with W*M and b*M_out as leaf tensors: (output, {name: grad*M})."""
    params, keeps = {}, {}
    for name, m in ke_fast.masked_layers(split_model):
        keeps[f"{name}.weight"] = K.unpack_mask(m.fit_mask, m.weight.shape)
        if m.bias is not None:
            keeps[f"{name}.bias"] = K.unpack_mask(m.bias_mask, m.bias.shape)
    for name, p in split_model.named_parameters():
        params[name] = torch.where(keeps[name], p.detach(), 0.0).requires_grad_(True)
    out = torch.func.functional_call(plain, params, (x,))
    out.square().sum().backward()
    return out.detach(), {k: torch.where(keeps[k], v.grad, 0.0) for k, v in params.items()}


@pytest.mark.parametrize("mode", ["kels", "wels"])
def test_subclasses_split_dense_mode_and_fit_mode(mode):
    model = _subclass_net()
    plain = copy.deepcopy(model)
    ke_fast.split(model, mode, 0.5, seed=2)
    assert list(ke_fast.masks(model)) == ["0", "2", "6"]
    assert isinstance(model[0], StdConv2dLike) and isinstance(model[0], MaskedConv2d)
    assert isinstance(model[2], Conv2dSameLike) and isinstance(model[2], MaskedConv2d)
    assert type(model[0]) is ke_fast.nn.masked_class(StdConv2dLike)  # one generated class per subclass
    if mode == "kels":  # the subclass reading the input is a layer of the graph: it keeps all inputs
        assert torch.equal(ke_fast.masks(model)["0"], kels_expected((8, 3, 3, 3), 0.5, first=True))
    # dense mode: the subclass's own forward, as before the split
    with torch.no_grad():
        assert torch.equal(model(X_SUB), plain(X_SUB))
    # fit mode: that same forward on W*M; the gradient reaches the Parameters as grad*M
    want, grads = _own_forward_on_masked(plain, model, X_SUB)
    with ke_fast.fit_only(model):
        out = model(X_SUB)
        out.square().sum().backward()
    assert torch.equal(out.detach(), want)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    with pytest.raises(RuntimeError), ke_fast.fit_only(model):
        model[0](torch.randn(2, 5, 9, 9))  # the forward raises: the Parameters are back in their slots anyway
    assert type(model[0].weight) is nn.Parameter and type(model[0].bias) is nn.Parameter
    # revert restores the subclasses and their outputs
    ke_fast.revert(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    with torch.no_grad():
        assert torch.equal(model(X_SUB), plain(X_SUB))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_subclass_layers_copy_and_pickle(how):
    model = ke_fast.split(_subclass_net(), "wels", 0.5, seed=2).eval()
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert [type(m) for m in clone.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(clone(X_SUB), model(X_SUB))
        with ke_fast.fit_only(model), ke_fast.fit_only(clone):
            assert torch.equal(clone(X_SUB), model(X_SUB))
    ke_fast.revert(clone)
    assert type(clone[0]) is StdConv2dLike and isinstance(model[0], MaskedLayer)


def test_subclass_own_attributes_come_back_on_revert():
    model = nn.Sequential(SplitConvLike(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    ke_fast.split(model, "wels", 0.5)
    assert model[0].split_mode == "wels" and model[0].split_rate == 0.5
    ke_fast.revert(model)
    assert type(model[0]) is SplitConvLike
    assert model[0].split_mode == "theirs" and model[0].split_rate == 0.25


class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.up = nn.ConvTranspose2d(4, 4, 2)
        self.vol = nn.Conv3d(1, 2, 1)
        self.attn = nn.MultiheadAttention(4, 1)
        self.lazy = nn.LazyLinear(3)

    def forward(self, x):
        return self.up(self.conv(x))


def test_layers_ke_fast_cannot_split_warn_once_or_raise_with_strict():
    model = _Unsupported()
    names = ("'up' (ConvTranspose2d", "'vol' (Conv3d", "'attn.out_proj' (NonDynamicallyQuantizableLinear",
             "'lazy' (LazyLinear: uninitialised")
    classes = [type(m) for m in model.modules()]
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("lazy.")}  # lazy: no values yet
    with pytest.raises(ValueError, match="strict=True") as err:
        ke_fast.split(model, "wels", 0.5, strict=True)
    assert all(n in str(err.value) for n in names), str(err.value)
    assert [type(m) for m in model.modules()] == classes and not ke_fast.masked_layers(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ke_fast.split(model, "wels", 0.5)
    assert len(caught) == 1 and all(n in str(caught[0].message) for n in names), [str(w.message) for w in caught]
    assert list(ke_fast.masks(model)) == ["conv"]
    ke_fast.revert(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # layers filter_fn leaves out are the user's choice: no warning
        ke_fast.split(model, "wels", 0.5, filter_fn=lambda n, m: n == "conv", strict=True)
