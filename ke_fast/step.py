"""The training step the generation loop calls once per batch: eager everywhere, one captured CUDA graph on CUDA.

:class:`EagerStep` is the reference: forward and loss (the Task's), ``zero_grad``, backward, SGD step, the
schedule's step and the on-device loss sum; a fresh SGD per generation. :class:`GraphStep` (CUDA only) runs
the same work as one ``torch.cuda.CUDAGraph`` replay per batch:

* static buffers: the batch is copied into a static input / label pair (device to device, no host sync);
  forward, loss, backward, the fused SGD step and the loss sum are captured once per (model, batch shape).
* the learning rate lives in a device tensor (``SGD(lr=tensor, fused=True)``; LambdaLR ``fill_``\\ s it), so
  the schedule never re-captures.
* one SGD object for the whole run: a generation's "fresh optimizer" zeroes the momentum buffers in place
  (SGD's first step sets ``buf = grad``; with dampening 0, ``0 * momentum + grad`` is the same value), and a
  resume copies the saved state into the captured buffers, so the graph's addresses stay valid across
  generations; the reset and new masks write the parameters in place too.
* warm-up on a side stream changes nothing: parameters, buffers, optimizer state and the RNG are restored.
* the last partial batch of an epoch is a second shape: captured once as well (at most two graphs per run),
  so every sample of the epoch is seen, as eagerly.

Not yet inside the graph: batch making (gather, crop, flip, normalise: ``ke_fast.batches``, device ops with no
host read) runs before the copy into the static input, and evaluation runs eagerly. DDP runs eagerly.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .config import Config

ForwardLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
WARMUP_STEPS = 3  # side-stream iterations before a capture (cuDNN / cuBLAS workspaces, autotuning)


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
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
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

    def _eager_body(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            loss = self.forward_loss(net, x, y)
        loss.backward()
        self.opt.step()
        return loss.detach() * len(y)

    def _capture(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """Warm up on a side stream (then restore every state it touched) and capture one step."""
        opt = self.opt
        params = [p for g in opt.param_groups for p in g["params"]]
        saved = [t.detach().clone() for t in (*params, *net.buffers())]
        saved_opt = [(s, s["momentum_buffer"].clone()) for s in opt.state.values()
                     if s.get("momentum_buffer") is not None]
        rng = torch.cuda.get_rng_state(self.device)
        sx, sy = x.clone(), y.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                opt.zero_grad(set_to_none=True)
                self._eager_body(net, sx, sy)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():
            for t, v in zip((*params, *net.buffers()), saved):
                t.copy_(v)
            kept = {id(s) for s, _ in saved_opt}
            for s, v in saved_opt:
                s["momentum_buffer"].copy_(v)
            for s in opt.state.values():  # buffers made by the warm-up's first step: a fresh optimizer's zeros
                if id(s) not in kept and s.get("momentum_buffer") is not None:
                    s["momentum_buffer"].zero_()
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients in its pool
        with torch.cuda.graph(graph):
            out = self._eager_body(net, sx, sy)
        torch.cuda.set_rng_state(rng, self.device)
        self.captures += 1
        return graph, sx, sy, out

    def __call__(self, net: nn.Module, opt: torch.optim.SGD, sched: Any, x: torch.Tensor, y: torch.Tensor,
                 total: torch.Tensor) -> None:
        key = (id(net), tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, x.is_contiguous(), net.training)
        if key not in self.graphs:
            self.graphs[key] = self._capture(net, x, y)
        graph, sx, sy, out = self.graphs[key]
        sx.copy_(x)
        sy.copy_(y)
        graph.replay()
        sched.step()  # fills the learning rate tensor: no re-capture
        total += out
