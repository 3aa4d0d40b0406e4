"""The fused reset of many tensors: :class:`ResetPlan` lays the reset hypothesis's entries out once and re-draws
them every generation through the one op ``ke_fast::reset_entries_`` (defined in :mod:`ke_fast.ops`).

``ReinitPlan`` is the old name of :class:`ResetPlan`, kept as an alias (the same class) for one release.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import ops  # defines ke_fast::reset_entries_, the op every plan calls
from .kernels import launch
from .kernels.streams import PURPOSE_INIT, PURPOSE_RESET, as_int64, check_seed, stream_prefix


class ResetPlan:
    """Re-draw the reset entries (mask bit 0) of many tensors: validated and laid out once, then
    :meth:`run` per generation — one ``ke_fast::reset_entries_`` call (one kernel launch on a GPU) per
    dtype, with no per-layer host work. ``ke_fast.reset_(model, g)`` keeps its plan on the model's SplitState.
    ``ReinitPlan`` (also ``ke_fast.ReinitPlan``, ``ke_fast.ops.ReinitPlan``) is this class under its old name,
    kept for one release.

    Args:
        weights: contiguous fp32/fp16/bf16/fp64 tensors on one device (conv/linear weights and biases).
        masks: one per weight: packed int32 words (``ceil(numel/32)``) or a bool/uint8/float 0-1 tensor
            of the weight's shape (e.g. the official KE code's float ``mask``). 1 = fit (kept). Dense masks
            are validated and packed once per mask tensor and version (a cache keyed weakly on the tensor),
            so building a plan every generation from the same masks (the one-shot use) skips that work.
        seed: the run's seed (Philox key), an int in [0, 2^64).
        init: reset scheme, one of ``kernels.SCHEMES``; default the official KE reset U(+-1/sqrt(fan_in)).
        fans: per weight ``(fan_in, fan_out)`` or None to derive it from the shape (required for 1-D
            tensors: biases take U(+-1/sqrt(fan_in)) of their layer).
        layer_ids: per weight the layer index of its stream (default: the position in the list). Values
            depend on (seed, purpose, generation, layer id, element index) only.
        fan_mode: ``fan_in`` or ``fan_out`` for the kaiming schemes.
    Raises TypeError / ValueError naming the argument before anything is written. The plan keeps
    references to ``weights``: rebuild it if their storage changes (e.g. after ``model.to(...)``).

    The plan owns its launch tables (one per dtype, copied to the weights' device once, here): they live as
    long as the plan, so :meth:`run` can be captured in a CUDA graph and replayed while the plan is alive.
    Building a plan while the current CUDA stream captures a graph raises RuntimeError (it copies from host
    memory): build it before the capture.
    """

    def __init__(self, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *, seed: int,
                 init: str = "kaiming_uniform_a_sqrt5", fans: Sequence[tuple[int, int] | None] | None = None,
                 layer_ids: Sequence[int] | None = None, fan_mode: str = "fan_in") -> None:
        self.seed = check_seed(seed)
        first = next(iter(weights), None) if isinstance(weights, Sequence) else None
        if isinstance(first, torch.Tensor):  # before the validation, which reads mask values back (a sync)
            launch.refuse_in_capture(first.device, "building a ke_fast.ResetPlan")
        jobs = launch.prepare(weights, masks, init, fans, layer_ids, fan_mode)
        self.weights = list(weights)
        self._launches = [launch.launch_table(group) for group in launch.dtype_groups(jobs)]

    def run(self, generation: int, purpose: str = "reset") -> None:
        """Re-draw the reset entries for ``generation`` (``purpose="init"``: the generation-0 values)."""
        launch.check_generation(generation, purpose)
        prefix = as_int64(stream_prefix(PURPOSE_RESET if purpose == "reset" else PURPOSE_INIT, generation))
        for weights, words, table, tiles, has_normal in self._launches:
            torch.ops.ke_fast.reset_entries_.default(weights, words, table, tiles, as_int64(self.seed), prefix,
                                                     has_normal)


ReinitPlan = ResetPlan  # the old name, kept for one release (same class)
