"""ke_fast.graph: reading a model by torch.fx or by one recorded forward, and what KELS reads from it
(the layer reading the input, the layers producing the output, concatenation segments, order).

The official KE DenseNet (ahmdtaha/knowledge_evolution, models/split_densenet.py with layers/conv_type.py,
layers/linear_type.py) gives each layer reading a concatenation its segment sizes by hand (a string
``in_channels_order``); the rule its layers apply to them is restated below in our own words and checked,
layer by layer, against what ke_fast reads from one forward of a model torch.fx cannot trace.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ke_fast
from ke_fast import graph as G
from ke_fast.models import MLP, DenseNet, DenseNetTiny, SmallCNN, build_model, resnet18

# ---------------------------------------------------------------- the official KELS rule, restated


def official_kels_mask(shape, s, order=None, *, linear=False, last=False):
    """The official KE layers' KELS mask (1 = fit) of a weight of ``shape`` at split rate ``s``.

    * No channel order given: a conv keeps its first ceil(s * C_out) filters; of their inputs, all when the
      conv reads 3 channels (the official way to spot the first conv), else the first ceil(s * C_in). The
      linear classifier (built as the last layer) keeps every output and the first ceil(s * C_in) inputs.
    * A channel order [c_1, c_2, ...] (the sizes of the concatenated parts of the input, in order): inside
      each part c_j only its first ceil(s * c_j) channels are kept; a conv still keeps its first
      ceil(s * C_out) filters, the linear layer every output.
    """
    mask = torch.zeros(shape, dtype=torch.bool)
    rows = shape[0] if linear else math.ceil(s * shape[0])
    if order is None:
        if linear:
            mask[:, :math.ceil(s * shape[1])] = True
        else:
            mask[:rows, :shape[1] if shape[1] == 3 else math.ceil(s * shape[1])] = True
        return mask
    start = 0
    for part in order:
        mask[:rows, start:start + math.ceil(s * part)] = True
        start += part
    return mask


class SplitConv(nn.Conv2d):
    """Like the official SplitConv: an nn.Conv2d subclass holding its split settings and channel order,
    with a forward of its own (the plain conv op)."""

    def __init__(self, cin, cout, k, *, s, order=None, stride=1, padding=0):
        super().__init__(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.split_mode, self.split_rate, self.in_channels_order = "kels", s, order
        self.official = official_kels_mask(self.weight.shape, s, order)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PlainSplitConv(SplitConv):
    forward = nn.Conv2d.forward  # the torch op's own forward: extract_slim can reproduce it


class SplitLinear(nn.Linear):
    def __init__(self, cin, cout, *, s, order=None):
        super().__init__(cin, cout)
        self.split_mode, self.split_rate, self.in_channels_order = "kels", s, order
        self.official = official_kels_mask(self.weight.shape, s, order, linear=True)


class SplitBatchNorm(nn.BatchNorm2d):
    """Like the official SplitBatchNorm: only its constructor differs from nn.BatchNorm2d."""

    def __init__(self, c, order=None):
        super().__init__(c)
        self.in_channels_order = order


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size, s, order, conv):
        super().__init__()
        self.norm1, self.relu1 = SplitBatchNorm(cin, order), nn.ReLU(inplace=True)
        self.conv1 = conv(cin, bn_size * growth, 1, s=s, order=order)
        self.norm2, self.relu2 = SplitBatchNorm(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = conv(bn_size * growth, growth, 3, s=s, padding=1)

    def forward(self, features):
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class OfficialLikeDenseNet(nn.Module):
    """DenseNet-BC built as the official KE code builds it: every layer reading a concatenation is told the
    segment sizes (the block's input, then one growth per earlier layer); a transition halves the channels.
    Its forward checks its features on the data (``if not finite: raise``), which torch.fx cannot trace."""

    def __init__(self, s, blocks=(6, 12, 24, 16), growth=32, init=64, bn_size=4, classes=10, conv=SplitConv):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", conv(3, init, 7, s=s, stride=2, padding=3))
        self.features.add_module("norm0", SplitBatchNorm(init))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        c = init
        for i, n in enumerate(blocks):
            order, block = [c], DenseBlock()
            for j in range(n):
                block[f"denselayer{j + 1}"] = DenseLayer(c + j * growth, growth, bn_size, s, list(order), conv)
                order.append(growth)
            self.features.add_module(f"denseblock{i + 1}", block)
            c += n * growth
            if i < len(blocks) - 1:
                trans = nn.Sequential()
                trans.add_module("norm", SplitBatchNorm(c, order))
                trans.add_module("relu", nn.ReLU(inplace=True))
                trans.add_module("conv", conv(c, c // 2, 1, s=s, order=order))
                trans.add_module("pool", nn.AvgPool2d(2, 2))
                self.features.add_module(f"transition{i + 1}", trans)
                c //= 2
        self.features.add_module("norm5", SplitBatchNorm(c, order))
        self.classifier = SplitLinear(c, classes, s=s, order=order)

    def forward(self, x):
        features = self.features(x)
        if not bool(torch.isfinite(features).all()):  # data-dependent control flow: fx cannot trace it
            raise FloatingPointError("non-finite features")
        out = F.adaptive_avg_pool2d(F.relu(features), 1)
        return self.classifier(torch.flatten(out, 1))


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@pytest.mark.parametrize(("s", "growth", "init"), [(0.5, 32, 64), (0.3, 8, 16)], ids=["full-0.5", "narrow-0.3"])
def test_kels_masks_of_an_untraceable_densenet121_follow_the_official_rule(s, growth, init):
    torch.manual_seed(0)
    model = OfficialLikeDenseNet(s, growth=growth, init=init)
    layers = _layers(model)
    assert len(layers) == 121
    with pytest.raises(ValueError, match="OfficialLikeDenseNet"):
        G.read(model, method="fx")  # fx cannot trace it: only the recorded forward reads it
    official = {n: m.official for n, m in layers}
    ordered = [n for n, m in layers if m.in_channels_order is not None and len(m.in_channels_order) > 1]
    plain = {n: official_kels_mask(m.weight.shape, s, linear=isinstance(m, nn.Linear)) for n, m in layers}
    # the rule that ignores concatenations (what ke_fast gave before) differs on 58 of the 121 layers
    assert sorted(n for n in official if not torch.equal(plain[n], official[n])) == sorted(ordered)
    assert len(ordered) == 58
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything is read: no warning
        ke_fast.split(model, "kels", s, example_input=torch.randn(1, 3, 32, 32))
    got = ke_fast.masks(model)
    assert list(got) == list(official)
    for name in official:
        assert torch.equal(got[name], official[name]), name
    assert model.training and model.features.conv0.split_mode == "kels"


def test_slim_network_of_an_untraceable_densenet_equals_its_fit_hypothesis():
    torch.manual_seed(0)
    model = OfficialLikeDenseNet(0.5, blocks=(2, 3), growth=4, init=8, conv=PlainSplitConv).eval()
    x = torch.randn(2, 3, 32, 32)
    ke_fast.split(model, "kels", 0.5, example_input=x)
    for m in model.modules():  # statistics away from the defaults: the slim BatchNorms must pick the right ones
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    with pytest.raises(ValueError, match="extract_slim: torch.fx cannot trace OfficialLikeDenseNet"):
        ke_fast.extract_slim(model)
    slim = ke_fast.extract_slim(model, example_input=x)
    with torch.no_grad(), ke_fast.fit_only(model):
        want = model(x)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), want, rtol=1e-4, atol=1e-5)
    assert slim.features.denseblock1.denselayer2.conv1.in_channels == 4 + 2  # ceil(s*8) of the input, ceil(s*4) grown


# ---------------------------------------------------------------- fx and the recorder agree


class _DepthwiseOnCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14)
        self.head = nn.Conv2d(14, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), F.relu(self.b(x))], dim=1)
        y = y * 2.0
        y += 1  # in place: the recorder follows the tensor to its last writer
        return self.head(self.dw(y).relu_())


TRACEABLE = {
    "resnet18": (lambda: resnet18(num_classes=10, width=8), (2, 3, 32, 32)),
    "densenet_tiny": (lambda: DenseNetTiny(num_classes=10), (2, 3, 8, 8)),
    "densenet": (lambda: DenseNet((2, 3), num_classes=5, growth_rate=4, num_init_features=8), (1, 3, 32, 32)),
    "vgg11_bn": (lambda: build_model("vgg11_bn", num_classes=5, width=8, hidden=16), (2, 3, 32, 32)),
    "mlp": (lambda: MLP(64, hidden=(16, 8), num_classes=3), (2, 1, 8, 8)),
    "small_cnn": (lambda: SmallCNN(num_classes=10, width=8), (2, 1, 8, 8)),
    "depthwise_on_cat": (_DepthwiseOnCat, (2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(TRACEABLE))
def test_fx_and_the_recorded_forward_read_the_same_roles_and_order(name):
    factory, shape = TRACEABLE[name]
    torch.manual_seed(0)
    model = factory()
    layers, x = _layers(model), torch.randn(shape)
    names = [n for n, _ in layers]
    graphs = [G.read(model, x, method="fx"), G.read(model, x, method="record"), G.read(model, method="fx")]
    assert [g.how for g in graphs] == ["fx", "record", "fx"]
    (by_fx, unread), *others = [g.roles(names) for g in graphs]
    assert unread == [] and all(o == (by_fx, []) for o in others)  # no shapes: the same roles too
    assert any(r.first for r in by_fx.values()) and any(r.last for r in by_fx.values())
    if "dense" in name or "cat" in name:
        assert any(r.segments for r in by_fx.values())
    assert graphs[0].order(names) == graphs[1].order(names) == list(dict.fromkeys(G.call_order(model, layers, x)))
    assert graphs[0].norm_producers(names) == graphs[1].norm_producers(names)
    assert model.training  # reading left the model in train mode


def test_depthwise_on_cat_roles():
    roles = G.layer_roles(_DepthwiseOnCat(), _layers(_DepthwiseOnCat()), torch.randn(1, 3, 8, 8), method="record")
    assert roles["a"].first and roles["b"].first and roles["head"].last
    assert roles["dw"].segments == [8, 6] and roles["head"].segments == [8, 6]


def test_recording_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = G.read(model, torch.randn(2, 3, 32, 32), method="record")
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    shapes = {n.target: tuple(G.shape_of(n)) for n in g.graph.nodes if n.op == "call_module"}
    assert shapes["conv1"] == (2, 8, 16, 16) and shapes["fc"] == (2, 10)
    assert G.channels(next(n for n in g.graph.nodes if n.target == "avgpool"), g.modules) == 64


def test_norm_producers_and_leaves():
    model = OfficialLikeDenseNet(0.5, blocks=(2,), growth=4, init=8)
    g = G.read(model, torch.randn(1, 3, 16, 16))
    assert g.how == "record"
    produced = g.norm_producers([n for n, _ in _layers(model)])
    assert produced["features.norm0"] == "features.conv0"
    assert produced["features.denseblock1.denselayer1.norm2"] == "features.denseblock1.denselayer1.conv1"
    assert "features.denseblock1.denselayer1.norm1" not in produced  # it reads a concatenation
    assert G.is_leaf(SplitBatchNorm(3)) and G.is_leaf(SplitConv(3, 4, 1, s=0.5)) and G.is_leaf(nn.ReLU())
    assert not G.is_leaf(nn.Sequential(nn.ReLU())) and not G.is_leaf(DenseBlock()) and not G.is_leaf(model)


# ---------------------------------------------------------------- never silent


class _Shuffled(nn.Module):
    """A concatenation reaches a conv through a channel permutation: its segments cannot be read."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.conv = nn.Conv2d(10, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = torch.roll(y, 1, dims=1)
        return self.head(self.conv(y).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["fx", "record"])
def test_an_op_not_understood_on_a_concatenation_warns_once_and_uses_the_plain_rule(method):
    model = _Shuffled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        roles = G.layer_roles(model, _layers(model), torch.randn(1, 3, 4, 4), method=method)
    assert len(caught) == 1, [str(w.message) for w in caught]
    text = str(caught[0].message)
    assert "_Shuffled" in text and "'conv'" in text and "'roll'" in text and G.PLAIN_RULE in text
    assert roles["conv"] == G.Role() and roles["head"].last and roles["a"].first
    with pytest.warns(UserWarning, match="_Shuffled"):
        ke_fast.split(model, "kels", 0.5, example_input=torch.randn(1, 3, 4, 4))
    assert torch.equal(ke_fast.masks(model)["conv"][:, :, 0, 0], official_kels_mask((8, 10), 0.5))


class _SpareHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.spare = nn.Conv2d(3, 4, 1), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_a_layer_never_called_is_named():
    model = _SpareHead()
    with pytest.warns(UserWarning, match=r"_SpareHead.*'spare' \(never called in the recorded forward\)"):
        G.layer_roles(model, _layers(model), torch.randn(1, 3, 4, 4), method="record")


def test_when_the_recorder_fails_the_execution_order_decides_with_a_warning(monkeypatch):
    from test_convert import Untraceable, kels_expected

    def broken(model, example_input):
        raise RuntimeError("recorder broke")

    monkeypatch.setattr(G, "_record", broken)
    model = Untraceable()
    with pytest.warns(UserWarning, match=r"Untraceable \(RuntimeError: recorder broke\).*execution order") as rec:
        ke_fast.split(model, "kels", 0.5, example_input=torch.randn(2, 3, 6, 6))
    assert len(rec) == 1
    m = ke_fast.masks(model)
    assert torch.equal(m["stem"], kels_expected((8, 3, 3, 3), 0.5, first=True))
    assert torch.equal(m["head"], kels_expected((4, 6), 0.5, last=True))


def test_bad_arguments():
    model = _SpareHead()
    with pytest.raises(ValueError, match="method must be one of"):
        G.read(model, method="hooks")
    with pytest.raises(ValueError, match="method='record'.*example_input"):
        G.read(model, method="record")
    with pytest.raises(ValueError, match="OfficialLikeDenseNet.*example_input"):
        G.read(OfficialLikeDenseNet(0.5, blocks=(1,), growth=4, init=8))
    assert G.layer_roles(nn.Linear(3, 2), [("", nn.Linear(3, 2))]) == {"": G.Role(first=True, last=True)}
