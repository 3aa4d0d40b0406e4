"""One vocabulary: the new public names, the old ones kept as the same objects, and no function shadowing a module."""
import importlib
import types
import warnings

import pytest
import torch
from torch import nn

import ke_fast


def _model():
    torch.manual_seed(0)
    return ke_fast.split(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), "wels", 0.5, seed=1)


def test_masks_is_the_module_not_a_function():
    import ke_fast.masks as M
    assert isinstance(M, types.ModuleType) and M is importlib.import_module("ke_fast.masks") and M is ke_fast.masks
    assert M.fit_masks is ke_fast.fit_masks and callable(M.layer_mask)


def test_calling_the_masks_module_still_works_and_warns():
    model = _model()
    want = ke_fast.fit_masks(model)
    assert list(want) == ["0", "2"] and all(m.dtype == torch.bool for m in want.values())
    with pytest.warns(DeprecationWarning, match="fit_masks"):
        old = ke_fast.masks(model)
    assert old.keys() == want.keys() and all(torch.equal(old[k], want[k]) for k in want)


def test_fit_masks_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ke_fast.fit_masks(_model())


def test_reset_names_and_their_aliases_are_the_same_objects():
    from ke_fast import convert, ops, reset
    assert ke_fast.reinit_ is ke_fast.reset_ is convert.reset_ is convert.reinit_
    assert ke_fast.ReinitPlan is ke_fast.ResetPlan is reset.ResetPlan is reset.ReinitPlan is ops.ReinitPlan
    with pytest.raises(AttributeError, match="no attribute"):
        ops.NoSuchName  # noqa: B018  (the alias hook answers only the names it forwards)


def test_reset_under_both_names_draws_the_same_values():
    a, b = _model(), _model()
    ke_fast.reset_(a, 2)
    ke_fast.reinit_(b, 2)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)
    before = [p.clone() for p in a.parameters()]
    ke_fast.reset_(a, 3)
    assert any(not torch.equal(p, q) for p, q in zip(before, a.parameters()))  # a reset that did nothing would fail
