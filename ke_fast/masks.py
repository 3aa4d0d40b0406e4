"""KE split rules (KELS / WELS), the seed and stream of every layer, and mask introspection.

Imports flow one way: ``nn`` (the masked layers) uses these rules; the introspection reads a model's
:class:`~ke_fast.state.SplitState` (below this module), never ``nn``.

``ke_fast.masks`` is this module (``import ke_fast.masks as M`` gives it). The public function is
:func:`fit_masks`; calling the module itself, ``ke_fast.masks(model)`` (the old API, when ``masks`` was the
function), still works for one release and warns with a DeprecationWarning.
"""
from __future__ import annotations

import math
import sys
import types
import warnings
from typing import Sequence

import torch
from torch import nn

from . import kernels as K
from . import ops
from .state import layers_and_state

SPLIT_MODES = ("kels", "wels")
LAYER_MODES = SPLIT_MODES + ("custom",)  # "custom": a mask adopted from other code


def check_mode(mode: object) -> str:
    """Validate a split mode name."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"mode must be one of {SPLIT_MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def layer_mask(shape: Sequence[int] | torch.Size, mode: str, split_rate: float, *, seed: int = 0, layer_index: int = 0,
               generation: int = 0, keep_all_inputs: bool = False, keep_all_outputs: bool = False,
               in_segments: Sequence[int] | None = None, out_segments: Sequence[int] | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Packed fit mask of one layer's weight.

    KELS: the first ``ceil(s*C_out)`` filters (all with ``keep_all_outputs``) x the first
    ``ceil(s*C_in)`` input channels (all with ``keep_all_inputs``) — or, when the input is a
    concatenation, the first ``ceil(s*c)`` channels of every segment ``c`` of ``in_segments``
    (``out_segments`` does the same for the filters of a depthwise conv reading a concatenation,
    so filter i still matches input channel i).
    WELS: each weight is fit with probability ``s``, drawn from (seed, layer_index, generation).
    """
    shape = torch.Size(shape)
    check_mode(mode)
    s = K.check_split_rate(split_rate)
    if mode == "wels":
        return ops.wels_mask_bits(shape, s, seed=seed, stream=K.layer_stream(generation, layer_index), device=device)
    if out_segments is not None and not keep_all_outputs:
        if sum(out_segments) != shape[0]:
            raise ValueError(f"out_segments {list(out_segments)} do not add up to the {shape[0]} filters")
        mask = torch.zeros(shape, dtype=torch.bool, device=device)
        start = 0
        for seg in out_segments:
            mask[start:start + math.ceil(s * seg)] = True
            start += seg
        return K.pack_mask(mask)
    if in_segments is None or keep_all_inputs or len(shape) < 2:
        return K.kels_mask_bits(shape, s, keep_all_inputs=keep_all_inputs, keep_all_outputs=keep_all_outputs,
                                device=device)
    if sum(in_segments) != shape[1]:
        raise ValueError(f"in_segments {list(in_segments)} do not add up to the {shape[1]} input channels")
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    rows = shape[0] if keep_all_outputs else math.ceil(s * shape[0])
    start = 0
    for seg in in_segments:
        mask[:rows, start:start + math.ceil(s * seg)] = True
        start += seg
    return K.pack_mask(mask)


def output_mask(words: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """Packed mask of a layer's outputs (its bias): output o is fit iff filter o keeps any weight."""
    dense = K.unpack_mask(words, weight_shape).reshape(weight_shape[0], -1)
    return K.pack_mask(dense.any(dim=1))


def fit_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified name: bool fit mask of the weight's shape} for every masked layer of ``model``."""
    return {name: K.unpack_mask(m.fit_mask, m.weight.shape) for name, m in masked_layers(model)}


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every masked layer, in ``named_modules`` order (for a split model's root, the list its
    :class:`~ke_fast.state.SplitState` keeps)."""
    return layers_and_state(model)[0]


class _CallableModule(types.ModuleType):
    """This module, callable as the function it used to shadow: ``ke_fast.masks(model)`` -> :func:`fit_masks`."""

    def __call__(self, model: nn.Module) -> dict[str, torch.Tensor]:
        warnings.warn("ke_fast.masks(model) is deprecated: call ke_fast.fit_masks(model) (ke_fast.masks is the "
                      "module)", DeprecationWarning, stacklevel=2)
        return fit_masks(model)


sys.modules[__name__].__class__ = _CallableModule
