"""The training step (ke_fast.step): the CPU proxies of the CUDA-graph step and the CUDA tests themselves.

On CPU: the step's forward + loss and the evaluation forwards compile with ``fullgraph=True`` (no graph break)
and compile as often for 2 generations as for 4 (the reset and the fresh optimizer change nothing a guard
reads); the in-place fresh optimizer of GraphStep is bit for bit a new SGD; a step does no host read and a
constant amount of work whatever the number of steps. On CUDA: capture once, replay across resets, equal to
eager.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

from ke_fast import cli
from ke_fast.batches import Batches, eval_plan
from ke_fast.convert import fit_only, reinit_, split
from ke_fast.data import ImageSet
from ke_fast.evolve import Config, ConfigError, Evolution, reset_generation_
from ke_fast.models import SmallCNN
from ke_fast.runner import _run_options
from ke_fast.step import (EagerStep, GraphEval, GraphStep, _load_in_place, compile_mode, eval_body, refresh_,
                          train_body, use_graphs)
from ke_fast.tasks import TASKS

CPU = torch.device("cpu")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device; the CPU proxies above stand in")
# compiled (aot_eager: the joint forward/backward graph AOTAutograd makes, run by eager kernels) vs eager:
# the same kernels in a possibly different order of the backward's sums
RTOL, ATOL = 1e-5, 1e-6


def _model(seed: int = 0, in_channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = SmallCNN(3, in_channels=in_channels, width=4)
    split(m, "kels", 0.5, seed=seed)
    reinit_(m, 0, init="kaiming_normal", purpose="init", ignore_mask=True)
    return m


def _run(generations: int, compile_counter=None, steps: int = 2, device: torch.device = CPU,
         graphs: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """KE's loop in miniature: per generation train ``steps`` steps (fresh optimizer), evaluate dense and fit,
    reset. Returns the final parameters and every evaluation output."""
    cfg = Config(generations=generations, epochs=1, batch_size=4, warmup_epochs=0)
    model = _model().to(device)
    loss_of = TASKS["classify"](cfg).loss

    def forward_loss(net, x, y):
        return loss_of(net(x), y)

    def forward(net, x):
        return net(x)

    if compile_counter is not None:
        forward_loss = torch.compile(forward_loss, fullgraph=True, backend=compile_counter)
        forward = torch.compile(forward, fullgraph=True, backend=compile_counter)
    step = GraphStep(forward_loss, cfg, device, amp=False) if graphs else EagerStep(forward_loss, cfg, device)
    g_cpu = torch.Generator().manual_seed(1)
    xs = torch.randn(steps, 4, 1, 8, 8, generator=g_cpu).to(device)
    ys = torch.randint(0, 3, (steps, 4), generator=g_cpu).to(device)
    outs = []
    for g in range(1, generations + 1):
        if g > 1:
            reset_generation_(model, cfg, g)
        opt, sched = step.optimizer(list(model.parameters()), steps)
        model.train()
        total = torch.zeros((), device=device)
        for x, y in zip(xs, ys):
            step(model, opt, sched, x, y, total)
        model.eval()
        with torch.no_grad():
            outs.append(forward(model, xs[0]))
            with fit_only(model):
                outs.append(forward(model, xs[0]))
        outs.append(total.clone())
    return [p.detach().cpu() for p in model.parameters()], [o.cpu() for o in outs]


# ---- 2. the CPU proxy: one graph, no recompilation across generations ---------------------------------

def test_step_compiles_fullgraph_and_never_again_across_generations():
    """Forward + loss of the training step and the N_g / H^F_g forwards compile with fullgraph=True (a graph
    break raises), three frames in all, for 2 generations as for 4: the reset, the masks' fit mode and the
    fresh optimizer cause no recompilation. The optimizer step stays outside: torch's Optimizer.step breaks
    the graph on purpose (torch/optim/optimizer.py, pytorch#104053); GraphStep captures it on CUDA."""
    counts = {}
    for generations in (2, 4):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cc = CompileCounterWithBackend("aot_eager")
        _run(generations, cc)
        counts[generations] = cc.frame_count
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert counts[2] == counts[4] == 3, counts


def test_compiled_step_equals_eager():
    """Two generations (train, evaluate dense and fit, reset, fresh optimizer) compiled vs eager: parameters,
    evaluation outputs and loss sums within rtol 1e-5, atol 1e-6."""
    torch._dynamo.reset()
    eager_p, eager_o = _run(2)
    comp_p, comp_o = _run(2, CompileCounterWithBackend("aot_eager"))
    for a, b in zip(eager_p + eager_o, comp_p + comp_o):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


# ---- 2. the CPU proxy of the whole captured step: batch making from device tensors, forward, loss, backward -

def _images(n: int = 8) -> ImageSet:
    """A tiny training ImageSet (RGB 11 x 13 uint8, 3 classes, 6 x 6 views)."""
    pixels = torch.randint(0, 256, (n, 3, 11, 13), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageSet.from_tensors(pixels, torch.arange(n) % 3, 6, True)


def _train_graph_body(generations: int, epochs: int, counter_backend=None, data: ImageSet | None = None,
                      device: torch.device = CPU, graphs: bool = False) -> tuple[list[torch.Tensor], list]:
    """KE's training in miniature on augmented images (batch 4): per generation a fresh optimizer and
    ``epochs`` epochs, then a reset. Eager (``EagerStep.train_epoch``, the reference), or ``train_body`` from
    the epoch's device plan (compiled with ``fullgraph=True`` when ``counter_backend`` is given; with
    ``graphs``: GraphStep). Returns the final parameters, each epoch's loss sum and, after each generation, the
    frames compiled (or the graphs captured)."""
    cfg = Config(generations=generations, epochs=epochs, batch_size=4, warmup_epochs=0)
    loss_of = TASKS["classify"](cfg).loss

    def forward_loss(net, x, y):
        return loss_of(net(x), y)

    model, batches = _model(in_channels=3).to(device), Batches(data or _images(), device, True)
    step = GraphStep(forward_loss, cfg, device, amp=False) if graphs else EagerStep(forward_loss, cfg, device)
    body = train_body if counter_backend is None else torch.compile(train_body, fullgraph=True,
                                                                    backend=counter_backend)
    sums, frames = [], []
    for g in range(1, generations + 1):
        if g > 1:
            reset_generation_(model, cfg, g)
        opt, sched = step.optimizer(list(model.parameters()), batches.steps(4))
        model.train()
        for epoch in range(epochs):
            total = torch.zeros((), device=device)
            if counter_backend is None:
                step.train_epoch(model, opt, sched, batches, 4, 3, g, epoch, False, total)
            else:  # what GraphStep replays, the optimizer step outside (it breaks graphs on purpose)
                plan, counter = batches.plan(4, 3, g, epoch), torch.zeros(1, dtype=torch.int64)
                for size in plan.sizes:
                    opt.zero_grad(set_to_none=True)
                    body(forward_loss, model, batches, plan.order, plan.keys, counter, size, total)
                    opt.step()
                    sched.step()
            sums.append(total.cpu())
        frames.append(step.captures if graphs else getattr(counter_backend, "frame_count", 0))
    return [p.detach().cpu() for p in model.parameters()], sums + frames


def test_train_body_with_batch_making_compiles_fullgraph_once_and_equals_eager():
    """train_body (batch making from the epoch's device order and key tensors, the random-resized crop and
    flip drawn from the key as a tensor, forward, loss, backward, the loss sum, the counter) compiles with
    fullgraph=True (Tensor.backward traced: dynamo's trace_autograd_ops) into one frame, never again across
    batches, epochs and generations: as many frames after generation 2 as after 4. Parameters and loss sums
    equal the eager reference within rtol 1e-5, atol 1e-6 (the same kernels; a compiled backward may sum in
    another order)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cc = CompileCounterWithBackend("eager")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        comp_p, comp_o = _train_graph_body(4, 1, cc)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert comp_o[-4:] == [1, 1, 1, 1], comp_o[-4:]  # frames after generations 1..4
    eager_p, eager_o = _train_graph_body(4, 1)
    for a, b in zip(eager_p + eager_o[:-4], comp_p + comp_o[:-4]):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_graphed_evaluation_compiles_fullgraph_and_counts_exactly():
    """eval_body over an evaluation plan of chunks of 4 (10 test images: the last chunk padded with 2
    positions, masked out) compiles with fullgraph=True, one frame for the dense and one for the fit
    network, none more for a second generation; its top-1 / top-5 counts equal Classify.evaluate's exactly."""
    n = 10
    test = ImageSet.from_tensors(torch.randint(0, 256, (n, 3, 6, 6), generator=torch.Generator().manual_seed(1),
                                               dtype=torch.uint8), torch.arange(n) % 3, 6, False)
    batches, model, cfg = Batches(test, CPU, False), _model(in_channels=3).eval(), Config(generations=2)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cc = CompileCounterWithBackend("eager")
    body = torch.compile(eval_body, fullgraph=True, backend=cc)
    plan = eval_plan(batches, 4)
    assert plan.sizes == [4, 4, 2] and plan.valid.sum() == n
    for g in (1, 2):
        if g > 1:
            reset_generation_(model, cfg, g)
        for fit in (False, True):
            with fit_only(model) if fit else torch.no_grad(), torch.no_grad():
                counter, counts = torch.zeros(1, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
                for _ in plan.sizes:
                    body(model, batches, plan.order, plan.valid, counter, counts)
                eager = TASKS["classify"](cfg).evaluate(model, batches.epoch(4))
            assert {"acc": counts[0].item() / n, "top5": counts[1].item() / n} == eager
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert cc.frame_count == 2


# ---- GraphStep's optimizer semantics, proven on CPU -----------------------------------------------------

def _sgd_run(in_place: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Linear(5, 3)
    sgd = dict(momentum=0.9, weight_decay=5e-4, fused=True)
    opt = torch.optim.SGD(m.parameters(), lr=torch.tensor(0.1) if in_place else 0.1, **sgd)
    if in_place:  # buffers exist before the first step, as after GraphStep's warm-up
        for p in m.parameters():
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    kept = [opt.state[p].get("momentum_buffer") for p in m.parameters()]
    for g in range(3):
        if g and in_place:
            refresh_(opt, 0.1)
        elif g:
            opt = torch.optim.SGD(m.parameters(), lr=0.1, **sgd)
        if g == 0 and in_place:
            refresh_(opt, 0.1)  # as GraphStep makes its SGD
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
        for _ in range(4):
            loss = m(torch.randn(7, 5)).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with _HostWork() as w:
                sched.step()
            assert (w.reads, w.allocations) == (0, 0)  # a host number filled into the lr tensor
    if in_place:  # the very tensors a graph would have captured
        assert all(opt.state[p]["momentum_buffer"] is k for p, k in zip(m.parameters(), kept))
    return [p.detach().clone() for p in m.parameters()]


def test_fresh_optimizer_in_place_is_bit_identical_to_a_new_one():
    """GraphStep's fresh optimizer (momentum zeroed in place, lr a tensor the schedule fills) gives the same
    bits as a new SGD per generation (fused, as on CUDA), over three generations; the schedule's step reads
    nothing back and allocates nothing."""
    for a, b in zip(_sgd_run(False), _sgd_run(True)):
        assert torch.equal(a, b)


def test_load_in_place_keeps_the_captured_tensors():
    """A resume's optimizer state is copied into the existing lr tensor and momentum buffers."""
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=torch.tensor(0.1), momentum=0.9)
    bufs = {p: torch.zeros_like(p) for p in m.parameters()}
    for p, b in bufs.items():
        opt.state[p]["momentum_buffer"] = b
    lr = opt.param_groups[0]["lr"]
    other = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for p in m.parameters():
        other.state[p]["momentum_buffer"] = torch.full_like(p, 2.0)
    _load_in_place(opt, other.state_dict())
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.05)
    for p, b in bufs.items():
        assert opt.state[p]["momentum_buffer"] is b and torch.equal(b, torch.full_like(p, 2.0))


# ---- 3. no host work per step ------------------------------------------------------------------------

_FACTORIES = ("empty", "zeros", "ones", "full", "arange", "scalar_tensor", "lift_fresh", "randperm", "tensor")


class _HostWork(TorchDispatchMode):
    """Counts host reads (item / int() / float() / bool(): aten._local_scalar_dense), device-to-host copies
    and tensor factories (allocations made from Python) while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = self.to_host = self.allocations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        if name in ("_to_copy", "copy_", "to"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device", src.device)
            if src.device.type != "cpu" and torch.device(dst).type == "cpu":
                self.to_host += 1
        if any(name == f or name.startswith(f + "_") for f in _FACTORIES):
            self.allocations += 1
        return func(*args, **kwargs)


def _per_step_work(steps: int, monkeypatch) -> list[tuple[int, int, int, int]]:
    """(host reads, device-to-host copies, tolist calls, allocations) of each step of one augmented epoch of
    ``steps`` steps: making the batch (gather, crop, flip, normalise) and the training step."""
    n, per = 12, 12 // steps
    data = ImageSet.from_tensors(torch.randint(0, 256, (n, 3, 11, 13), generator=torch.Generator().manual_seed(0),
                                               dtype=torch.uint8), torch.arange(n) % 3, 6, True)
    cfg = Config(generations=1, epochs=1, batch_size=per)
    model = _model(in_channels=3)
    loss_of = TASKS["classify"](cfg).loss
    step = EagerStep(lambda net, x, y: loss_of(net(x), y), cfg, CPU)
    opt, sched = step.optimizer(list(model.parameters()), steps)
    batches = iter(Batches(data, CPU, True).epoch(per, 3, 1, 0))
    total = torch.zeros(())
    tolist = {"n": 0}
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolist.__setitem__("n", tolist["n"] + 1) or real(self))
    work = []
    for _ in range(steps):
        tolist["n"] = 0
        with _HostWork() as w:
            x, y = next(batches)
            step(model, opt, sched, x, y, total)
        work.append((w.reads, w.to_host, tolist["n"], w.allocations))
    return work


def test_a_step_does_no_host_work_and_as_much_work_at_step_6_as_at_step_2(monkeypatch):
    """Augmented epochs of 2 and of 6 steps (a tiny ImageSet, batch making included): no host read, no
    device-to-host copy, no tolist in any step; past the first step (which makes the momentum buffers and
    starts the epoch's order), every step allocates as many tensors as every other: nothing grows."""
    two, six = _per_step_work(2, monkeypatch), _per_step_work(6, monkeypatch)
    for reads, to_host, tolist, _ in two + six:
        assert (reads, to_host, tolist) == (0, 0, 0), (two, six)
    later = {w[3] for w in two[1:] + six[1:]}
    assert len(later) == 1 and later.pop() > 0, (two, six)


# ---- the switch -------------------------------------------------------------------------------------

def test_graphs_option_is_checked_and_resolved():
    with pytest.raises(ConfigError, match="graphs"):
        Config(graphs="yes")
    assert use_graphs(None, torch.device("cuda"), 1) is False  # automatic: off until measured on a GPU
    assert use_graphs(True, torch.device("cuda"), 1) is True
    assert use_graphs(True, torch.device("cuda"), 2) is False  # DDP runs eagerly
    assert use_graphs(False, CPU, 1) is False
    with pytest.raises(ValueError, match="CUDA"):
        use_graphs(True, CPU, 1)
    with pytest.raises(ValueError, match="CUDA"):
        GraphStep(lambda *a: None, Config(), CPU, amp=False)


def test_evolution_calls_the_eager_step_on_cpu_and_refuses_graphs_there(tmp_path):
    data = TensorDataset(torch.randn(8, 4), torch.arange(8) % 2)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    evo = Evolution(mlp, data, data, Config(generations=1, epochs=1), tmp_path / "a", device="cpu", progress=False)
    assert type(evo._step) is EagerStep
    with pytest.raises(ValueError, match="CUDA"):
        Evolution(mlp, data, data, Config(generations=1, epochs=1, graphs=True), tmp_path / "b", device="cpu",
                  progress=False)


def test_compile_mode_is_checked_and_reaches_evolution(tmp_path):
    """--compile-mode picks torch.compile's mode (the reduce-overhead contender of make gpu-report); a mode that
    records CUDA graphs itself is refused with graphs=True; an unknown one is refused before any work."""
    assert [compile_mode(c) for c in (False, True, "reduce-overhead")] == [None, "default", "reduce-overhead"]
    assert compile_mode("max-autotune-no-cudagraphs", graphs=True) == "max-autotune-no-cudagraphs"
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="records CUDA graphs"):
            compile_mode(mode, graphs=True)
    with pytest.raises(ValueError, match="compile must be"):
        compile_mode("fast")
    p, _ = cli._parser()
    assert _run_options(p.parse_args(["run", "--compile-mode", "reduce-overhead"]))["compile"] == "reduce-overhead"
    assert _run_options(p.parse_args(["run", "--compile"]))["compile"] is True
    data = TensorDataset(torch.randn(8, 4), torch.arange(8) % 2)
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="compile must be"):
        Evolution(model, data, data, Config(generations=1, epochs=1), tmp_path, device="cpu", progress=False,
                  compile="fast")
    assert type(model) is torch.nn.Linear and not any(tmp_path.iterdir())  # not split, nothing written


def test_cli_refuses_graphs_off_cuda(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--graphs", "--device", "cpu", "--out", "unused"])
    assert exc.value.code == 2 and "--graphs applies to CUDA devices only" in capsys.readouterr().err


# ---- 1. CUDA: capture once, replay across generations ----------------------------------------------

@needs_cuda
def test_graph_step_captures_once_across_generations():
    """Three generations (reset + fresh optimizer between them), one batch shape: one capture in all."""
    cfg = Config(generations=3, epochs=1, batch_size=4)
    model = _model().cuda()
    loss_of = TASKS["classify"](cfg).loss
    step = GraphStep(lambda net, x, y: loss_of(net(x), y), cfg, torch.device("cuda"), amp=False)
    x, y = torch.randn(4, 1, 8, 8, device="cuda"), torch.tensor([0, 1, 2, 0], device="cuda")
    for g in range(1, 4):
        if g > 1:
            reset_generation_(model, cfg, g)
        opt, sched = step.optimizer(list(model.parameters()), 2)
        total = torch.zeros((), device="cuda")
        model.train()
        for _ in range(2):
            step(model, opt, sched, x, y, total)
        assert torch.isfinite(total)
    assert step.captures == 1


@needs_cuda
def test_graph_step_equals_eager_across_a_reset():
    """Two generations graphed vs eager on CUDA: parameters, evaluation outputs and loss sums equal within
    rtol 1e-5, atol 1e-6 (TF32 off, as torch's default for matmul; cuDNN's TF32 switched off here)."""
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        eager_p, eager_o = _run(2, device=torch.device("cuda"))
        graph_p, graph_o = _run(2, device=torch.device("cuda"), graphs=True)
    finally:
        torch.backends.cudnn.allow_tf32 = allow
    for a, b in zip(eager_p + eager_o, graph_p + graph_o):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def _no_tf32():
    """cuDNN's TF32 off for a comparison with eager (TF32 is off for matmuls by torch's default)."""
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    return allow


@needs_cuda
def test_graph_step_with_batch_making_equals_eager_and_captures_two_graphs_in_all():
    """Augmented images resident on the GPU (10 items, batch 4: two full batches and one of 2), 3 generations
    x 2 epochs: GraphStep.train_epoch (gather, crop, flip, normalise, forward, loss, backward, SGD and the
    loss sum in one replay per batch) vs EagerStep.train_epoch: parameters and loss sums within rtol 1e-5,
    atol 1e-6; two captures (the full and the last batch's shape), made in generation 1, none after."""
    allow = _no_tf32()
    try:
        cuda = torch.device("cuda")
        eager_p, eager_o = _train_graph_body(3, 2, data=_images(10), device=cuda)
        graph_p, graph_o = _train_graph_body(3, 2, data=_images(10), device=cuda, graphs=True)
    finally:
        torch.backends.cudnn.allow_tf32 = allow
    assert graph_o[-3:] == [2, 2, 2], graph_o[-3:]
    for a, b in zip(eager_p + eager_o[:-3], graph_p + graph_o[:-3]):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


@needs_cuda
def test_graph_eval_equals_classify_evaluate_dense_and_fit_across_resets():
    """GraphEval (chunks of 4 of 10 test images: the last padded and masked) vs Classify.evaluate on the same
    model, dense and fit, over 3 generations (a reset between): equal accuracies; two captures in all (dense,
    fit: KELS masks never change, so no re-capture)."""
    cuda = torch.device("cuda")
    n = 10
    test = ImageSet.from_tensors(torch.randint(0, 256, (n, 3, 6, 6), generator=torch.Generator().manual_seed(1),
                                               dtype=torch.uint8), torch.arange(n) % 3, 6, False)
    batches, model, cfg = Batches(test, cuda, False), _model(in_channels=3).cuda().eval(), Config(generations=3)
    graphed = GraphEval(cuda, amp=False, chunk=4)
    allow = _no_tf32()
    try:
        for g in (1, 2, 3):
            if g > 1:
                reset_generation_(model, cfg, g)
            for fit in (False, True):
                with fit_only(model) if fit else torch.no_grad(), torch.no_grad():
                    eager = TASKS["classify"](cfg).evaluate(model, batches.epoch(4))
                    assert graphed.accuracy(model, model, batches) == eager, (g, fit)
    finally:
        torch.backends.cudnn.allow_tf32 = allow
    assert graphed.captures == 2


@needs_cuda
def test_evolution_with_graphs_matches_eager(tmp_path):
    """A whole KE run (2 generations x 2 epochs, augmented images, classify) with graphs on vs off: the graphed
    training and evaluation are used (GraphStep / GraphEval captured), the losses agree within rtol 1e-4 and
    each accuracy within one test image."""
    test = ImageSet.from_tensors(torch.randint(0, 256, (10, 3, 6, 6), generator=torch.Generator().manual_seed(1),
                                               dtype=torch.uint8), torch.arange(10) % 3, 6, False)
    rows = {}
    for graphs in (False, True):
        cfg = Config(generations=2, epochs=2, batch_size=4, warmup_epochs=0, graphs=graphs)
        evo = Evolution(_model(in_channels=3), _images(10), test, cfg, tmp_path / str(graphs), device="cuda",
                        progress=False, log=lambda _: None)
        rows[graphs] = evo.run()
        if graphs:
            assert evo._step.captures == 2 and evo._eval_graph.captures == 2
    for a, b in zip(rows[False], rows[True]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        for key in ("dense_acc", "fit_acc", "dense_top5", "fit_top5"):
            assert abs(a[key] - b[key]) <= 1 / 10 + 1e-9, (key, a, b)
