"""The one object of a split model (ke_fast.state.SplitState): where it lives, what it keeps, how it follows
copies, pickles, ``torch.save``, ``.to()``, ``load_state_dict``, a submodule used alone, wrappers (DDP),
``revert``, and checkpoints written before it existed (tests/data, written by ke_fast at ab0367b)."""
import ast
import copy
import gc
import io
import pickle
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ke_fast
from ke_fast import MaskedConv2d, MaskedLinear
from ke_fast.models import resnet18
import ke_fast.kernels as K
from ke_fast.state import LAYER_ATTR, ROOT_ATTR, SplitState, split_state, whole_words

FIXTURE = Path(__file__).parent / "data" / "split_main_ab0367b.pt"


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 5 * 5, 4))


X = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fit(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad(), ke_fast.fit_only(model):
        return model(x)


# ---------------------------------------------------------------- where it lives


def test_split_makes_one_state_for_the_model_and_its_layers():
    plain = _net()
    keys = set(plain.state_dict())
    model = ke_fast.split(plain, "wels", 0.3, seed=9)
    state = split_state(model)
    assert isinstance(state, SplitState) and (state.mode, state.split_rate, state.seed) == ("wels", 0.3, 9)
    layers = ke_fast.masked_layers(model)
    assert [n for n, _ in layers] == ["0", "2", "5"]
    assert all(m.__dict__[LAYER_ATTR] is state and m.ke_seed == 9 for _, m in layers)
    assert all("ke_seed" not in m.__dict__ for _, m in layers)  # one seed, on the state: no per-layer copies
    # nothing of it is in the checkpoint: the only new keys are the fit masks
    assert set(model.state_dict()) == keys | {f"{n}.fit_mask" for n, _ in layers}
    adopted = ke_fast.adopt(nn.Sequential(_OfficialLike(3, 4, 3)), seed=5)
    st = split_state(adopted)
    assert (st.mode, st.split_rate, st.seed) == ("custom", None, 5) and adopted[0].ke_seed == 5


class _OfficialLike(nn.Conv2d):
    """The official KE layer's float ``mask`` Parameter (1 = fit)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask = nn.Parameter((torch.rand(self.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
                                 .float(), requires_grad=False)


def test_model_level_operations_read_the_state_instead_of_walking_the_model():
    model = ke_fast.split(resnet18(num_classes=10, width=4, stem="small"), "wels", 0.5, seed=2)
    walks = []
    real = model.named_modules
    model.named_modules = lambda *a, **k: (walks.append(1), real(*a, **k))[1]  # counts walks of the model
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in ke_fast.masked_layers(model)]
    ke_fast.masks(model)
    ke_fast.reinit_(model, 1)
    ke_fast.reinit_(model, 2, whole={names[0]: "keep"})
    with torch.no_grad(), ke_fast.fit_only(model):
        model(x)
    ke_fast.set_mode(model, "fit")
    ke_fast.set_mode(model, "dense")
    assert walks == []  # the state's list of layers, checked at their paths: no walk
    assert len(names) == 21
    list(model.modules())  # (the counter does count walks)
    assert walks == [1]


def test_layer_list_follows_replaced_and_reverted_layers():
    model = ke_fast.split(resnet18(num_classes=10, width=4, stem="small"), "kels", 0.5, seed=2)
    n_all = len(ke_fast.masked_layers(model))
    ke_fast.reinit_(model, 1)
    old_fc = weakref.ref(model.fc)
    model.fc = nn.Linear(model.fc.in_features, 10)  # a new dense classifier in place of the masked one
    gc.collect()  # (split's fx trace of the KELS roles leaves a GraphModule cycle behind)
    assert old_fc() is None  # nothing of ke_fast keeps a replaced layer alive
    assert "fc" not in dict(ke_fast.masked_layers(model))
    ke_fast.revert(model.layer1)
    names = [n for n, _ in ke_fast.masked_layers(model)]
    assert len(names) == n_all - 1 - 4 and not any(n.startswith("layer1.") for n in names)
    before = _params(model)
    ke_fast.reinit_(model, 2)  # resets exactly the layers still split
    after = _params(model)
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == any(k in (f"{n}.weight", f"{n}.bias") for n in names), k
    assert len(split_state(model).cached("reset")) == 1  # the plan of the old layer set (its fc gone) is dropped
    ke_fast.split(model.layer1, "wels", 0.3, seed=4)  # split again on its own: listed again
    inner = [f"layer1.{n}" for n, _ in ke_fast.masked_layers(model.layer1)]
    assert len(inner) == 4 and [n for n, _ in ke_fast.masked_layers(model)][:5] == ["conv1"] + inner
    model.extra = copy.deepcopy(model.layer2[0].conv1)  # a copy of a masked layer, assigned
    assert "extra" in dict(ke_fast.masked_layers(model))


# ---------------------------------------------------------------- copies, pickles, moves, checkpoints


def _torch_save(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_carry_the_settings_and_rebuild_the_caches(how):
    model = ke_fast.split(_net(), "wels", 0.5, seed=4)
    ke_fast.reinit_(model, 1)
    fit = _fit(model)
    state = split_state(model)
    assert len(state.cached("reset")) == 1 and len(state.cached("fit")) == 1
    clone = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
             "torch.save": _torch_save}[how](model)
    st = split_state(clone)
    assert st is not state and (st.mode, st.split_rate, st.seed) == ("wels", 0.5, 4)
    assert st.cached("reset") == [] and st.cached("fit") == []  # caches refer to the original's tensors
    assert all(m.__dict__[LAYER_ATTR] is st for _, m in ke_fast.masked_layers(clone))
    assert torch.equal(_fit(clone), fit)
    ke_fast.reinit_(clone, 2)
    ke_fast.reinit_(model, 2)
    assert _same(_params(clone), _params(model))
    snapshot = _params(model)
    ke_fast.reinit_(clone, 3)  # the copy's plan writes the copy's tensors only
    assert not _same(_params(clone), snapshot) and _same(_params(model), snapshot)


def test_deepcopy_of_one_layer_copies_only_its_own_state():
    model = ke_fast.split(_net(), "wels", 0.5, seed=4)
    layer = copy.deepcopy(model[2])
    assert split_state(layer) is not split_state(model) and split_state(layer).seed == 4
    assert [n for n, _ in ke_fast.masked_layers(layer)] == [""]
    ke_fast.reinit_(layer, 1)  # its own seed and stream: the values the whole model's reset gives this layer
    ke_fast.reinit_(model, 1)
    assert torch.equal(layer.weight, model[2].weight) and torch.equal(layer.bias, model[2].bias)


def test_moving_the_model_drops_its_plans_and_the_reset_follows_the_new_storage():
    model = ke_fast.split(_net(), "wels", 0.5, seed=4)
    twin = copy.deepcopy(model)
    ke_fast.reinit_(model, 1)
    with torch.no_grad(), ke_fast.fit_only(model):
        model(X)
    model.double()
    assert split_state(model).cached("reset") == [] and split_state(model).cached("fit") == []
    ke_fast.reinit_(model, 2)
    ke_fast.reinit_(twin, 1)
    twin.double()
    ke_fast.reinit_(twin, 2)
    assert _same(_params(model), _params(twin))


def test_load_state_dict_keeps_the_state_and_the_reset_follows_the_loaded_masks():
    src = ke_fast.split(_net(1), "wels", 0.5, seed=1)
    dst = ke_fast.split(_net(2), "wels", 0.5, seed=1)
    ke_fast.reinit_(dst, 1)  # a plan for dst's own masks
    state = split_state(dst)
    src[0].set_fit_mask(ke_fast.ops.wels_mask_bits(src[0].weight.shape, 0.2, seed=8, stream=3))
    dst.load_state_dict(src.state_dict())
    assert split_state(dst) is state
    ke_fast.reinit_(dst, 2)
    ke_fast.reinit_(src, 2)
    assert _same(_params(dst), _params(src))  # the kept plan was rebuilt for the loaded masks


def test_checkpoints_written_before_the_state_existed_load():
    """tests/data/split_main_ab0367b.pt: state_dicts and whole-model pickles of split models, their outputs and
    a reset, written by ke_fast at ab0367b (tests/data/make_split_main_fixture.py)."""
    old = torch.load(FIXTURE, weights_only=False)
    x = old["x"]
    for mode, seed in (("kels", 3), ("wels", 7)):
        # a state_dict loads into a model split today (other seed, other weights): same keys, same masks
        model = ke_fast.split(_net(5), mode, 0.5, seed=99)
        assert set(model.state_dict()) == set(old[f"{mode}_state_dict"])
        model.load_state_dict(old[f"{mode}_state_dict"], strict=True)
        assert torch.equal(_fit(model, x), old[f"{mode}_fit"])
        # a whole pickled model: its layers carried a copy of the seed each; now they get a state from it
        pickled = old[f"{mode}_model"]
        assert all(split_state(m).seed == seed and m.ke_seed == seed for _, m in ke_fast.masked_layers(pickled))
        with torch.no_grad():
            assert torch.equal(pickled(x), old[f"{mode}_dense"])
        assert torch.equal(_fit(pickled, x), old[f"{mode}_fit"])
        ke_fast.reinit_(pickled, 1)
        after = pickled.state_dict()
        assert all(torch.equal(after[k], v) for k, v in old[f"{mode}_reinit1"].items())  # bit for bit
        ke_fast.revert(pickled)
        assert not ke_fast.masked_layers(pickled)


@pytest.mark.parametrize("numel", [1, 5, 31, 32, 33, 95, 100])
def test_whole_layer_words_are_made_without_a_host_copy_and_equal_packed_masks(numel, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append(a))  # a host tensor copied to the device
    got = {how: whole_words(how, numel, torch.device("cpu")) for how in ("keep", "reset")}
    assert calls == []
    monkeypatch.undo()
    for how, words in got.items():
        assert torch.equal(words, K.pack_mask(torch.full((numel,), how == "keep", dtype=torch.bool))), how


# ---------------------------------------------------------------- submodules, wrappers, revert


def test_a_submodule_used_alone_reaches_the_models_state():
    model = ke_fast.split(resnet18(num_classes=10, width=4, stem="small"), "wels", 0.5, seed=5)
    twin = copy.deepcopy(model)
    state = split_state(model)
    assert split_state(model.layer1) is state
    before = _params(model)
    ke_fast.reinit_(model.layer1, 1)
    ke_fast.reinit_(twin, 1)
    after, full = _params(model), _params(twin)
    for k in before:  # layer1: the values of the whole model's reset (its streams); the rest untouched
        assert torch.equal(after[k], full[k] if k.startswith("layer1.") and "conv" in k else before[k]), k
    ke_fast.reinit_(model, 2)
    plans = state.cached("reset")
    assert len(plans) == 2  # one per layer set: the model's and layer1's, neither evicts the other
    ke_fast.reinit_(model.layer1, 3)
    ke_fast.reinit_(model, 4)
    assert state.cached("reset") == plans


class _Wrapper(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_a_wrapper_shares_the_models_plans_and_groups():
    model = ke_fast.split(_net(), "wels", 0.5, seed=6)
    twin = copy.deepcopy(model)
    wrapped = _Wrapper(model)
    assert [n for n, _ in ke_fast.masked_layers(wrapped)] == ["module.0", "module.2", "module.5"]
    ke_fast.reinit_(wrapped, 1, whole={"module.0": "keep"})
    ke_fast.reinit_(twin, 1, whole={"0": "keep"})
    assert _same(_params(model), _params(twin))
    ke_fast.reinit_(model, 2, whole={"0": "keep"})
    assert len(split_state(model).cached("reset")) == 1  # the wrapper's call and the model's: one plan
    assert torch.equal(_fit(wrapped), _fit(model)) and len(split_state(model).cached("fit")) == 1


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_wrapped_model_uses_the_models_state():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = ke_fast.split(_net(), "wels", 0.5, seed=6)
        twin = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert split_state(ddp) is split_state(model)
        ke_fast.reinit_(ddp, 1)
        ke_fast.reinit_(twin, 1)
        assert _same(_params(model), _params(twin))
        with torch.no_grad(), ke_fast.fit_only(ddp):
            out = ddp(X)
        assert torch.equal(out, _fit(twin))
        ke_fast.reinit_(model, 2)
        assert len(split_state(model).cached("reset")) == 1
    finally:
        dist.destroy_process_group()


def test_revert_drops_the_state_and_a_new_split_makes_a_new_one():
    model = ke_fast.split(_net(), "wels", 0.5, seed=6)
    ke_fast.reinit_(model, 1)
    _fit(model)
    ke_fast.revert(model)
    assert split_state(model) is None
    for m in model.modules():
        assert not {ROOT_ATTR, LAYER_ATTR, "_ke_fit", "_ke_keep", "_ke_group"} & set(m.__dict__), type(m)
    ke_fast.split(model, "kels", 0.5, seed=8)
    assert split_state(model).seed == 8 and split_state(model).mode == "kels"


def test_layers_built_directly_and_split_with_different_seeds():
    same = nn.Sequential(MaskedConv2d(3, 4, 3, split_mode="wels", seed=3, layer_index=0), nn.Flatten(),
                         MaskedLinear(4 * 5 * 5, 2, split_mode="wels", seed=3, layer_index=1))
    assert split_state(same[0]).seed == 3 and split_state(same) is None  # one state per layer built directly
    ke_fast.reinit_(same, 1)  # they agree on the seed
    mixed = nn.Sequential(MaskedLinear(4, 4, split_mode="wels", seed=1),
                          MaskedLinear(4, 2, split_mode="wels", seed=2, layer_index=1))
    before = _params(mixed)
    with pytest.raises(ValueError, match=r"different seeds \('0': 1, '1': 2\): pass seed="):
        ke_fast.reinit_(mixed, 1)
    assert _same(_params(mixed), before)
    ke_fast.reinit_(mixed, 1, seed=5)
    assert not _same(_params(mixed), before)


# ---------------------------------------------------------------- imports flow one way


def _ke_fast_imports(name: str) -> set[str]:
    """The ke_fast modules ``ke_fast/<name>.py`` imports, anywhere in the file (function bodies too)."""
    tree = ast.parse((Path(ke_fast.__file__).parent / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ke_fast"):
            out.add(node.module.split(".")[1] if "." in node.module else "")
    return out


def test_split_rooms_import_one_way():
    """convert -> nn -> masks -> state -> ops -> kernels: no module imports one above it (no masks <-> nn circle)."""
    order = ["convert", "nn", "masks", "state", "ops"]
    for i, name in enumerate(order):
        above = set(order[:i])
        assert not _ke_fast_imports(name) & above, (name, _ke_fast_imports(name) & above)
    assert "nn" in _ke_fast_imports("convert") and "state" in _ke_fast_imports("masks")
