"""KE variants (ke_fast.variants): layer-threshold forgetting (--reset-from) and fit masks by importance
(--mask-criterion magnitude / snip), through the library, the generation loop and the CLI.

Everything runs on the CPU with tiny configurations (digits, ResNet-18 of width 4)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ke_fast.kernels as K
from ke_fast import cli, variants
from ke_fast.convert import reinit_, split
from ke_fast.data import digits
from ke_fast.evolve import Config, Evolution
from ke_fast.masks import masked_layers
from ke_fast.models import resnet18
from ke_fast.state import split_state


def _evolution(tmp_path, **cfg) -> Evolution:
    train, test, _, _ = digits(per_class=5, seed=0)
    test = torch.utils.data.Subset(test, range(100))  # evaluation is not what these tests are about
    torch.manual_seed(0)
    return Evolution(resnet18(num_classes=10, in_channels=1, stem="small", width=4), train, test, Config(**cfg),
                     tmp_path / "ev", device="cpu", progress=False, log=lambda _: None)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pretend_training(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) + 0.5)
        for name, b in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.add_(torch.rand(b.shape, generator=g) + 2.0)


# ---- layer-threshold forgetting -------------------------------------------------------------------

def test_layers_matching_and_forward_order(tmp_path):
    names = ["conv1", "layer3.0.conv1", "layer30.conv", "fc"]
    assert variants.layers_matching(names, "layer3") == ["layer3.0.conv1"]  # a prefix at a "." boundary
    assert variants.layers_matching(names, "fc") == ["fc"]
    for bad in ("layer", "layer3.0.conv", "nope", ""):
        with pytest.raises(ValueError, match="reset_from"):
            variants.layers_matching(names, bad)
    model = split(resnet18(num_classes=10, in_channels=1, stem="small", width=4), "kels", 0.5)
    order = variants.forward_order(model, torch.zeros(1, 1, 8, 8))
    assert sorted(order) == sorted(n for n, _ in masked_layers(model))
    # a block's shortcut runs before its convs (named_modules lists it after them)
    assert order.index("layer2.0.downsample.0") < order.index("layer2.0.conv1") < order.index("layer2.0.conv2")
    assert order[0] == "conv1" and order[-1] == "fc"


@pytest.mark.parametrize("split_mode, mode, reset_from", [
    ("kels", "rand", "layer3.0.conv2"), ("wels", "rand", "layer3"), ("kels", "zero", "layer2"),
    ("wels", "rewind", "layer4.1.conv1")])
def test_reset_from_keeps_before_and_redraws_from(tmp_path, split_mode, mode, reset_from):
    """Every weight, bias and BatchNorm tensor of the layers before the threshold (forward order) stays bit
    for bit; every weight and bias from it on is re-drawn (zeroed, rewound); the split masks are untouched."""
    ev = _evolution(tmp_path, split=split_mode, evolve_mode=mode, reset_from=reset_from, reset_bn=True)
    gen0 = _tensors(ev.model)
    _pretend_training(ev.model)
    trained = _tensors(ev.model)
    masks = {n: m.fit_mask.clone() for n, m in masked_layers(ev.model)}
    ev._evolve(2)
    after = _tensors(ev.model)
    order = variants.forward_order(ev.model, torch.zeros(1, 1, 8, 8))
    first = min(order.index(n) for n in variants.layers_matching(order, reset_from))
    kept, reset = order[:first], order[first:]
    assert kept and reset
    if reset_from == "layer3.0.conv2":  # the shortcut and conv1 of that block run first: kept
        assert {"layer3.0.downsample.0", "layer3.0.conv1"} <= set(kept) and "layer3.0.conv2" in reset
    for name in kept:
        for k in (name + ".weight", name + ".bias"):
            if k in after:
                assert torch.equal(after[k], trained[k]), f"{k} (before the threshold) changed"
    for name in reset:
        for k in (name + ".weight", name + ".bias"):
            if k not in after:
                continue
            if mode == "zero":
                assert bool((after[k] == 0).all()), k
            elif mode == "rewind":
                assert torch.equal(after[k], gen0[k]), f"{k} not back at generation 0"
            else:
                assert bool((after[k] != trained[k]).all()), f"{k}: not every entry re-drawn"
                assert after[k].abs().max() < 10, k
    bn_of = {n: n[:-1] + "1" if n.endswith("downsample.0") else n.replace("conv", "bn") for n in order if n != "fc"}
    for name, bn in bn_of.items():
        for stat in ("weight", "bias", "running_mean", "running_var"):
            k = f"{bn}.{stat}"
            if name in kept:
                assert torch.equal(after[k], trained[k]), f"{k} of a kept layer changed"
            else:
                assert bool((after[k] == (1.0 if stat in ("weight", "running_var") else 0.0)).all()), k
    for n, m in masked_layers(ev.model):
        assert torch.equal(m.fit_mask, masks[n]), f"{n}: the split mask changed"


def test_reset_from_is_one_cached_plan_launch_per_dtype(tmp_path):
    ev = _evolution(tmp_path, reset_from="layer3")
    ev._evolve(2)
    (plan,) = split_state(ev.model).cached("reset")
    ev._evolve(3)
    assert split_state(ev.model).cached("reset") == [plan]  # the whole-layer masks do not rebuild the plan every generation
    assert len(plan._launches) == 1  # fp32 only: one reset_entries_ call per generation
    assert len(plan.weights) == sum(1 + (m.bias is not None) for _, m in masked_layers(ev.model))


def test_reinit_whole_errors():
    model = split(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), "kels", 0.5)
    before = _tensors(model)
    for whole, words in (({"2": "keep"}, "no masked layers"), ({"0": "drop"}, "'keep' or 'reset'")):
        with pytest.raises(ValueError, match=words):
            reinit_(model, 1, whole=whole)
    with pytest.raises(ValueError, match="not both"):
        reinit_(model, 1, whole={"0": "keep"}, ignore_mask=True)
    assert all(torch.equal(v, before[k]) for k, v in _tensors(model).items())
    reinit_(model, 1, whole={"0": "keep", "1": "reset"})
    after = _tensors(model)
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert bool((after["1.weight"] != before["1.weight"]).all()) and bool((after["1.bias"] != before["1.bias"]).all())


# ---- fit masks by importance ----------------------------------------------------------------------

def test_magnitude_mask_by_hand():
    """A 3x4 layer with ties: k = round(0.5 * 12) = 6; ties go to the lower index."""
    model = split(nn.Sequential(nn.Linear(4, 3)), "wels", 0.5)
    w = torch.tensor([[0.1, -0.9, 0.3, 0.3],
                      [-0.3, 0.0, 0.8, -0.2],
                      [0.5, 0.3, -0.05, 0.7]])
    with torch.no_grad():
        model[0].weight.copy_(w)
    variants.choose_masks_(model, variants.magnitude_scores(model), 0.5)
    # |W| sorted: 0.9, 0.8, 0.7, 0.5, then four entries of 0.3 at flat indices 2, 3, 4, 9: the first two win
    expected = torch.tensor([[0, 1, 1, 1],
                             [0, 0, 1, 0],
                             [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(K.unpack_mask(model[0].fit_mask, w.shape), expected)
    assert torch.equal(K.unpack_mask(model[0].bias_mask, (3,)), torch.tensor([True, True, True]))


def test_snip_mask_by_hand():
    """L = sum of the outputs: dL/dW[o, i] = sum over the batch of x[:, i], so the score is |W[o, i]| * |sum x_i|."""
    model = split(nn.Sequential(nn.Linear(3, 2, bias=False)), "wels", 0.5)
    w = torch.tensor([[1.0, -2.0, 0.5],
                      [-0.1, 0.2, 4.0]])
    with torch.no_grad():
        model[0].weight.copy_(w)
    batches = [(torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]]), None), (torch.tensor([[0.0, 0.0, 0.1]]), None)]
    scores = variants.snip_scores(model, lambda x, y: model(x).sum(), batches)
    # sum of x over both batches: (3, 1, 0.1) -> scores [[3, 2, 0.05], [0.3, 0.2, 0.4]]
    assert torch.allclose(scores["0"], torch.tensor([[3.0, 2.0, 0.05], [0.3, 0.2, 0.4]]))
    assert model[0].weight.grad is None  # no .grad touched
    variants.choose_masks_(model, scores, 0.5)
    expected = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool)  # k = 3: 3, 2, 0.4
    assert torch.equal(K.unpack_mask(model[0].fit_mask, w.shape), expected)


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.77])
def test_importance_masks_keep_the_split_rate(rate):
    model = split(resnet18(num_classes=10, in_channels=1, stem="small", width=4), "wels", rate)
    variants.choose_masks_(model, variants.magnitude_scores(model), rate)
    for name, m in masked_layers(model):
        n = m.weight.numel()
        assert int(K.unpack_mask(m.fit_mask, m.weight.shape).sum()) == variants.wels_count(n, rate), name
        # the top-k by |W|: every kept weight is at least as large as every reset one
        keep = K.unpack_mask(m.fit_mask, m.weight.shape)
        a = m.weight.detach().abs()
        assert float(a[keep].min()) >= float(a[~keep].max()), name
    assert variants.wels_count(10, 0.25) == 3 and variants.wels_count(3, 0.01) == 1 and variants.wels_count(7, 1.0) == 7


@pytest.mark.parametrize("criterion, resample", [("magnitude", False), ("snip", True)])
def test_masks_are_chosen_at_the_end_of_training(tmp_path, monkeypatch, criterion, resample):
    """Chosen from the trained network before H^F_1 is evaluated; fixed afterwards, or re-chosen every
    generation with resample_mask; never drawn at random again."""
    chosen = []
    original = variants.choose_masks_

    def recording(model, scores, rate):
        chosen.append({n: s.clone() for n, s in scores.items()})
        return original(model, scores, rate)

    monkeypatch.setattr(variants, "choose_masks_", recording)
    ev = _evolution(tmp_path, split="wels", split_rate=0.5, mask_criterion=criterion, resample_mask=resample,
                    generations=2, epochs=1)
    evaluated = []
    monkeypatch.setattr(Evolution, "evaluate", lambda self, data=None: evaluated.append(len(chosen)) or {"acc": 0.5})
    ev.run()
    assert len(chosen) == (2 if resample else 1)
    assert evaluated[:2] == [1, 1]  # generation 1 is evaluated with the chosen mask
    if criterion == "magnitude":  # the fit mask of the final network is the top-k of the generation-1 weights
        for name, m in masked_layers(ev.model):
            assert torch.equal(m.fit_mask, variants.top_k_mask(chosen[0][name], 0.5)), name
    else:
        for name, m in masked_layers(ev.model):
            assert torch.equal(m.fit_mask, variants.top_k_mask(chosen[1][name], 0.5)), name
        assert any(not torch.equal(chosen[0][n], chosen[1][n]) for n in chosen[0])


def test_config_errors(tmp_path):
    for cfg, words in ((dict(mask_criterion="magnitude"), "wels"), (dict(mask_criterion="size", split="wels"),
                                                                    "mask_criterion"),
                       (dict(reset_from=""), "reset_from"), (dict(task="regress"), "task")):
        with pytest.raises(ValueError, match=words):
            Config(**cfg).validate()
    with pytest.raises(ValueError, match="'layer9'"):
        _evolution(tmp_path, reset_from="layer9")


@pytest.mark.parametrize("bad, word", [
    (["--mask-criterion", "magnitude"], "--mask-criterion"),  # KELS (the default split)
    (["--split", "wels", "--mask-criterion", "big"], "--mask-criterion"),
    (["--reset-from", "layer9"], "--reset-from"), (["--reset-from", "layer3.0.conv"], "--reset-from"),
    (["--model", "small_cnn", "--reset-from", "layer3"], "--reset-from"),
    (["--embedding-dim", "8"], "--embedding-dim"), (["--task", "metric", "--per-class", "5"], "--per-class"),
    (["--task", "metric", "--embedding-dim", "0"], "--embedding-dim"),
])
def test_cli_variant_errors(tmp_path, capsys, bad, word):
    """Exit 2 before any work, with the usage line and one error line naming the flag."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--out", str(tmp_path / "o"), "--device", "cpu", "--generations", "1", "--epochs", "1",
                  "--no-progress", *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ke-fast run ") and err.count("error:") == 1, err
    assert word in err.splitlines()[-1], err
    assert not (tmp_path / "o").exists()
