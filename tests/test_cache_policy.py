"""The cache policy (ARCHITECTURE.md, "Caches"): a launch table is owned by the ReinitPlan or FitGroup that uses
it and lives exactly as long as it; a table's per-layout copies are never evicted; nothing is built while a CUDA
graph is being captured (a miss there raises). CUDA-only: a reset and a fit-mode forward captured in a CUDA graph,
everything evictable evicted, replayed, compared with eager."""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import ke_fast
import ke_fast.kernels as K
from ke_fast import ops
from ke_fast.kernels import reinit as kreinit
from ke_fast.state import split_state

from conftest import HAS_CUDA

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="CUDA graph capture needs a CUDA device")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 5 * 5, 4))


def _weights(sizes, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, 7, generator=g).to(device) for n in sizes]
    masks = [(torch.rand(w.shape, generator=g) < 0.5).to(device) for w in ws]
    return ws, masks


def _tables(plan: ke_fast.ReinitPlan) -> list[torch.Tensor]:
    return [t for _, _, table, tiles, _ in plan._launches for t in (table, tiles)]


# ---------------------------------------------------------------- ownership (every host)


def test_a_reset_plan_owns_its_launch_tables():
    ws, masks = _weights((5, 9, 3))
    plan = ke_fast.ReinitPlan(ws, masks, seed=1)
    tables = _tables(plan)
    saved = [t.clone() for t in tables]
    refs = [weakref.ref(t) for t in tables]
    others = [ke_fast.ReinitPlan(*_weights((5, 9, 3), seed=s), seed=1) for s in range(20)]  # same sizes
    others += [ke_fast.ReinitPlan(*_weights((s + 1, 2), seed=s), seed=1) for s in range(20)]  # other sizes
    assert all(not any(t is u for t in _tables(o) for u in tables) for o in others)  # nothing shared
    del others
    gc.collect()
    assert [t is u for t, u in zip(_tables(plan), tables)] == [True] * len(tables)
    assert all(torch.equal(t, u) for t, u in zip(tables, saved))
    twin = [w.clone() for w in ws]
    plan.run(3)
    ke_fast.ReinitPlan(twin, masks, seed=1).run(3)
    assert all(torch.equal(a, b) for a, b in zip(ws, twin))
    del plan, tables
    gc.collect()
    assert all(r() is None for r in refs)  # the tables die with their plan: no module cache holds them


def test_a_tables_kept_layouts_are_never_evicted():
    table, _ = K.masked.masks_table((4, 6), torch.device("cpu"))
    words = [K.pack_mask(torch.ones(4)), K.pack_mask(torch.ones(6))]
    w_ptrs = [w.data_ptr() for w in words]
    kept, n = [], kreinit.MAX_ADDRESS_SETS + 4
    bufs = [torch.zeros(20 + i) for i in range(n)]  # kept alive: their addresses stay distinct
    for i, buf in enumerate(bufs):
        parts = [buf[10 + i:14 + i], buf[:6]]  # the first tensor lies 10 + i elements after the second
        filled = kreinit.addressed(table, parts, [t.data_ptr() for t in parts], words, w_ptrs)
        assert filled[:, 0].tolist() == [10 + i, 0]
        kept.append((parts, filled))
    for i, (parts, filled) in enumerate(kept):
        again = kreinit.addressed(table, parts, [t.data_ptr() for t in parts], words, w_ptrs)
        assert (again is filled) == (i < kreinit.MAX_ADDRESS_SETS), i  # the first ones stay; later ones per call
        assert again[:, 0].tolist() == [10 + i, 0]


def test_masked_weights_tables_live_with_their_owner(monkeypatch):
    built = []
    real = K.launch.masks_table
    monkeypatch.setattr(K.launch, "masks_table", lambda *a: (built.append(a), real(*a))[1])
    ws, masks = _weights((5, 9))
    words = [K.pack_mask(m) for m in masks]
    want = [torch.where(m, w, 0.0) for w, m in zip(ws, masks)]
    owner: dict = {}
    for _ in range(3):
        got = ops.masked_weights(ws, words, tables=owner)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(built) == 1 and len(owner) == 1
    (table, tiles), = owner.values()
    refs = [weakref.ref(table), weakref.ref(tiles)]
    del owner, table, tiles
    gc.collect()
    assert all(r() is None for r in refs)  # dropped with their owner
    ops.masked_weights(ws, words)
    ops.masked_weights(ws, words)
    assert len(built) == 3  # without an owner, a table per call: nothing module-wide keeps one


def test_fit_groups_are_kept_by_the_state_with_their_tables(monkeypatch):
    built = []
    real = K.launch.masks_table
    monkeypatch.setattr(K.launch, "masks_table", lambda *a: (built.append(a), real(*a))[1])
    model = ke_fast.split(_net(), "wels", 0.5, seed=3)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        with ke_fast.fit_only(model):
            first = model(x)
            group = model[0]._ke_group
        with ke_fast.fit_only(model):
            assert model[0]._ke_group is group and torch.equal(model(x), first)
    assert len(built) == 1  # the second evaluation computes W*M again, from the same group's table
    assert split_state(model).cached("fit") == [group]
    other = copy.deepcopy(model)
    with torch.no_grad(), ke_fast.fit_only(other):
        other(x)
    assert other[0]._ke_group is not group and len(built) == 2  # a copy's group owns its own table


def test_a_table_miss_while_capturing_raises(monkeypatch):
    monkeypatch.setattr(K.launch, "capturing", lambda: True)  # as inside torch.cuda.graph(...)
    with pytest.raises(RuntimeError, match="capturing a graph.*once before the capture"):
        kreinit.refuse_in_capture(torch.device("cuda"), "building a table")
    kreinit.refuse_in_capture(torch.device("cpu"), "a CPU table")  # no copy to a device: nothing to refuse
    ws, masks = _weights((5, 9))
    ops.masked_weights(ws, [K.pack_mask(m) for m in masks])


# ---------------------------------------------------------------- CUDA graphs (CUDA only)


def _evict_everything(model: nn.Module) -> None:
    """Everything that could once evict a launch table or free a kept layout: other plans and masked_weights
    calls over the same sizes (new tensors, new layouts) and over other sizes, other fit groups; then the
    freed memory is reused and overwritten."""
    params = [p for _, m in ke_fast.masked_layers(model) for p in (m.weight, m.bias) if p is not None]
    words = [w for _, m in ke_fast.masked_layers(model) for w, p in ((m.fit_mask, m.weight), (m.bias_mask, m.bias))
             if p is not None]
    for i in range(12):
        clones = [p.detach().clone() for p in params]
        ke_fast.ReinitPlan(clones, words, seed=5).run(i + 1)
        ops.masked_weights(clones, words)
        ws, masks = _weights((i + 2, 3), device="cuda", seed=i)
        ke_fast.ReinitPlan(ws, masks, seed=1).run(1)
        ops.masked_weights(ws, [K.pack_mask(m) for m in masks])
        other = copy.deepcopy(model)
        with torch.no_grad(), ke_fast.fit_only(other):
            other(torch.randn(2, 3, 7, 7, device="cuda"))
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    garbage = [torch.full((1 << 16,), -1, dtype=torch.int64, device="cuda") for _ in range(64)]  # reuse freed memory
    del garbage


@cuda_only
@pytest.mark.parametrize("whole", [None, {"0": "reset", "5": "keep"}], ids=["masks", "whole-layers"])
def test_captured_reset_replays_like_eager_after_evictions(whole):
    model = ke_fast.split(_net(), "wels", 0.5, seed=3).cuda()
    twin = copy.deepcopy(model)
    ke_fast.reinit_(model, 2, whole=whole)  # outside the capture: the plan, its tables, its layout, the kernel
    ke_fast.reinit_(twin, 2, whole=whole)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ke_fast.reinit_(model, 2, whole=whole)
    _evict_everything(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            p.fill_(7.0)  # every entry 7: the replay must redraw exactly the reset ones
            q.fill_(7.0)
    graph.replay()
    ke_fast.reinit_(twin, 2, whole=whole)
    torch.cuda.synchronize()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert (model[2].weight != 7.0).any() and (model[2].weight == 7.0).any()  # the replay redrew the reset part
    ke_fast.reinit_(model, 3, whole=whole)  # the kept plan still works eagerly


@cuda_only
def test_captured_fit_forward_replays_like_eager_after_evictions():
    model = ke_fast.split(_net(), "wels", 0.5, seed=3).cuda().eval()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 7, 7, device="cuda")
    static_x = x.clone()
    with torch.no_grad(), ke_fast.fit_only(model), ke_fast.fit_only(twin):
        first_out = model(static_x)  # outside the capture: the group's table and layout, the kernels compiled
        for p in model.parameters():
            p.add_(0.0)  # a new version: the captured forward refreshes W*M (a masked_weights launch)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        _evict_everything(model)
        for p, q in zip(model.parameters(), twin.parameters()):
            p.mul_(1.5)  # new weights: the replay reads them through the kept tables
            q.mul_(1.5)
        static_x.copy_(2 * x)
        graph.replay()
        want = twin(2 * x)
        torch.cuda.synchronize()
    torch.testing.assert_close(static_out, want)  # (a freed or stale table would give garbage, not rounding)
    assert not torch.allclose(static_out, first_out)


@cuda_only
def test_a_miss_inside_a_capture_raises_a_clear_error():
    model = ke_fast.split(_net(), "wels", 0.5, seed=3).cuda().eval()
    x = torch.randn(2, 3, 7, 7, device="cuda")
    with torch.no_grad():
        model(x)  # the dense forward's kernels are ready; the fit group's table is not
    torch.cuda.synchronize()
    for what in ("reset", "fit", "plan"):
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="capturing a graph"):
            with torch.cuda.graph(graph):
                if what == "reset":
                    ke_fast.reinit_(model, 1)  # no plan kept yet
                elif what == "fit":
                    with torch.no_grad(), ke_fast.fit_only(model):
                        model(x)
                else:
                    ke_fast.ReinitPlan([model[0].weight.detach()], [model[0].fit_mask], seed=1)
        torch.cuda.synchronize()
    assert split_state(model).cached("reset") == []
    ke_fast.reinit_(model, 1)  # outside a capture the same calls work
    with torch.no_grad(), ke_fast.fit_only(model):
        model(x)
