"""KE variants behind the same generation loop: layer-threshold forgetting and fit masks chosen by importance.

* Layer-threshold forgetting ("later-layer forgetting", Zhou, Vani, Larochelle & Courville, "Fortuitous
  Forgetting in Connectionist Networks", ICLR 2022): between generations every weight of the layers before
  a threshold layer (in forward order) is kept and every weight from it on is re-drawn, whatever the split
  masks say. :func:`forgetting_plan` turns the threshold into the ``whole`` argument of
  :func:`ke_fast.convert.reinit_` / :func:`~ke_fast.convert.reset_bn_`, so the reset stays one fused launch
  per dtype. A layer's bias follows its weight (kept or re-drawn); BatchNorm is reset only with ``reset_bn``,
  and then every channel fed by a reset layer and none fed by a kept one. The split masks still define the
  fit hypothesis that is evaluated and extracted.
* Fit masks by importance (WELS): the top-k weights of every layer by magnitude |W| or by SNIP saliency
  |W * dL/dW| (Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
  ICLR 2019), with k the count the random WELS rule targets (:func:`wels_count`). :func:`choose_masks_`
  sets them; the generation loop calls it at the end of generation 1's training, before N_1 and H^F_1 are
  evaluated (and at the end of every generation's training with ``resample_mask``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from . import kernels as K
from .graph import call_order
from .masks import masked_layers

MASK_CRITERIA = ("random", "magnitude", "snip")
SNIP_BATCHES = 4  # training batches whose SNIP saliencies are summed


# ---- layer-threshold forgetting ---------------------------------------------------------------------

def layers_matching(names: Sequence[str], reset_from: str) -> list[str]:
    """The layer names that ``reset_from`` designates: the name itself, or every name under it as a module
    path prefix (``"layer3"`` matches ``"layer3.0.conv1"``, not ``"layer30.conv"``). Raises ValueError
    naming ``reset_from`` (and some valid names) when it designates none."""
    if not isinstance(reset_from, str) or not reset_from:
        raise ValueError(f"reset_from must be a non-empty layer name or module prefix, got {reset_from!r}")
    found = [n for n in names if n == reset_from or n.startswith(reset_from + ".")]
    if not found:
        shown = ", ".join(list(names)[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"reset_from {reset_from!r} names no conv/linear layer of the model and is no module "
                         f"prefix of one; its layers are: {shown}")
    return found


def forward_order(model: nn.Module, example_input: Any) -> list[str]:
    """Names of the masked layers in the order they first run on ``example_input`` (eval mode, no grad: no
    BatchNorm statistic moves); layers that never run come last, in ``named_modules`` order."""
    layers = masked_layers(model)
    order = list(dict.fromkeys(call_order(model, layers, example_input)))  # first calls, in order
    return order + [n for n, _ in layers if n not in order]


def forgetting_plan(model: nn.Module, reset_from: str, example_input: Any) -> dict[str, str]:
    """``{layer: "keep" | "reset"}`` for every masked layer: "keep" before the first layer (in forward order)
    that ``reset_from`` designates (:func:`layers_matching`), "reset" from it on — the ``whole`` argument of
    :func:`ke_fast.convert.reinit_` and :func:`~ke_fast.convert.reset_bn_`."""
    order = forward_order(model, example_input)
    first = min(order.index(n) for n in layers_matching(order, reset_from))
    return {n: "keep" if i < first else "reset" for i, n in enumerate(order)}


# ---- fit masks by importance -----------------------------------------------------------------------

def check_criterion(criterion: object, split: str) -> str:
    """Validate a mask criterion for a split mode: the importance criteria apply to WELS only."""
    if criterion not in MASK_CRITERIA:
        raise ValueError(f"mask_criterion must be one of {MASK_CRITERIA}, got {criterion!r}")
    if criterion != "random" and split != "wels":
        raise ValueError(f"mask_criterion={criterion!r} applies to split='wels' only (KELS masks are whole "
                         f"channels, fixed by the graph), got split={split!r}")
    return criterion  # type: ignore[return-value]


def wels_count(numel: int, split_rate: float) -> int:
    """The number of fit weights of a layer of ``numel`` weights: ``s * numel`` rounded half up (the mean of
    the random WELS rule, which keeps each weight with probability ``s``), at least 1."""
    return min(numel, max(1, math.floor(K.check_split_rate(split_rate) * numel + 0.5)))


def top_k_mask(score: torch.Tensor, split_rate: float) -> torch.Tensor:
    """Packed mask keeping the :func:`wels_count` entries of ``score`` with the largest values; among equal
    scores the lower (row-major) index wins, so the choice is deterministic."""
    flat = score.detach().reshape(-1).float()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("top_k_mask: the scores hold NaN or infinite values")
    keep = torch.sort(flat, descending=True, stable=True).indices[:wels_count(flat.numel(), split_rate)]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[keep] = True
    return K.pack_mask(mask)


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer: |W|}`` for every masked layer."""
    return {n: m.weight.detach().abs() for n, m in masked_layers(model)}


def snip_scores(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                batches: Iterable[tuple[Any, Any]]) -> dict[str, torch.Tensor]:
    """``{layer: sum over batches of |W * dL/dW|}`` for every masked layer, with ``L = loss_fn(x, y)`` (which
    runs the model). The model runs in eval mode (no BatchNorm statistic moves, no dropout); gradients come
    from ``torch.autograd.grad``, so no ``.grad`` is touched."""
    layers = masked_layers(model)
    weights = [m.weight for _, m in layers]
    scores = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    was_training, seen = model.training, 0
    try:
        model.eval()
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(x, y), weights, allow_unused=True)
            for s, w, g in zip(scores, weights, grads):
                if g is not None:
                    s += (w.detach().float() * g.float()).abs()
            seen += 1
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("snip_scores: batches is empty")
    return {n: s for (n, _), s in zip(layers, scores)}


def choose_masks_(model: nn.Module, scores: dict[str, torch.Tensor], split_rate: float) -> nn.Module:
    """Set the fit mask of every masked layer named in ``scores`` to its :func:`top_k_mask` (biases follow
    their filters, as for every mask)."""
    layers = dict(masked_layers(model))
    for name, score in scores.items():
        m = layers[name]
        if score.shape != m.weight.shape:
            raise ValueError(f"scores[{name!r}] has shape {tuple(score.shape)}, the weight {tuple(m.weight.shape)}")
        m.set_fit_mask(top_k_mask(score, split_rate))
    return model
