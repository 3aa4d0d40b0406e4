"""Tests for ``ke_fast.models``: shapes, parameter counts, fx tracing, autograd; torchvision's state_dict
layout for the paper's architectures; KELS / WELS splits and slim extraction of each; the registry and
MODULE:FUNCTION."""

from __future__ import annotations

import sys
import textwrap
from typing import Callable

import pytest
import torch
import torch.fx
from torch import nn

import ke_fast
from ke_fast.models import (
    MLP,
    MODELS,
    DenseNetTiny,
    SmallCNN,
    build_model,
    check_model,
    densenet121,
    densenet169,
    model_names,
    model_options,
    resnet18,
    resnet34,
    resnet50,
    vgg11_bn,
)

# (factory, input shape, expected output shape); kept tiny so the file stays fast.
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    "resnet18_small": (
        lambda: resnet18(num_classes=10, in_channels=1, stem="small", width=8),
        (2, 1, 8, 8),
        (2, 10),
    ),
    "resnet18_imagenet": (lambda: resnet18(num_classes=7, width=8), (2, 3, 32, 32), (2, 7)),
    "resnet50_imagenet": (lambda: resnet50(num_classes=5, width=8), (1, 3, 64, 64), (1, 5)),
    "resnet50_small": (
        lambda: resnet50(num_classes=10, in_channels=3, stem="small", width=8),
        (2, 3, 16, 16),
        (2, 10),
    ),
    "densenet_tiny": (lambda: DenseNetTiny(num_classes=10, in_channels=1), (2, 1, 8, 8), (2, 10)),
    "densenet_tiny_3blocks": (
        lambda: DenseNetTiny(num_classes=4, growth=4, layers_per_block=(2, 2, 2), init_channels=8),
        (2, 3, 16, 16),
        (2, 4),
    ),
    "mlp": (lambda: MLP(64, hidden=(32, 16), num_classes=10), (3, 1, 8, 8), (3, 10)),
    "mlp_no_hidden": (lambda: MLP(64, hidden=(), num_classes=3), (3, 64), (3, 3)),
    "small_cnn": (lambda: SmallCNN(num_classes=10, width=8), (2, 1, 8, 8), (2, 10)),
    # the other paper architectures are the same classes with other block counts (split tests below)
    "densenet121_gray_dropout": (lambda: densenet121(num_classes=4, in_channels=1, growth_rate=4,
                                                     num_init_features=8, bn_size=2, drop_rate=0.2),
                                 (2, 1, 32, 32), (2, 4)),
    "vgg11_bn": (lambda: vgg11_bn(num_classes=5, width=8, hidden=16), (2, 3, 32, 32), (2, 5)),
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_shape(case: str) -> None:
    factory, in_shape, out_shape = CASES[case]
    model = factory().eval()
    with torch.no_grad():
        y = model(torch.randn(in_shape))
    assert y.shape == out_shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("factory", "expected"),
    [(resnet18, 11_689_512), (resnet34, 21_797_672), (resnet50, 25_557_032), (densenet121, 7_978_856),
     (densenet169, 14_149_480), (vgg11_bn, 132_868_840)],
    ids=["resnet18", "resnet34", "resnet50", "densenet121", "densenet169", "vgg11_bn"],
)
def test_full_param_counts_match_torchvision(factory: Callable[..., nn.Module], expected: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init time
        assert _n_params(factory()) == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_fx_trace_matches_eager(case: str) -> None:
    factory, in_shape, _ = CASES[case]
    model = factory().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(in_shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_reaches_all_parameters(case: str) -> None:
    factory, in_shape, _ = CASES[case]
    model = factory().train()
    x = torch.randn(in_shape, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_densenet_concatenates_growth_channels() -> None:
    model = DenseNetTiny(growth=8, layers_per_block=(3, 3), init_channels=16)
    # 16 + 3*8 = 40 -> transition halves to 20 -> + 3*8 = 44
    assert model.num_features == 44
    assert model.classifier.in_features == 44
    traced = torch.fx.symbolic_trace(model)
    assert any(n.target is torch.cat for n in traced.graph.nodes)


def test_resnet_stems() -> None:
    small = resnet18(num_classes=10, stem="small", width=8)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    big = resnet18(num_classes=10, width=8)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)
    with pytest.raises(ValueError, match="stem"):
        resnet18(stem="cifar")


def test_resnet_torchvision_layout() -> None:
    model = resnet50(num_classes=10, width=8)
    block = model.layer2[0]
    # v1.5: the stride sits on the 3x3 conv, not the first 1x1.
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert isinstance(block.downsample[0], nn.Conv2d) and block.downsample[0].kernel_size == (1, 1)
    assert isinstance(block.downsample[1], nn.BatchNorm2d)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert model.fc.in_features == 8 * 8 * 4


def test_resnet_init_and_zero_init_residual() -> None:
    model = resnet18(num_classes=10, width=8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    zeroed = resnet50(num_classes=10, width=8, zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for layer in (zeroed.layer1, zeroed.layer4) for b in layer)
    zeroed18 = resnet18(num_classes=10, width=8, zero_init_residual=True)
    assert torch.all(zeroed18.layer1[0].bn2.weight == 0)
    assert torch.all(zeroed18.layer1[0].bn1.weight == 1)


def test_head_names() -> None:
    assert isinstance(resnet18(num_classes=3, width=8).fc, nn.Linear)
    assert isinstance(SmallCNN(num_classes=3, width=8).fc, nn.Linear)
    assert isinstance(DenseNetTiny(num_classes=3).classifier, nn.Linear)
    assert isinstance(MLP(4, num_classes=3).classifier, nn.Linear)


def test_block_inputs_not_modified_in_place() -> None:
    model = resnet18(num_classes=10, stem="small", width=8).eval()
    x = torch.randn(2, 3, 8, 8)
    seen: list[torch.Tensor] = []
    clones: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0])
        clones.append(args[0].clone())

    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            block.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(x)
    assert len(seen) == 8
    for a, b in zip(seen, clones):
        assert torch.equal(a, b)


def test_registry_and_build_model() -> None:
    assert set(MODELS) == {"resnet18", "resnet34", "resnet50", "densenet121", "densenet169", "vgg11_bn",
                           "densenet_tiny", "mlp", "small_cnn"}
    assert model_names() == sorted(MODELS)
    assert isinstance(build_model("resnet18", num_classes=10, width=8, stem="small"), nn.Module)
    assert isinstance(build_model("mlp", in_features=64), MLP)
    assert build_model("mlp", num_classes=3, in_channels=10).classifier.out_features == 3  # flat inputs
    assert isinstance(build_model("small_cnn", num_classes=4), SmallCNN)
    assert isinstance(build_model("densenet_tiny"), DenseNetTiny)
    with torch.device("meta"):  # every registered name builds from (num_classes, in_channels) alone
        for name in MODELS:
            model = build_model(name, num_classes=7, in_channels=1 if name != "mlp" else 64)
            assert list(model.parameters())[-1].shape == (7,), name
    assert model_options("resnet34") == ["stem", "width", "zero_init_residual"]
    assert model_options("vgg11_bn") == ["dropout", "hidden", "pool", "width"]
    assert "growth_rate" in model_options("densenet121") and "width" not in model_options("densenet121")
    with pytest.raises(ValueError, match="unknown model name"):
        model_options("resnet19")
    with pytest.raises(ValueError, match="mlp.*in_features"):
        build_model("mlp")
    with pytest.raises(ValueError, match=r"'resnet18' does not accept.*growth_rate"):
        build_model("resnet18", growth_rate=4)


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="name") as excinfo:
        build_model("vgg16")
    message = str(excinfo.value)
    assert "vgg16" in message
    for valid in MODELS:
        assert valid in message


# ---------------------------------------------------------------- torchvision's layout, stated


def _bn(keys: dict, name: str, c: int) -> None:
    for k in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{k}"] = (c,)
    keys[f"{name}.num_batches_tracked"] = ()


def tv_resnet18_keys(classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """torchvision's resnet18 state_dict: conv1 7x7/2 (no bias) + bn1; four stages of two BasicBlocks
    (conv1/bn1, conv2/bn2, 3x3 no bias) with 64, 128, 256, 512 planes, the first block of stages 2-4
    projecting its input with downsample.0 (1x1/2 conv) + downsample.1 (BN); fc 512 -> classes."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    _bn(keys, "bn1", 64)
    cin = 64
    for stage, planes in enumerate((64, 128, 256, 512), 1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            keys[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            _bn(keys, f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            _bn(keys, f"{p}.bn2", planes)
            if cin != planes:
                keys[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                _bn(keys, f"{p}.downsample.1", planes)
            cin = planes
    keys["fc.weight"], keys["fc.bias"] = (classes, 512), (classes,)
    return keys


def tv_densenet121_keys(classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """torchvision's densenet121 state_dict (growth 32, bn_size 4, 64 initial features, blocks 6/12/24/16):
    features.conv0 7x7 + features.norm0; features.denseblock{b}.denselayer{l}.norm1 (its input channels),
    .conv1 (128 x input, 1x1), .norm2 (128), .conv2 (32 x 128, 3x3), no conv bias; features.transition{b}
    .norm + .conv (1x1 halving the channels) after blocks 1-3; features.norm5 (1024); classifier 1024 ->
    classes."""
    keys: dict[str, tuple[int, ...]] = {"features.conv0.weight": (64, 3, 7, 7)}
    _bn(keys, "features.norm0", 64)
    c = 64
    for b, layers in enumerate((6, 12, 24, 16), 1):
        for i in range(1, layers + 1):
            p = f"features.denseblock{b}.denselayer{i}"
            _bn(keys, f"{p}.norm1", c)
            keys[f"{p}.conv1.weight"] = (128, c, 1, 1)
            _bn(keys, f"{p}.norm2", 128)
            keys[f"{p}.conv2.weight"] = (32, 128, 3, 3)
            c += 32
        if b < 4:
            _bn(keys, f"features.transition{b}.norm", c)
            keys[f"features.transition{b}.conv.weight"] = (c // 2, c, 1, 1)
            c //= 2
    _bn(keys, "features.norm5", c)
    keys["classifier.weight"], keys["classifier.bias"] = (classes, 1024), (classes,)
    return keys


def tv_vgg11_bn_keys(classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """torchvision's vgg11_bn state_dict: features is one Sequential of conv(3x3, bias)-BN-ReLU triples and
    max-pools for configuration A (64 M 128 M 256 256 M 512 512 M 512 512 M), so the convs sit at indices
    0 4 8 11 15 18 22 25 and their BNs one after; classifier.0 (512*7*7 -> 4096), .3 (4096 -> 4096),
    .6 (4096 -> classes), Linear layers with bias."""
    keys: dict[str, tuple[int, ...]] = {}
    cin = 3
    for index, c in zip((0, 4, 8, 11, 15, 18, 22, 25), (64, 128, 256, 256, 512, 512, 512, 512)):
        keys[f"features.{index}.weight"], keys[f"features.{index}.bias"] = (c, cin, 3, 3), (c,)
        _bn(keys, f"features.{index + 1}", c)
        cin = c
    for index, (i, o) in zip((0, 3, 6), ((512 * 7 * 7, 4096), (4096, 4096), (4096, classes))):
        keys[f"classifier.{index}.weight"], keys[f"classifier.{index}.bias"] = (o, i), (o,)
    return keys


@pytest.mark.parametrize(("name", "expected"), [("resnet18", tv_resnet18_keys), ("densenet121", tv_densenet121_keys),
                                                ("vgg11_bn", tv_vgg11_bn_keys)])
def test_torchvision_state_dict_layout(name: str, expected: Callable[..., dict]) -> None:
    with torch.device("meta"):
        model = build_model(name, num_classes=17)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected(17)
    assert list(got) == list(expected(17))  # torchvision's registration order too


@pytest.mark.parametrize(("name", "expected"), [("resnet18", tv_resnet18_keys), ("densenet121", tv_densenet121_keys)])
def test_a_torchvision_state_dict_loads(name: str, expected: Callable[..., dict]) -> None:
    """A state_dict with torchvision's keys and shapes (random values) loads strictly, value for value."""
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=gen) if s else torch.tensor(3)) for k, s in expected(10).items()}
    model = build_model(name, num_classes=10)
    model.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ---------------------------------------------------------------- KELS and WELS on every architecture

PAPER = {
    "resnet18": dict(width=8),
    "resnet34": dict(width=8),
    "resnet50": dict(width=8),
    "densenet121": dict(growth_rate=4, num_init_features=8, bn_size=2),
    "densenet169": dict(growth_rate=4, num_init_features=8, bn_size=2),
    "vgg11_bn": dict(width=8, hidden=16),
}


@pytest.mark.parametrize("mode", ["kels", "wels"])
@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_architectures_split_run_and_slim(name: str, mode: str) -> None:
    """KELS: the slim network computes the fit hypothesis with under half the parameters. WELS: about half
    the weights are fit, and the fit hypothesis computes something else than the dense network."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, **PAPER[name]).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    x = torch.randn(2, 3, 32, 32)
    if mode == "wels":
        with torch.no_grad():
            dense = model(x)
    ke_fast.split(model, mode, 0.5, seed=1)
    masks = ke_fast.masks(model)
    assert list(masks) == convs
    with torch.no_grad(), ke_fast.fit_only(model):
        fit = model(x)
    assert fit.shape == (2, 5) and torch.isfinite(fit).all()
    if mode == "wels":
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert abs(kept - 0.5) < 0.01 and not torch.equal(fit, dense)
        with pytest.raises(ValueError, match="extract_sparse"):
            ke_fast.extract_slim(model)
        return
    slim = ke_fast.extract_slim(model)
    assert _n_params(slim) < 0.5 * _n_params(model)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), fit, rtol=1e-4, atol=1e-5)


def test_vgg_slim_reads_whole_channels_of_the_flattened_features() -> None:
    """At s = 0.3 the classifier's ceil(0.3 * 64 * 49) inputs end inside a channel the last conv keeps
    (ceil(0.3 * 64) = 20 channels): the slim classifier reads all 20 x 49 features (the extra ones with zero
    weight), so it still computes the fit hypothesis."""
    torch.manual_seed(0)
    model = ke_fast.split(vgg11_bn(num_classes=5, width=8, hidden=16).eval(), "kels", 0.3)
    x = torch.randn(2, 3, 32, 32)
    slim = ke_fast.extract_slim(model)
    assert slim.classifier[0].in_features == 20 * 49
    with torch.no_grad(), ke_fast.fit_only(model):
        torch.testing.assert_close(slim(x), model(x), rtol=1e-4, atol=1e-5)
        with_shapes = ke_fast.extract_slim(model, example_input=x)
        torch.testing.assert_close(with_shapes(x), model(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- MODULE:FUNCTION


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """A module of the user's own on sys.path (as their working directory would be)."""
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def make_net(num_classes=10, in_channels=3, width=4):
            return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(width, num_classes))

        class Zoo:
            @staticmethod
            def tiny(num_classes, in_channels):
                return make_net(num_classes, in_channels, width=2)

        def not_a_model(num_classes, in_channels):
            return "a string"

        def no_in_channels(num_classes):
            return nn.Linear(3, num_classes)

        NUMBER = 3
    """))
    (tmp_path / "broken_nets.py").write_text("import a_package_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    for name in ("my_nets", "broken_nets"):
        sys.modules.pop(name, None)


def test_module_function_builds_a_users_network(user_module: str) -> None:
    model = build_model(f"{user_module}:make_net", num_classes=6, in_channels=1)
    assert model[0].in_channels == 1 and model[-1].out_features == 6
    assert build_model(f"{user_module}:Zoo.tiny", num_classes=2, in_channels=3)[0].out_channels == 2
    assert check_model(f"{user_module}:make_net") == f"{user_module}:make_net"
    ke_fast.split(model, "kels", 0.5)  # any network the user writes splits like the registered ones
    assert list(ke_fast.masks(model)) == ["0", "4"]


@pytest.mark.parametrize(("spec", "words"), [
    ("no_such_module_xyz:make_net", "cannot import module 'no_such_module_xyz'"),
    ("broken_nets:make_net", "cannot import module 'broken_nets'.*a_package_that_does_not_exist"),
    ("my_nets:missing", "module 'my_nets' has no attribute 'missing'"),
    ("my_nets:NUMBER", "'NUMBER' is a int, not a function or class"),
    ("my_nets:", "expected MODULE:FUNCTION"),
    (":make_net", "expected MODULE:FUNCTION"),
    ("my nets:make_net", "expected MODULE:FUNCTION"),
    ("resnet19", "unknown model name='resnet19'.*resnet18.*MODULE:FUNCTION"),
])
def test_module_function_errors_are_clear(user_module: str, spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_model(spec)
    with pytest.raises(ValueError, match=words):
        build_model(spec, num_classes=2, in_channels=3)


def test_module_function_result_and_arguments_are_checked(user_module: str) -> None:
    with pytest.raises(TypeError, match="'my_nets:not_a_model' returned a str, not an nn.Module"):
        build_model("my_nets:not_a_model", num_classes=2, in_channels=3)
    with pytest.raises(ValueError, match="'my_nets:no_in_channels' does not accept.*in_channels"):
        build_model("my_nets:no_in_channels", num_classes=2, in_channels=3)
