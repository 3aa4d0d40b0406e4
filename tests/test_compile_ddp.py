"""torch.compile(fullgraph=True) of a split model matches eager (dense and fit mode), and 2-rank DDP
(gloo, CPU) sees identical masks and identical weights after a training step and a reset, then tears
its process group down completely."""
import os
import time

import torch

if not torch.cuda.is_available():  # before ke_fast (triton.jit) is imported, also in spawned children
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
SEED = 11


def _model():
    from ke_fast.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=10, width=8, stem="small")


# ---------------------------------------------------------------- torch.compile


def test_compile_fullgraph_matches_eager_dense_and_fit():
    import ke_fast

    torch._dynamo.reset()
    model = ke_fast.split(_model(), "wels", 0.5, seed=1).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager_dense = model(x)
        comp_dense = compiled(x)
    torch.testing.assert_close(comp_dense, eager_dense, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    with torch.no_grad(), ke_fast.fit_only(model):
        eager_fit = model(x)
        comp_fit = compiled(x)
    torch.testing.assert_close(comp_fit, eager_fit, rtol=1e-4, atol=1e-5)
    # the compiled graph really switched: fit and dense outputs differ
    assert not torch.allclose(comp_fit, comp_dense, rtol=1e-2, atol=1e-3)
    assert all(m.mode == "dense" for _, m in ke_fast.masked_layers(model))
    torch._dynamo.reset()


def test_compile_fullgraph_fit_mode_backward():
    """The masked_weight autograd formula under AOTAutograd: compiled gradients equal eager ones."""
    import ke_fast
    import ke_fast.kernels as K
    from ke_fast.models import MLP

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ke_fast.split(MLP(in_features=20, hidden=(17, 9), num_classes=5), "wels", 0.5, seed=2)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True)
    grads = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        with ke_fast.fit_only(model):
            fn(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    eager, comp = grads
    for n in eager:
        torch.testing.assert_close(comp[n], eager[n], rtol=1e-4, atol=1e-5)
    for name, m in ke_fast.masked_layers(model):
        reset = ~K.unpack_mask(m.fit_mask, m.weight.shape)
        assert reset.any() and (comp[f"{name}.weight"][reset] == 0).all(), name
    torch._dynamo.reset()


def test_compile_fullgraph_subclass_fit_mode():
    """A subclass's own forward in fit mode (W*M presented as self.weight) compiles without a graph break and
    gives eager's output and gradients."""
    import torch.nn.functional as F
    from torch import nn

    import ke_fast

    class StdConv(nn.Conv2d):  # weight standardisation in forward, as timm's StdConv2d
        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0.0, eps=1e-6).reshape_as(self.weight)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ke_fast.split(nn.Sequential(StdConv(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), "wels", 0.5, seed=3)
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True)
    outs, grads = [], []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        with ke_fast.fit_only(model):
            out = fn(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for comp, eager in zip(grads[1], grads[0]):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    torch._dynamo.reset()


# ---------------------------------------------------------------- DDP


def _flat_masks(model):
    import ke_fast

    return torch.cat([m.fit_mask.to(torch.int64) for _, m in ke_fast.masked_layers(model)])


def _flat_weights(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _checksum(t):
    t = t.double()
    idx = torch.arange(1, t.numel() + 1, dtype=torch.float64)
    return torch.stack([t.sum(), (t * idx).sum(), (t * t).sum()])


def _ddp_steps(rank, world):
    """Per split mode: split, a fit-mode DDP step, reset; gather what both ranks hold.

    Every model, DDP wrapper and collective buffer is gone when this returns."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import ke_fast
    import ke_fast.kernels as K

    result = {}
    for mode in ("kels", "wels"):
        model = _model()
        ke_fast.split(model, mode, 0.5, seed=SEED)
        masks = _flat_masks(model).clone()
        w_init = _flat_weights(model).clone()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        x = torch.randn(2, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (2,), generator=g)
        with ke_fast.fit_only(model):
            loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        zero_reset_grads = all(
            bool((m.weight.grad[~K.unpack_mask(m.fit_mask, m.weight.shape)] == 0).all())
            for _, m in ke_fast.masked_layers(model))
        opt.step()
        w_step = _flat_weights(model).clone()
        ke_fast.reinit_(model, 1)
        w_reinit = _flat_weights(model)
        local = torch.cat([_checksum(masks), _checksum(w_step), _checksum(w_reinit)])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        full_masks = [torch.empty_like(masks) for _ in range(world)]
        dist.all_gather(full_masks, masks)
        full_w = [torch.empty_like(w_reinit) for _ in range(world)]
        dist.all_gather(full_w, w_reinit)
        result[mode] = dict(
            checksums=torch.stack(gathered),
            masks_equal=all(torch.equal(full_masks[0], t) for t in full_masks[1:]),
            weights_equal=all(torch.equal(full_w[0], t) for t in full_w[1:]),
            stepped=not torch.equal(w_init, w_step),
            reset_changed=not torch.equal(w_step, w_reinit),
            zero_reset_grads=zero_reset_grads,
            masks=masks,
            loss=float(loss),
        )
    return result


def _group_threads():
    """Names of this process's threads that belong to a process group (gloo workers and transport loop,
    the TCPStore server); read from /proc, so empty where there is none (not Linux)."""
    task = "/proc/self/task"
    names = []
    for tid in os.listdir(task) if os.path.isdir(task) else []:
        try:
            with open(os.path.join(task, tid, "comm")) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return [n for n in names if "gloo" in n or "tcpstore" in n]


def _ddp_worker(rank, world, store_path, out_path):
    """One DDP rank: the steps, then a teardown that leaves no thread of the process group running (one
    that runs on into interpreter shutdown can abort the process); rank 0 saves what it saw."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.distributed as dist

    from ke_fast.evolve import init_process_group

    torch.set_num_threads(1)
    # a FileStore rendezvous: no port is picked here and bound later by another process (that raced); gloo
    # binds its own connections to ports the OS hands out
    init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        result = _ddp_steps(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # a thread just joined can linger in /proc for a moment; a leaked one stays. 30 s: generous on a loaded
    # machine, and only a failing run waits that long
    deadline = time.monotonic() + 30
    while (left := _group_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not left, f"rank {rank}: threads of the process group outlive destroy_process_group: {left}"
    if rank == 0:
        torch.save(result, out_path)


def test_ddp_two_ranks_identical_masks_and_resets(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required")
    import ke_fast

    out = tmp_path / "ddp_result.pt"
    mp.start_processes(_ddp_worker, args=(WORLD, str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")
    result = torch.load(out, weights_only=False)
    for mode in ("kels", "wels"):
        r = result[mode]
        cs = r["checksums"]
        assert cs.shape == (WORLD, 9)
        assert torch.equal(cs[0], cs[1]), mode  # masks, weights after the step, weights after reset
        assert r["masks_equal"] and r["weights_equal"], mode
        assert r["stepped"] and r["reset_changed"] and r["zero_reset_grads"], mode
        # the ranks' masks are also the ones this (rank-less) process draws
        local = ke_fast.split(_model(), mode, 0.5, seed=SEED)
        assert torch.equal(_flat_masks(local), r["masks"]), mode
