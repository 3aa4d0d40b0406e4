"""Fit mode without per-layer launches: the cached W*M of evaluation (one ``ke_fast::masked_weights`` call on
the first forward, none after, invalidated by every change of weight, bias, mask, device or dtype), the
training paths of ``ke_fast.nn.TRAIN_PATH`` (equal gradients, one call per forward and one per backward on
the batched path), the multi-tensor op itself, and the packed-mask cache of a one-shot ``ReinitPlan``."""
import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ke_fast
import ke_fast.kernels as K
from ke_fast import nn as knn
from ke_fast import ops
from ke_fast.kernels import reinit as kreinit

from conftest import DEVICE, TOL


class OpCalls(TorchDispatchMode):
    """Counts the calls of each ke_fast op made inside the ``with`` block (one call = one launch per dtype on a
    GPU for ``masked_weights``)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("ke_fast."):
            name = name[len("ke_fast."):]
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _model(device="cpu"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, bias=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(5 * 5 * 5, 4))
    ke_fast.split(net, "wels", 0.5, seed=3)
    with torch.no_grad():  # non-zero biases so a wrong bias mask shows
        net[0].bias.uniform_(-1.0, 1.0)
        net[5].bias.uniform_(-1.0, 1.0)
    return net.to(device)


def _input(device="cpu", dtype=torch.float32):
    return torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)


def _plain_output(net, x):
    """The oracle: a dense copy of ``net`` whose weights and biases hold W*M and b*M_out (plain torch ops)."""
    plain = copy.deepcopy(net)
    ke_fast.set_mode(plain, "dense")
    with torch.no_grad():
        for _, m in ke_fast.masked_layers(plain):
            m.weight.mul_(K.unpack_mask(m.fit_mask, m.weight.shape).to(m.weight.dtype))
            if m.bias is not None:
                m.bias.mul_(K.unpack_mask(m.bias_mask, m.bias.shape).to(m.bias.dtype))
        return plain(x)


def _check_eval(net, x, launches):
    """Two forwards under no_grad in fit mode: ``launches`` masked_weights calls on the first, none on the
    second, no per-layer op, and the oracle's output."""
    with torch.no_grad():
        with OpCalls() as first:
            out = net(x)
        with OpCalls() as second:
            again = net(x)
    assert first.calls == ({"masked_weights": launches} if launches else {})
    assert second.calls == {}
    tol = TOL.get(x.dtype, {})
    torch.testing.assert_close(out, _plain_output(net, x), **tol)
    assert torch.equal(again, out)
    return out


def test_eval_cache_one_launch_then_none_and_invalidated_by_every_change(impl):
    net = _model(impl.device)
    x = _input(impl.device)
    with ke_fast.fit_only(net):
        before = _check_eval(net, x, 1)
        # an optimizer step (in-place update of every parameter)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        F.cross_entropy(net(x), torch.tensor([0, 1], device=impl.device)).backward()
        opt.step()
        after_step = _check_eval(net, x, 1)
        assert not torch.allclose(after_step, before)
        # a new mask for one layer: only it is stale, but the refresh is still one call
        conv = net[2]
        conv.set_fit_mask(ops.wels_mask_bits(conv.weight.shape, 0.3, seed=9, stream=1, device=impl.device))
        after_mask = _check_eval(net, x, 1)
        assert not torch.allclose(after_mask, after_step)
        # an in-place change of a mask (version counter)
        net[0].fit_mask.zero_()
        _check_eval(net, x, 1)
        # load_state_dict (other weights)
        net.load_state_dict(_model(impl.device).state_dict())
        torch.testing.assert_close(_check_eval(net, x, 1), before)
        # dtype casts: .to(dtype) and .half() (each followed by one refresh in the new dtype)
        net.to(torch.float64)
        _check_eval(net, x.double(), 1)
        net.half()
        _check_eval(net, x.half(), 1)
    assert all(m._ke_fit is None for _, m in ke_fast.masked_layers(net))  # dense again: the cache is dropped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving a model between devices needs CUDA")
def test_eval_cache_invalidated_by_device_move():
    net = _model("cpu")
    with ke_fast.fit_only(net):
        _check_eval(net, _input("cpu"), 1)
        net.to("cuda")
        _check_eval(net, _input("cuda"), 1)


def test_eval_cache_follows_autocast_dtype():
    net = _model(DEVICE)
    x = _input(DEVICE)
    with ke_fast.fit_only(net), torch.no_grad():
        net(x)
        with torch.autocast(DEVICE, dtype=torch.bfloat16), OpCalls() as calls:
            out = net(x)
        assert calls.calls == {"masked_weights": 1} and out.dtype == torch.bfloat16
        assert net[0]._ke_fit[1].dtype == torch.bfloat16


def test_eval_cache_not_kept_by_copies():
    net = _model()
    with ke_fast.fit_only(net), torch.no_grad():
        net(_input())
        clone = copy.deepcopy(net)
    assert all(m._ke_fit is None and m._ke_group is None for _, m in ke_fast.masked_layers(clone))
    assert [m.mode for _, m in ke_fast.masked_layers(clone)] == ["fit"] * 3
    with torch.no_grad():  # a copy made in fit mode caches again on its own
        torch.testing.assert_close(clone(_input()), _plain_output(clone, _input()))


def _oracle_grads(net, x):
    """Gradients of the loss at W*M and b*M_out, masked by hand: the dense model on those values (plain torch)."""
    dense = copy.deepcopy(net)
    ke_fast.set_mode(dense, "dense")
    params, keeps = {}, {}
    for name, m in ke_fast.masked_layers(net):
        for kind, t, words in (("weight", m.weight, m.fit_mask), ("bias", m.bias, m.bias_mask)):
            if t is not None:
                keeps[f"{name}.{kind}"] = keep = K.unpack_mask(words, t.shape)
                params[f"{name}.{kind}"] = (t.detach() * keep).requires_grad_(True)
    torch.func.functional_call(dense, params, (x,)).square().sum().backward()
    return {k: p.grad * keeps[k] for k, p in params.items()}


def _check_training_path(path, device, monkeypatch):
    monkeypatch.setitem(knn.TRAIN_PATH, device, path)
    net = _model(device)
    x = _input(device)
    ke_fast.set_mode(net, "fit")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # after a step, the cached values of the first step must not be reused
        want = _oracle_grads(net, x)
        opt.zero_grad(set_to_none=True)
        with OpCalls() as calls:
            net(x).square().sum().backward()
        assert calls.calls == {"op": {"masked_weight": 10}, "eager": {}, "batched": {"masked_weights": 2}}[path]
        got = dict(net.named_parameters())
        assert set(got) == set(want)
        for name, grad in want.items():
            torch.testing.assert_close(got[name].grad, grad, **TOL[torch.float32])
        opt.step()


@pytest.mark.parametrize("path", ["op", "batched"])
def test_kernel_training_paths_give_the_reference_gradients(impl, path, monkeypatch):
    _check_training_path(path, impl.device, monkeypatch)


def test_eager_training_path_gives_the_reference_gradients(monkeypatch):  # plain torch: no implementation to pick
    _check_training_path("eager", DEVICE, monkeypatch)


def test_batched_path_gradient_accumulation_and_double_use(monkeypatch):
    """Two forwards and backwards without a step (the second forward must not reuse spent values), and a
    layer called twice in one forward (its value is reused, the gradient sums)."""
    monkeypatch.setitem(knn.TRAIN_PATH, "cpu", "batched")
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    net = ke_fast.split(nn.Sequential(nn.Linear(6, 6), lin, nn.ReLU(), lin), "wels", 0.5, seed=1)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    ke_fast.set_mode(net, "dense")
    net(x).sum().backward()
    dense = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    ke_fast.set_mode(net, "fit")
    for _ in range(2):
        with OpCalls() as calls:
            net(x).sum().backward()
        assert calls.calls == {"masked_weights": 2}
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x).sum().backward()
    for acc, one in zip(grads, (p.grad for p in net.parameters())):
        torch.testing.assert_close(acc, 2 * one)
    assert any(not torch.equal(g, d) for g, d in zip(grads, dense))  # fit mode really masked something


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=str)
def test_masked_weights_op_matches_single_and_opcheck(impl, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 123), (7, 3, 3, 3), (33,), (1,)]
    ws = [torch.randn(s, generator=g).to(impl.device).requires_grad_(True) for s in shapes]
    words = [ops.wels_mask_bits(s, 0.5, seed=1, stream=i, device=impl.device) for i, s in enumerate(shapes)]
    outs = ops.masked_weights(ws, words, dtype)
    for w, m, o in zip(ws, words, outs):
        assert torch.equal(o, ops.masked_weight(w, m, dtype))
    sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
    for i, (w, m) in enumerate(zip(ws, words)):
        keep = K.unpack_mask(m, w.shape)
        want = torch.where(keep, torch.full(w.shape, i + 1.0, device=impl.device), 0.0)
        assert torch.equal(w.grad, want.to(dtype or torch.float32).float())
    table, tiles = K.masked.masks_table(tuple(w.numel() for w in ws), torch.device(impl.device))
    torch.library.opcheck(torch.ops.ke_fast.masked_weights.default, (ws, words, table, tiles, dtype or torch.float32))


def test_masked_weights_rejects_bad_input():
    w = torch.randn(5, 7)
    words = K.pack_mask(torch.ones(5, 7))
    with pytest.raises(ValueError, match="one words tensor per weight"):
        ops.masked_weights([w, w], [words])
    with pytest.raises(ValueError, match="one dtype and device"):
        ops.masked_weights([w, w.double()], [words, words])
    with pytest.raises(ValueError, match="words must be"):
        ops.masked_weights([w], [words[:1]])
    with pytest.raises(TypeError, match="lists of tensors"):
        ops.masked_weights(w, words)


def test_reinit_plan_caches_packed_float_masks(monkeypatch):
    packs = []
    real = K.launch.pack_mask  # the host side of the reset (Triton-free) packs float masks
    monkeypatch.setattr(K.launch, "pack_mask", lambda m: packs.append(id(m)) or real(m))  # ids: keep no mask alive
    torch.manual_seed(0)
    weights = [torch.randn(8, 4, 3, 3), torch.randn(10, 8)]
    masks = [(torch.rand(w.shape) < 0.5).float() for w in weights]
    originals = [w.clone() for w in weights]
    ke_fast.ReinitPlan(weights, masks, seed=1).run(1)
    assert len(packs) == 2
    first = [w.clone() for w in weights]
    for w, o in zip(weights, originals):
        w.copy_(o)
    ke_fast.ReinitPlan(weights, masks, seed=1).run(1)
    assert len(packs) == 2  # repeat: no packing, same result
    assert all(torch.equal(a, b) for a, b in zip(weights, first))
    masks[1][0].fill_(1.0)  # in place: that mask is packed again, and the reset follows it
    ke_fast.ReinitPlan(weights, masks, seed=1).run(2)
    assert len(packs) == 3 and packs[-1] == id(masks[1])
    assert torch.equal(weights[1][0], first[1][0])  # row 0 is all fit now: unchanged by generation 2
    masks[0].fill_(2.0)  # the validation runs again after an in-place change
    with pytest.raises(ValueError, match="only 0 and 1"):
        ke_fast.ReinitPlan(weights, masks, seed=1)
    n = len(kreinit._PACKED)
    del masks
    gc.collect()
    assert len(kreinit._PACKED) <= n - 2  # weakly keyed: the entries die with their masks


def test_multi_tensor_table_offsets_follow_the_layout_not_the_addresses():
    """The launch offsets are cached per layout: two sets of tensors laid out alike share one filled table,
    a set laid out otherwise gets its own (and both give the right values)."""
    table, _ = K.masked.masks_table((4, 6), torch.device("cpu"))
    words = [K.pack_mask(torch.ones(4)), K.pack_mask(torch.ones(6))]
    a, b = torch.arange(10.0), torch.arange(10.0) + 100
    first = kreinit.addressed(table, list(a.split([4, 6])), [t.data_ptr() for t in a.split([4, 6])], words,
                              [w.data_ptr() for w in words])
    same = kreinit.addressed(table, list(b.split([4, 6])), [t.data_ptr() for t in b.split([4, 6])], words,
                             [w.data_ptr() for w in words])
    assert same is first and first[:, 0].tolist() == [0, 4]
    c = torch.arange(16.0)
    parts = [c[10:14], c[:6]]  # the second tensor lies first in memory
    other = kreinit.addressed(table, parts, [t.data_ptr() for t in parts], words, [w.data_ptr() for w in words])
    assert other is not first and other[:, 0].tolist() == [10, 0]


def test_batched_path_with_a_frozen_layer(monkeypatch):
    monkeypatch.setitem(knn.TRAIN_PATH, "cpu", "batched")
    net = _model()
    net[0].requires_grad_(False)
    ke_fast.set_mode(net, "fit")
    x = _input()
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        net(x).square().sum().backward()
        want = _oracle_grads(net, x)
        assert net[0].weight.grad is None
        for name, p in net.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, want[name], **TOL[torch.float32])
