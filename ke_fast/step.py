"""The training step the generation loop calls once per batch: eager everywhere, one captured CUDA graph on CUDA.

:class:`EagerStep` is the reference: batch making (``ke_fast.batches``), forward and loss (the Task's),
``zero_grad``, backward, SGD step, the schedule's step and the on-device loss sum; a fresh SGD per generation.
:class:`GraphStep` (CUDA only) runs the same work as one ``torch.cuda.CUDAGraph`` replay per batch:

* batch making is inside the graph (data resident on the device): each epoch, the epoch's order (int64
  [steps, batch]: row b holds batch b's positions, the last row padded) and the augmentation keys of its
  batches (``draw_seed(seed, generation, epoch, b)``, int64 [steps]) are copied into static device tensors,
  and a device batch counter is zeroed; one replay reads row ``counter`` and key ``counter``, gathers, crops,
  flips, normalises and casts (the fused Triton kernel reads the key from device memory), runs forward, loss,
  backward, the fused SGD step, adds the loss times the batch size to a device sum and increments the counter
  (:func:`train_body` plus the optimizer step). The batches are the eager path's, bit for bit: the same order,
  the same keys, the same kernel. Host-resident data (too large for the device) keep the copy of each
  prefetched batch into a static input pair instead.
* the learning rate lives in a device tensor (``SGD(lr=tensor, fused=True)``; LambdaLR ``fill_``\\ s it), so
  the schedule never re-captures.
* one SGD object for the whole run: a generation's "fresh optimizer" zeroes the momentum buffers in place
  (SGD's first step sets ``buf = grad``; with dampening 0, ``0 * momentum + grad`` is the same value), and a
  resume copies the saved state into the captured buffers, so the graph's addresses stay valid across
  generations; the reset and new masks write the parameters in place too (dense training reads no mask).
* warm-up on a side stream changes nothing: parameters, buffers, optimizer state, counter, sum and the RNG
  are restored.
* the last partial batch of an epoch is a second shape, captured once as well (at most two training graphs
  per run), so every sample of the epoch is seen, as eagerly (padding and masking it would change BatchNorm's
  batch statistics: not the eager result). A graph is captured again only if an address it reads changed
  (a layer's mode, a buffer replaced).

:class:`GraphEval` (CUDA only) graphs the classifier's evaluation of N_g and H^F_g the same way: static chunks
of ``EVAL_CHUNK`` positions (the last one padded, its padding masked out of the counts), top-1 / top-5 counts
summed on the device and read once (:func:`eval_body`). Fit mode computes W*M inside the graph (its cache is
dropped before the capture); a replaced fit mask (WELS ``resample_mask``, chosen masks) is a new address: the
fit graph is captured again then.

Not inside the graph: the schedule's ``fill_`` of the learning rate (one host call per step, no read), the
other tasks' evaluation (metric, regression: eager) and DDP (eager).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .batches import Batches, eval_plan
from .config import Config
from .tasks import topk_hits

ForwardLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Forward = Callable[[torch.Tensor], torch.Tensor]
WARMUP_STEPS = 3  # side-stream iterations before a capture (cuDNN / cuBLAS workspaces, autotuning)
EVAL_CHUNK = 256  # positions per graphed evaluation replay (Evolution.evaluate's eager batch size too)


def train_body(forward_loss: ForwardLoss, net: nn.Module, batches: Batches, order: torch.Tensor,
               keys: torch.Tensor, counter: torch.Tensor, size: int, total: torch.Tensor) -> None:
    """Batch ``counter`` of an epoch plan (:meth:`Batches.plan`, in static tensors): its first ``size``
    positions of row ``counter`` of ``order`` made into a batch with key ``keys[counter]``, forward, loss,
    backward; ``total`` += loss * batch size; ``counter`` += 1. Device ops only: what :class:`GraphStep`
    captures (with the optimizer step) and what the CPU proxy compiles with ``fullgraph=True``."""
    x, y = batches.make(order.index_select(0, counter).view(-1)[:size], keys.index_select(0, counter))
    loss = forward_loss(net, x, y)
    loss.backward()
    total.add_(loss.detach() * size)
    counter.add_(1)


def eval_body(forward: Forward, batches: Batches, order: torch.Tensor, valid: torch.Tensor,
              counter: torch.Tensor, counts: torch.Tensor) -> None:
    """Chunk ``counter`` of an evaluation plan (:func:`ke_fast.batches.eval_plan`): forward, and the top-1 /
    top-5 hits of its valid positions added to ``counts`` (int64 [2]); ``counter`` += 1. The counts of
    ``ke_fast.tasks.Classify.evaluate``, padding masked out. What :class:`GraphEval` captures."""
    x, y = batches.make(order.index_select(0, counter).view(-1))
    ok = valid.index_select(0, counter).view(-1)
    hit1, hit5 = topk_hits(forward(x), y)
    counts.add_(torch.stack([(hit1 & ok).sum(), (hit5 & ok).sum()]))
    counter.add_(1)


def addresses(net: nn.Module, masks: bool) -> tuple:
    """What a captured forward of ``net`` reads, as host values: each parameter's and buffer's address (with
    ``masks``: the masked layers' mask buffers too), each masked layer's mode and fit group (whose launch
    tables a fit-mode graph reads). A graph is valid while this tuple is unchanged: a tensor replaced by one at
    the same address is read there. Read per epoch / evaluation, never per step."""
    out = []
    for m in net.modules():
        fit = "fit_mask" in m._buffers
        if fit:
            out.append((getattr(m, "mode", None), id(getattr(m, "_ke_group", None))))
        out.extend(t.data_ptr() for t in m._parameters.values() if t is not None)
        out.extend((name, t.data_ptr()) for name, t in m._buffers.items()
                   if t is not None and (masks or not (fit and name in ("fit_mask", "bias_mask"))))
    return tuple(out)


def _side_warm_up(body: Callable[[], Any], device: torch.device) -> None:
    """``body`` WARMUP_STEPS times on a side stream (torch.cuda.graphs' recipe), then the current stream waits."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            body()
    torch.cuda.current_stream(device).wait_stream(side)


def _lr_lambda(cfg: Config, steps_per_epoch: int, generation: int = 1) -> Callable[[int], float]:
    """The factor of the peak lr at each step of ``generation``: linear warm-up then cosine, over steps
    (``schedule="step"``) or constant within an epoch (``"epoch"``: the official code's cosine_lr, called once
    per epoch with the epoch's index, utils/schedulers.py L39-46 and KE_model.py L96)."""
    per = steps_per_epoch if cfg.schedule == "step" else 1
    warm, total = cfg.warmup_epochs * per, cfg.epochs_in(generation) * per

    def f(step: int) -> float:
        if per == 1:  # the scheduler still steps every batch: the epoch is the step's epoch
            step //= max(1, steps_per_epoch)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return f


def _fused_sgd_supported(device: torch.device) -> bool:
    """torch.optim.SGD(fused=True) runs on CUDA and (torch >= 2.4) on CPU."""
    return device.type in ("cuda", "cpu")


def _optimizer(params: list[nn.Parameter], cfg: Config, steps_per_epoch: int, device: torch.device,
               opt_state: dict | None = None, sched_state: dict | None = None,
               generation: int = 1) -> tuple[torch.optim.SGD, Any]:
    """A generation's fresh SGD and its warm-up + cosine schedule (or the states a checkpoint saved)."""
    opt = torch.optim.SGD(params, lr=cfg.lr_in(generation), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          fused=_fused_sgd_supported(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps_per_epoch, generation))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
    return opt, sched


def use_graphs(graphs: bool | None, device: torch.device, world: int) -> bool:
    """Whether the training step is a CUDA graph: ``graphs`` True asks for it (CUDA only: raises elsewhere);
    None (automatic) is off until the graph path has been measured on a GPU (``make gpu-report``). DDP
    (``world`` > 1) runs eagerly: its all-reduce hooks are not captured here."""
    if graphs and device.type != "cuda":
        raise ValueError(f"graphs=True needs a CUDA device (CUDA graphs), got {device}")
    return bool(graphs) and world == 1


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def compile_mode(compile: bool | str, graphs: bool = False) -> str | None:
    """The ``torch.compile`` mode of the training step's forward and loss: None (``compile`` False), "default"
    (True) or the mode named; "reduce-overhead" (CUDA graphs recorded by the compiler) is the alternative to
    ``graphs`` (one graph cannot be captured inside another): ValueError for both, or for an unknown mode."""
    if compile is False or compile is None:
        return None
    mode = "default" if compile is True else compile
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r}")
    if graphs and "cudagraphs" not in mode and mode != "default":
        raise ValueError(f"compile mode {mode!r} records CUDA graphs itself: it cannot run inside graphs=True's "
                         f"captured step (use one or the other)")
    return mode


class EagerStep:
    """One training step, eagerly: ``step(net, opt, sched, x, y, total)`` adds ``loss * len(y)`` to the
    device tensor ``total`` and reads nothing back to the host.

    Args:
        forward_loss: ``(net, x, y) -> loss`` (the Task's loss of the model's output; autocast inside).
        cfg: the run's Config (optimizer and schedule).
        device: the training device.
    """

    def __init__(self, forward_loss: ForwardLoss, cfg: Config, device: torch.device) -> None:
        self.forward_loss, self.cfg, self.device = forward_loss, cfg, device

    def optimizer(self, params: list[nn.Parameter], steps_per_epoch: int, opt_state: dict | None = None,
                  sched_state: dict | None = None, generation: int = 1) -> tuple[torch.optim.SGD, Any]:
        """A generation's fresh optimizer and schedule (or the states a checkpoint saved)."""
        return _optimizer(params, self.cfg, steps_per_epoch, self.device, opt_state, sched_state, generation)

    def __call__(self, net: nn.Module, opt: torch.optim.SGD, sched: Any, x: torch.Tensor, y: torch.Tensor,
                 total: torch.Tensor) -> None:
        loss = self.forward_loss(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach() * len(y)

    def train_epoch(self, net: nn.Module, opt: torch.optim.SGD, sched: Any, batches: Batches, batch_size: int,
                    seed: int, generation: int, epoch: int, pairs: bool, total: torch.Tensor,
                    on_batch: Callable[[int], None] = lambda n: None) -> int:
        """One epoch of ``batches.epoch(batch_size, seed, generation, epoch, pairs)``, a step per batch; the
        loss sum is added to ``total``; ``on_batch(len(y))`` after each step. Returns the samples seen."""
        count = 0
        for x, y in batches.epoch(batch_size, seed, generation, epoch, pairs=pairs):
            self(net, opt, sched, x, y, total)
            count += len(y)
            on_batch(len(y))
        return count


def _load_in_place(opt: torch.optim.SGD, state: dict) -> None:
    """``opt.load_state_dict(state)`` keeping the tensors a graph captured (learning rate, momentum buffers)."""
    lrs = [g["lr"] for g in opt.param_groups]
    bufs = {p: s.get("momentum_buffer") for p, s in opt.state.items()}
    opt.load_state_dict(state)
    for group, lr in zip(opt.param_groups, lrs):
        lr.fill_(float(group["lr"]))  # once per resume: a host value is fine here
        group["lr"] = lr
        if "initial_lr" in group:
            group["initial_lr"] = float(group["initial_lr"])
    for p, s in opt.state.items():
        old, new = bufs.get(p), s.get("momentum_buffer")
        if old is not None and new is not None:
            old.copy_(new)
            s["momentum_buffer"] = old


def refresh_(opt: torch.optim.SGD, lr: float) -> None:
    """Make ``opt`` (an SGD with tensor learning rates) what a new SGD with learning rate ``lr`` would be, in
    place: momentum buffers zeroed (a new SGD's first step sets ``buf = grad``, the same value as ``0 *
    momentum + grad`` with dampening 0), learning rate tensors filled, the schedule's base rate reset (a
    float: the schedule then fills the tensor with a host number, no device arithmetic per step)."""
    for s in opt.state.values():
        if s.get("momentum_buffer") is not None:
            s["momentum_buffer"].zero_()
    for g in opt.param_groups:
        g["lr"].fill_(lr)
        g["initial_lr"] = float(lr)


class GraphStep(EagerStep):
    """The training step as one CUDA graph per batch shape (see the module docstring); CUDA only.

    Same arguments as :class:`EagerStep`; ``amp``: bf16 autocast in the captured forward (its cast cache
    off, as capture needs). ``captures`` counts the graphs captured (at most one per batch shape)."""

    def __init__(self, forward_loss: ForwardLoss, cfg: Config, device: torch.device, amp: bool) -> None:
        if device.type != "cuda":
            raise ValueError(f"GraphStep needs a CUDA device, got {device}")
        super().__init__(forward_loss, cfg, device)
        self.amp = amp
        self.opt: torch.optim.SGD | None = None
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.statics: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (order, keys, counter, total) per plan shape
        self._addresses: tuple | None = None  # addresses(net) during an epoch of host-resident batches
        self.captures = 0

    def optimizer(self, params: list[nn.Parameter], steps_per_epoch: int, opt_state: dict | None = None,
                  sched_state: dict | None = None, generation: int = 1) -> tuple[torch.optim.SGD, Any]:
        """The run's one SGD made fresh in place (momentum zeroed, the learning rate tensor kept) and a new
        schedule on it; a checkpoint's states are copied into the captured tensors."""
        if self.opt is None:
            lr = torch.tensor(self.cfg.lr_in(generation), dtype=torch.float32, device=self.device)
            self.opt = torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum,
                                       weight_decay=self.cfg.weight_decay, fused=True)
            refresh_(self.opt, self.cfg.lr_in(generation))
        else:
            if [id(p) for g in self.opt.param_groups for p in g["params"]] != [id(p) for p in params]:
                raise RuntimeError("GraphStep: the parameters changed between generations; a captured graph "
                                   "updates the same tensors in place")
            refresh_(self.opt, self.cfg.lr_in(generation))
        sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(self.cfg, steps_per_epoch, generation))
        if opt_state is not None:
            _load_in_place(self.opt, opt_state)
            sched.load_state_dict(sched_state)
        return self.opt, sched

    def _forward_loss_amp(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            return self.forward_loss(net, x, y)

    def _capture(self, net: nn.Module, body: Callable[[], Any], after: Callable[[], None]) -> tuple:
        """Warm up ``body`` (one step) on a side stream, restore every state it touched (then ``after()``),
        and capture one step: (graph, what the captured ``body`` returned)."""
        opt = self.opt
        params = [p for g in opt.param_groups for p in g["params"]]
        saved = [t.detach().clone() for t in (*params, *net.buffers())]
        saved_opt = [(s, s["momentum_buffer"].clone()) for s in opt.state.values()
                     if s.get("momentum_buffer") is not None]
        rng = torch.cuda.get_rng_state(self.device)

        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            out = body()
            opt.step()
            return out

        _side_warm_up(step, self.device)
        with torch.no_grad():
            for t, v in zip((*params, *net.buffers()), saved):
                t.copy_(v)
            kept = {id(s) for s, _ in saved_opt}
            for s, v in saved_opt:
                s["momentum_buffer"].copy_(v)
            for s in opt.state.values():  # buffers made by the warm-up's first step: a fresh optimizer's zeros
                if id(s) not in kept and s.get("momentum_buffer") is not None:
                    s["momentum_buffer"].zero_()
            after()
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients in its pool
        with torch.cuda.graph(graph):
            body_out = body()
            opt.step()
        torch.cuda.set_rng_state(rng, self.device)
        self.captures += 1
        return graph, body_out

    def __call__(self, net: nn.Module, opt: torch.optim.SGD, sched: Any, x: torch.Tensor, y: torch.Tensor,
                 total: torch.Tensor) -> None:
        """One step of a batch made outside (host-resident data): copied into a static input pair, replayed."""
        where = self._addresses if self._addresses is not None else addresses(net, masks=False)
        key = ("batch", id(net), tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, x.is_contiguous(), net.training,
               where)
        if key not in self.graphs:
            sx, sy = x.clone(), y.clone()
            graph, out = self._capture(net, lambda: self._forward_loss_amp(net, sx, sy).detach() * len(sy),
                                       lambda: None)
            self.graphs[key] = graph, (sx, sy, out)
        graph, (sx, sy, out) = self.graphs[key]
        sx.copy_(x)
        sy.copy_(y)
        graph.replay()
        sched.step()  # fills the learning rate tensor: no re-capture
        total += out

    def train_epoch(self, net: nn.Module, opt: torch.optim.SGD, sched: Any, batches: Batches, batch_size: int,
                    seed: int, generation: int, epoch: int, pairs: bool, total: torch.Tensor,
                    on_batch: Callable[[int], None] = lambda n: None) -> int:
        """One epoch, a replay per batch with the batch making inside the graph (resident data; else the
        static-input path of :meth:`__call__`). Same contract as :meth:`EagerStep.train_epoch`."""
        if not batches.resident:
            self._addresses = addresses(net, masks=False)  # read once an epoch, not at every step
            try:
                return super().train_epoch(net, opt, sched, batches, batch_size, seed, generation, epoch, pairs,
                                           total, on_batch)
            finally:
                self._addresses = None
        plan = batches.plan(batch_size, seed, generation, epoch, pairs)
        shape = (id(batches), *plan.order.shape)
        if shape not in self.statics:
            self.statics[shape] = (torch.empty_like(plan.order), torch.empty_like(plan.keys),
                                   torch.zeros(1, dtype=torch.int64, device=self.device),
                                   torch.zeros((), device=self.device))
        order, keys, counter, sums = self.statics[shape]
        order.copy_(plan.order)
        keys.copy_(plan.keys)
        where = (id(net), shape, net.training, addresses(net, masks=False))
        for size in set(plan.sizes):
            if (where, size) not in self.graphs:
                self.graphs[where, size] = self._capture(
                    net, lambda size=size: train_body(self._forward_loss_amp, net, batches, order, keys, counter,
                                                      size, sums),
                    lambda: (counter.zero_(), sums.zero_()))
        counter.zero_()
        sums.zero_()
        for size in plan.sizes:
            self.graphs[where, size][0].replay()
            sched.step()  # fills the learning rate tensor: no re-capture
            on_batch(size)
        total += sums
        return sum(plan.sizes)


class GraphEval:
    """A classifier's top-1 / top-5 evaluation as one CUDA graph replay per chunk of ``EVAL_CHUNK`` positions
    (see the module docstring); CUDA only. ``amp``: bf16 autocast (cast cache off) around the forward.
    ``captures`` counts the graphs captured."""

    def __init__(self, device: torch.device, amp: bool, chunk: int = EVAL_CHUNK) -> None:
        if device.type != "cuda":
            raise ValueError(f"GraphEval needs a CUDA device, got {device}")
        self.device, self.amp, self.chunk = device, amp, chunk
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.captures = 0

    def accuracy(self, forward: Forward, net: nn.Module, batches: Batches) -> dict[str, float]:
        """``{"acc": top-1, "top5": top-5}`` of ``forward`` (``net``, in eval mode, computes it) over every item
        of ``batches`` (evaluation batches resident on the device), read from the device once: the values of
        ``ke_fast.tasks.Classify.evaluate``."""
        key = (id(net), id(batches), net.training, addresses(net, masks=True))
        if key not in self.graphs:
            self.graphs[key] = self._capture(forward, net, batches)
        graph, (counter, counts, plan, _) = self.graphs[key]
        counter.zero_()
        counts.zero_()
        for _ in plan.sizes:
            graph.replay()
        top1, top5 = counts.tolist()  # the one host read
        n = len(batches)
        return {"acc": top1 / max(1, n), "top5": top5 / max(1, n)}

    def _capture(self, forward: Forward, net: nn.Module, batches: Batches) -> tuple:
        """Warm up on a side stream (evaluation changes no state but the counts), capture one chunk."""
        plan = eval_plan(batches, self.chunk)  # kept with the graph: it reads these addresses
        counter = torch.zeros(1, dtype=torch.int64, device=self.device)
        counts = torch.zeros(2, dtype=torch.int64, device=self.device)

        def body() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
                eval_body(forward, batches, plan.order, plan.valid, counter, counts)

        _side_warm_up(body, self.device)  # fit mode: makes the W*M launch tables, kept by the layers' FitGroup
        for m in net.modules():  # fit mode: W*M computed inside the graph, not read from a cache made before it
            if hasattr(m, "_drop_fit_caches"):
                m._drop_fit_caches()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        self.captures += 1
        groups = [m._ke_group for m in net.modules() if getattr(m, "_ke_group", None) is not None]
        return graph, (counter, counts, plan, groups)  # the groups (their tables) live as long as the graph


def build_step(forward_loss: ForwardLoss, config: Config, device: torch.device, amp: bool, world: int,
               compile: bool | str, classify: bool) -> tuple[ForwardLoss, EagerStep, "GraphEval | None"]:
    """The loop's (forward_loss, training step, graphed evaluation): ``forward_loss`` compiled in the mode of
    ``compile`` (:func:`compile_mode`; "reduce-overhead" is the compiler's CUDA graphs, the other contender),
    a :class:`GraphStep` when :func:`use_graphs` says so (else :class:`EagerStep`), and a :class:`GraphEval`
    with it for a classifier (other tasks' evaluations have no top-k counts to sum: eager)."""
    graphs = use_graphs(config.graphs, device, world)
    mode = compile_mode(compile, graphs)
    fl = torch.compile(forward_loss, mode=mode) if mode else forward_loss
    step = GraphStep(fl, config, device, amp) if graphs else EagerStep(fl, config, device)
    return fl, step, GraphEval(device, amp) if graphs and classify else None
