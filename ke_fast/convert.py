"""``split`` any model into KE masked layers (in place), ``revert`` it, ``adopt`` foreign masks, and the
model-level operations: ``reinit_`` (one fused launch), ``fit_only`` and ``set_mode``.

The layer reading the network input and the classifier are found from the graph (torch.fx), not by
"C_in == 3"; KELS masks stay channel-consistent through residual adds (first channels everywhere) and
through concatenations (segments found from the graph; the official code needs ``in_channels_order``
by hand). Untraceable models fall back to the execution order recorded with hooks on ``example_input``.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import kernels as K
from . import ops
from .graph import Role as _Role, is_depthwise as _is_depthwise, layer_roles, trace, upstream as _through
from .masks import check_mode, layer_mask, masked_layers, output_mask
from .nn import MASKED_OF, FitGroup, MaskedLayer, masked_class
from .state import (LAYER_ATTR, ROOT_ATTR, SplitState, check_tied_masks, layers_and_state, layers_changed,
                    reset_plan, seed_of, state_of_layer)


def split(model: nn.Module, mode: str = "kels", split_rate: float = 0.5, *, seed: int = 0,
          filter_fn: Callable[[str, nn.Module], bool] | None = None, example_input: Any = None,
          strict: bool = False) -> nn.Module:
    """Convert the conv/linear layers of ``model`` (this instance, in place) into KE masked layers.

    Layers: nn.Conv1d / nn.Conv2d / nn.Linear and their subclasses (e.g. timm's StdConv2d, Conv2dSame,
    the official KE SplitConv) are converted; their Parameters, hooks and identity are kept, so
    optimizers stay valid. A subclass becomes an instance of a class derived from both it and the
    masked torch layer (:func:`ke_fast.nn.masked_class`): dense mode runs its own forward, fit mode runs
    that forward with W*M in place of ``self.weight``; plain attributes of its own that the masked layer
    uses too (e.g. ``split_mode``) hold ke_fast's values until :func:`revert` puts them back. Layers
    ke_fast cannot split stay dense and are listed by name in one warning (an error with ``strict=True``):
    other convolutions (Conv3d, ConvTranspose*), uninitialised lazy layers, the output projection of
    nn.MultiheadAttention (which reads its weight without calling it) and layers with a Parameter, buffer,
    submodule or class attribute named like one the masked layer sets. A subclass whose forward ignores
    ``self.weight`` cannot be detected: in fit mode it computes what it computes without the mask.

    The model's :class:`~ke_fast.state.SplitState` (mode, split rate, seed, its layers, reset plans and fit
    groups) is made here, reachable from the model and from each of its layers (:func:`ke_fast.state.split_state`).

    KELS roles, from the torch.fx graph: a layer whose output reaches the model's output without passing
    through another module with a weight matrix (a parameter of 2+ dims, converted or not) produces the
    output and keeps all its outputs; a layer that reads the model's input that way keeps all its
    inputs. So a conv feeding a classifier that ``filter_fn`` leaves out is a hidden layer, and a model
    that is itself one layer keeps everything. Without a graph (``example_input``), the first and the
    last of those modules to run decide, if they are split.

    Tied weights: layers sharing a weight (``b.weight = a.weight``) share its mask. Under WELS it is
    drawn from the stream of the first of them (in ``named_modules`` order), which they all take as
    their ``layer_index``; under KELS their roles must give the same mask, otherwise split refuses and
    names both. :func:`reinit_` resets a shared Parameter once. A Parameter of a converted layer that a
    module left dense also holds (e.g. an embedding tied to a classifier) is refused: that module would
    read the reset entries in fit mode.

    Args:
        model: any nn.Module.
        mode: ``"kels"`` (kernel-level: a slim fit network) or ``"wels"`` (weight-level: sparse).
        split_rate: fraction kept in the fit hypothesis, in (0, 1].
        seed: the run seed: WELS masks and every later reset are drawn from it (counter RNG).
        filter_fn: ``(name, module) -> bool`` to choose layers (default: all); layers it leaves out are
            never warned about.
        example_input: an input batch; needed only for models torch.fx cannot trace (and used for
            shapes of concatenations when given).
        strict: raise ValueError instead of warning when some chosen layers cannot be split.
    Returns:
        ``model``. Raises ValueError/TypeError, with the model unchanged, on bad input.
    """
    check_mode(mode)
    split_rate = K.check_split_rate(split_rate)
    K.check_seed(seed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if masked_layers(model):
        raise ValueError("model is already split: call ke_fast.revert(model) first")
    layers, unsupported = [], []
    for n, m in model.named_modules():
        if isinstance(m, _ConvNd | nn.Linear) and (filter_fn is None or filter_fn(n, m)):
            why = _unsupported(m)
            if why is None:
                layers.append((n, m))
            else:
                unsupported.append(f"{_label(n)} ({type(m).__name__}: {why})")
    if unsupported and strict:
        raise ValueError(f"split(strict=True): these layers cannot be split: {'; '.join(unsupported)}")
    if not layers:
        left = f"; left dense: {'; '.join(unsupported)}" if unsupported else ""
        raise ValueError(f"model has no nn.Conv1d / nn.Conv2d / nn.Linear layer to split (after filter_fn){left}")
    _check_shared_with_dense(model, layers)
    roles = layer_roles(model, layers, example_input) if mode == "kels" else {}
    plans = []
    owners: dict[int, tuple] = {}  # id(weight or bias) -> (first layer, its index, its mask, what decided it)
    for index, (name, m) in enumerate(layers):
        role = roles.get(name, _Role())
        if mode == "kels" and isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1 and m.groups != m.in_channels:
            raise ValueError(f"layer {name!r}: KELS supports groups=1 and depthwise convs, not groups={m.groups} "
                             f"with {m.in_channels} input channels")
        owner = owners.get(id(m.weight))
        index = index if owner is None else owner[1]  # a tied weight has one stream: its first layer's
        depthwise = _is_depthwise(m)
        words = layer_mask(m.weight.shape, mode, split_rate, seed=seed, layer_index=index,
                           keep_all_inputs=role.first, keep_all_outputs=role.last,
                           in_segments=None if depthwise else role.segments,
                           out_segments=role.segments if depthwise else None, device=m.weight.device)
        _claim(owners, m.weight, name, index, words, role.describe())
        if m.bias is not None:
            _claim(owners, m.bias, name, index, output_mask(words, m.weight.shape), "the outputs its weight keeps")
        plans.append((m, words, index))
    state = SplitState(mode, split_rate, seed)
    for m, words, index in plans:  # everything validated: now convert, all or nothing
        _convert(m, words, mode, split_rate, index, state, masked_class(type(m)))
    state.attach(model, layers)
    if unsupported:
        warnings.warn(f"ke_fast.split left these layers dense (not split): {'; '.join(unsupported)}. Leave them "
                      f"out with filter_fn to silence this, or pass strict=True to make it an error.", stacklevel=2)
    return model


# Instance attributes and buffers every masked layer sets (see MaskedLayer._setup_mask); "ke_seed" is a property
# of the masked layer (its SplitState's seed), which a plain attribute of that name would be hidden by
_LAYER_ATTRS = ("split_mode", "split_rate", "layer_index", "mode", "ke_seed")
_CACHE_ATTRS = ("_ke_fit", "_ke_keep", "_ke_group")  # what fit mode leaves on a layer (see MaskedLayer)
_LAYER_TENSORS = ("fit_mask", "bias_mask")


def _unsupported(m: nn.Module) -> str | None:
    """Why ke_fast cannot split this conv/linear layer, or None when it can."""
    if not isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
        return "only Conv1d, Conv2d and Linear layers and their subclasses are split"
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return "uninitialised lazy layer: run one forward first"
    if isinstance(m, NonDynamicallyQuantizableLinear):
        return "nn.MultiheadAttention reads this weight directly, never through the layer's forward"
    # a plain instance attribute of these names is set aside until revert (see _convert); anything else is not
    taken = [a for a in _LAYER_TENSORS + _LAYER_ATTRS if a in m._parameters or a in m._buffers or a in m._modules
             or hasattr(type(m), a) or (a in _LAYER_TENSORS and a in m.__dict__)]
    if taken:
        return f"it has {', '.join(map(repr, taken))} of its own, which the masked layer would replace"
    return None


def _label(name: str) -> str:
    return repr(name) if name else "the model itself"


def _claim(owners: dict, t: torch.Tensor, name: str, index: int, words: torch.Tensor, why: str) -> None:
    """Record the mask of a layer's weight or bias; a tensor another layer claimed first (tied weights)
    must get the same mask here: one Parameter, one mask."""
    owner = owners.setdefault(id(t), (name, index, words, why))
    if owner[0] != name and not torch.equal(owner[2], words):
        raise ValueError(f"layers {owner[0]!r} and {name!r} share a Parameter, which can have one mask only, but "
                         f"their masks differ ({owner[0]!r}: {owner[3]}; {name!r}: {why}); untie them or leave "
                         f"one out with filter_fn")


def _check_shared_with_dense(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse a layer Parameter that a module staying dense holds too: in fit mode that module would
    compute with the reset entries, and every reinit_ would change its fit-only output."""
    of = {id(p): n for n, m in layers for p in (m.weight, m.bias) if p is not None}
    chosen = {id(m) for _, m in layers}
    for name, mod in model.named_modules():
        if id(mod) in chosen:
            continue
        for pname, p in mod._parameters.items():
            if p is not None and id(p) in of:
                raise ValueError(f"layer {of[id(p)]!r} shares a Parameter with {_label(name)} "
                                 f"({type(mod).__name__}.{pname}), which split leaves dense: in fit mode it would "
                                 f"read the entries reinit_ resets. Split both (if both are conv/linear), untie "
                                 f"them, or leave {of[id(p)]!r} out with filter_fn")


def _convert(m: nn.Module, words: torch.Tensor, mode: str, split_rate: float, index: int, state: SplitState,
             cls: type) -> None:
    m._ke_orig_class = type(m)
    shadowed = {a: m.__dict__.pop(a) for a in _LAYER_ATTRS if a in m.__dict__}
    if shadowed:  # e.g. the official KE layers' own split_mode / split_rate: revert puts them back
        m._ke_shadowed = shadowed
    m.__class__ = cls  # this instance only; the class itself is never patched
    m._setup_mask(words, mode, split_rate, index, state)


def revert(model: nn.Module) -> nn.Module:
    """Turn every masked layer back into its original class (weights kept, masks dropped; a subclass's
    own attributes that the masked layer shadowed are restored) and drop the split state of ``model`` and
    of every module in it."""
    layers, _ = layers_and_state(model)
    for st in {id(st): st for st in (state_of_layer(m) for _, m in layers) if st is not None}.values():
        st.drop_caches()  # its plans and groups hold these layers' tensors
    for _, m in layers:
        for attr in _LAYER_ATTRS + _CACHE_ATTRS + (LAYER_ATTR,):
            m.__dict__.pop(attr, None)
        del m._buffers["fit_mask"], m._buffers["bias_mask"]
        m.__dict__.update(m.__dict__.pop("_ke_shadowed", {}))
        m.__class__ = m.__dict__.pop("_ke_orig_class")
    for m in model.modules():
        m.__dict__.pop(ROOT_ATTR, None)
    layers_changed()
    return model


def adopt(model: nn.Module, attr: str = "mask", *, seed: int = 0) -> nn.Module:
    """Take masks that other code put on conv/linear layers and make those layers ke_fast masked layers.

    ``attr="mask"``: the official KE layers' float ``mask`` Parameter (1 = fit), which is then removed
    (1 bit per weight instead of 32). ``attr="weight_mask"``: torch.nn.utils.prune; the pruning
    re-parametrisation is removed and ``weight`` holds ``weight_orig`` (the dense values), masked by
    the fit mask in fit mode; a pruned subclass of a torch layer keeps its own forward (as :func:`split`
    does). With any other ``attr`` the layer's forward, which applied the foreign mask, is replaced by
    the torch class's. ``seed`` becomes the seed of the model's :class:`~ke_fast.state.SplitState` (later
    resets draw from it). Raises, with the model unchanged, when a mask has the wrong shape or
    values other than 0/1, or when no layer carries ``attr``.
    """
    K.check_seed(seed)
    found = []
    for name, m in model.named_modules():
        mask = getattr(m, attr, None)
        if not isinstance(mask, torch.Tensor) or not any(isinstance(m, b) for b in MASKED_OF):
            continue
        if isinstance(m, MaskedLayer):
            raise ValueError(f"layer {name!r} is already a ke_fast masked layer")
        weight = m.weight_orig if attr == "weight_mask" and hasattr(m, "weight_orig") else m.weight
        if mask.shape != weight.shape:
            raise ValueError(f"layer {name!r}: {attr} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"layer {name!r}: {attr} must hold only 0 and 1")
        found.append((name, m, K.pack_mask(mask.detach())))
    if not found:
        raise ValueError(f"no conv/linear layer of the model has a tensor attribute {attr!r}")
    state = SplitState("custom", None, seed)
    for index, (name, m, words) in enumerate(found):
        if attr == "weight_mask":
            dense = m.weight_orig.detach().clone()
            torch.nn.utils.prune.remove(m, "weight")
            with torch.no_grad():
                m.weight.copy_(dense)
            # pruning only wrapped the weight (a forward pre-hook, now removed): the class's own forward stays
            cls = masked_class(type(m))
        else:
            delattr(m, attr)
            # the torch class's forward replaces the one that applied the foreign mask
            cls = MASKED_OF[next(b for b in MASKED_OF if isinstance(m, b))]
        _convert(m, words, "custom", max(K.density(words, m.weight.numel()), 1e-12), index, state, cls)
    state.attach(model, [(name, m) for name, m, _ in found])
    return model


# ---- model-level operations -------------------------------------------------------------------

def reset_(model: nn.Module, generation: int, *, init: str = "kaiming_uniform_a_sqrt5", seed: int | None = None,
           fan_mode: str = "fan_in", purpose: str = "reset", ignore_mask: bool = False,
           whole: Mapping[str, str] | None = None) -> nn.Module:
    """Re-draw the reset hypothesis of every masked layer (weights and biases): one fused launch per dtype.
    ``reinit_`` is this function under its old name, kept for one release.

    The values depend only on (seed, purpose, generation, layer index, element index): the same on
    every device, DDP rank and after a resume. ``seed`` defaults to the one given to :func:`split`.
    ``purpose="init"`` with ``generation=0`` gives the initial values (``ignore_mask=True`` draws the
    fit entries too: a whole-model initialisation that can later be regenerated, e.g. to rewind). A
    Parameter that several layers share (tied weights) is reset once, from its first layer's stream; if
    those layers' masks no longer agree, ValueError names them and nothing is reset.

    ``whole`` maps layer names to ``"keep"`` (weight and bias kept entirely) or ``"reset"`` (both re-drawn
    entirely) for this call, in place of their fit masks; layers it does not name follow their fit masks.
    It is how layer-threshold forgetting (:mod:`ke_fast.variants`) resets whole layers in the same single
    launch per dtype. ``ignore_mask=True`` is the same as ``"reset"`` for every layer.

    The plan (a :class:`~ke_fast.reset.ResetPlan` and its launch tables) is kept by the model's
    :class:`~ke_fast.state.SplitState` and reused while the layers' tensors, masks and these arguments stay the
    same: a CUDA graph that captured this call replays correctly while they do."""
    layers, state = layers_and_state(model)
    if not layers:
        raise ValueError("model has no masked layer: call ke_fast.split(model) first")
    whole = _check_whole(layers, whole)
    if ignore_mask:
        if whole:
            raise ValueError("reset_: pass ignore_mask=True (reset everything) or whole, not both")
        whole = {name: "reset" for name, _ in layers}
    if seed is None:
        seed = seed_of(layers)
    plan, strided = reset_plan(layers, state, seed=seed, init=init, fan_mode=fan_mode, whole=whole)
    with torch.no_grad():
        plan.run(generation, purpose)
        for p, work in strided:
            p.detach().copy_(work)
    return model


reinit_ = reset_  # the old name, kept for one release (the same function)


def reset_bn_(model: nn.Module, whole: Mapping[str, str] | None = None) -> nn.Module:
    """Reset the BatchNorm channels fed by reset filters: weight 1, bias 0, running mean 0, var 1.

    The producing layer of each BatchNorm is found from the fx graph (through channel-preserving ops).
    ``whole`` as in :func:`reinit_`: a layer named ``"keep"`` leaves its BatchNorm alone, one named
    ``"reset"`` has every channel of it reset."""
    layers = dict(masked_layers(model))
    whole = _check_whole(list(layers.items()), whole)
    gm = trace(model)
    modules = dict(gm.named_modules())
    with torch.no_grad():
        for node in gm.graph.nodes:
            bn = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            src = _through(node.args[0], modules)
            if src.op != "call_module" or src.target not in layers:
                continue
            m = layers[src.target]
            how = whole.get(src.target)
            keep = K.unpack_mask(m.bias_mask, (m.weight.shape[0],)) if how is None else \
                torch.full((m.weight.shape[0],), how == "keep", dtype=torch.bool, device=m.bias_mask.device)
            if keep.numel() != bn.num_features:
                continue
            reset = ~keep.to(bn.running_mean.device if bn.running_mean is not None else keep.device)
            if bn.affine:
                bn.weight[reset] = 1.0
                bn.bias[reset] = 0.0
            if bn.running_mean is not None:
                bn.running_mean[reset] = 0.0
                bn.running_var[reset] = 1.0
    return model


def _check_whole(layers: list[tuple[str, nn.Module]], whole: Mapping[str, str] | None) -> dict[str, str]:
    """Validate the ``whole`` argument of reinit_ / reset_bn_: masked layer names -> "keep" | "reset"."""
    whole = dict(whole or {})
    names = {name for name, _ in layers}
    unknown = [n for n in whole if n not in names]
    if unknown:
        raise ValueError(f"whole names {unknown} which are no masked layers of the model (they are e.g. "
                         f"{sorted(names)[:5]})")
    bad = {n: v for n, v in whole.items() if v not in ("keep", "reset")}
    if bad:
        raise ValueError(f"whole must map layer names to 'keep' or 'reset', got {bad}")
    return whole


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every masked layer to ``"dense"`` or ``"fit"`` (layers sharing a Parameter must still agree on
    its mask for ``"fit"``: ValueError naming them otherwise)."""
    layers, state = layers_and_state(model)
    if not layers:
        raise ValueError("model has no masked layer: call ke_fast.split(model) first")
    group = _fit_group(layers, state) if mode == "fit" else None
    for _, m in layers:
        m.set_mode(mode, group)


_TIED = "in fit mode each layer would compute with its own fit hypothesis of the one weight"


def _fit_group(layers: list[tuple[str, nn.Module]], state: SplitState | None) -> FitGroup:
    """The FitGroup of these layers (kept by their SplitState, with its launch tables), after checking that
    layers sharing a Parameter still hold one mask for it."""
    check_tied_masks(layers, _TIED)
    make = lambda: FitGroup([m for _, m in layers])  # noqa: E731
    return make() if state is None else state.kept("fit", layers, None, make)


@contextlib.contextmanager
def fit_only(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: every masked layer computes with its fit hypothesis alone, restored on exit
    (also on exception).

    The layers form one :class:`~ke_fast.nn.FitGroup` (kept by the model's :class:`~ke_fast.state.SplitState`):
    with gradients off, the first forward computes every layer's W*M in one ``ke_fast::masked_weights`` call
    per dtype and later forwards reuse them until a weight, bias or mask changes. Layers that return to dense
    mode on exit drop them. Layers sharing a Parameter (tied weights) must still hold one mask for it:
    ValueError naming both otherwise, before any layer changes mode."""
    layers, state = layers_and_state(model)
    if not layers:
        raise ValueError("model has no masked layer: call ke_fast.split(model) first")
    before = [(m.mode, m._ke_group) for _, m in layers]
    groups = {id(g) for _, g in before}
    # a model already in fit mode through one set_mode / fit_only keeps its group (and its cached W*M)
    if len(groups) == 1 and before[0][1] is not None:
        check_tied_masks(layers, _TIED)
        group = before[0][1]
    else:
        group = _fit_group(layers, state)
    try:
        for _, m in layers:
            m.set_mode("fit", group)
        yield model
    finally:
        for (_, m), (mode, previous) in zip(layers, before):
            m.set_mode(mode, previous)
