"""Drop-in masked layers: subclasses of nn.Conv1d / nn.Conv2d / nn.Linear that only override ``forward``.

``weight`` and ``bias`` stay the Parameters (state_dict keys and isinstance checks as in PyTorch); a
persistent int32 buffer ``fit_mask`` holds the packed fit mask (1 bit per weight). ``mode`` is
``"dense"`` (the plain PyTorch op: KE trains the dense network) or ``"fit"`` (the fit hypothesis
alone: W*M and the autocast cast fused in one kernel pass, then cuDNN / cuBLAS; the bias is masked by
the output-filter mask).

Subclasses of the three torch layers (e.g. timm's weight-standardising ``StdConv2d``) get a masked class
of their own from :func:`masked_class`: dense mode runs their own ``forward``, fit mode runs that same
``forward`` with W*M presented as ``self.weight`` (and the masked bias as ``self.bias``).

How fit mode computes W*M (launches are what costs on a GPU: tens of microseconds each from Python):

* gradients off (evaluation): W*M and the masked bias of every layer are cached on the layer and reused
  until its weight, bias or mask changes (version counter, address, dtype, device) or the compute dtype
  does; the stale layers of the whole model (the :class:`FitGroup` that ``fit_only`` / ``set_mode`` use)
  are refreshed together, in one ``ke_fast::masked_weights`` call per dtype. The first forward pays one
  launch, the next ones none. The cache lives while the layer is in fit mode.
* gradients on (training): the path :data:`TRAIN_PATH` names for the weight's device type (see there).
* inside torch.compile / export: always ``ke_fast::masked_weight`` per layer (one opaque node each).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels as K
from . import ops
from .masks import LAYER_MODES, layer_mask, output_mask
from .state import LAYER_ATTR, SplitState, layers_changed, state_of_layer

MODES = ("dense", "fit")
TRAIN_PATHS = ("op", "eager", "batched")
# How fit mode computes W*M with gradients on, per weight device type (other device types: "op"):
# * "op": ke_fast::masked_weight per layer, W*M and the cast in one fused pass (backward: grad*M in one pass);
# * "eager": plain PyTorch, torch.where(M, W, 0).to(dtype) with M unpacked once and cached on the layer (as a
#   bool tensor): two cheap launches per layer that autograd differentiates itself;
# * "batched": one ke_fast::masked_weights call for all the layers of the model per forward (one launch per
#   dtype on a GPU) and one for all their grad*M in the backward.
# CUDA: "eager". The committed H100 file benchmarks/results/h100-2026-11-25-d4ad84a-reinit-masked.json (fused
# op per layer, commit d4ad84a) has test_train_step at 23.5 ms for fit mode against 17.2 ms dense (fit/dense
# 1.37x) and 15.3 ms for a plain model holding W*M (prune-style, 0.89x): a launch per layer costs more than the
# eager ops. "eager" and "batched" were not measured on a GPU: run `make bench` (benchmarks/test_bench_masked.py,
# test_train_step[fit-*]) on one before changing this. CPU: "eager" (not yet measured at this commit: the same
# benchmark on CPU compares the three paths).
TRAIN_PATH: dict[str, str] = {"cuda": "eager", "cpu": "eager"}


class _Persistence:
    """What a masked layer keeps and drops across moves (``.to()``), copies, pickles and checkpoints: its
    caches never travel, its SplitState does (settings only), a dense checkpoint loads and keeps the mask.
    A base of :class:`MaskedLayer`, so it comes before the torch class in every masked class's MRO."""

    def _drop_fit_caches(self) -> None:
        self._ke_fit = None
        self._ke_keep = None

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / .cuda(): the cached W*M and masks, and the model's reset plans, belong to the old tensors
        self._drop_fit_caches()
        state = state_of_layer(self)
        if state is not None:
            state.drop_caches()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # caches and the fit group (weak references) are not part of a layer's state: pickle / deepcopy skip them;
        # the SplitState is (its settings only), shared with the model and its other layers
        state = dict(super().__getstate__())
        state.update(_ke_fit=None, _ke_keep=None, _ke_group=None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        layers_changed()  # a copy or a loaded layer: a new masked layer
        if state_of_layer(self) is None:  # pickled before SplitState existed: its seed was a copy on each layer
            seed = self.__dict__.pop("ke_seed", 0)
            custom = self.split_mode == "custom"
            self.__dict__[LAYER_ATTR] = SplitState(self.split_mode, None if custom else self.split_rate, seed)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A dense checkpoint (no fit_mask) loads into masked layers and keeps the current mask.
        key = prefix + "fit_mask"
        had = key in state_dict
        if had:
            try:
                self._check_words(state_dict[key])
            except ValueError as exc:
                error_msgs.append(f"{key}: {exc}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not had and key in missing_keys:
            missing_keys.remove(key)
        self.bias_mask = output_mask(self.fit_mask, self.weight.shape)
        self._drop_fit_caches()


class MaskedLayer(_Persistence):
    """Mixin of the masked layers (placed before the torch class): constructor keywords, mask buffers,
    mode and the forward (state-dict and copy rules: :class:`_Persistence`); subclasses only say how W and b
    are applied."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    fit_mask: torch.Tensor
    bias_mask: torch.Tensor
    _ke_wraps: type | None = None  # the user's subclass of a torch layer that a generated class wraps
    _ke_group: FitGroup | None = None  # the layers whose W*M are refreshed with this one's (fit mode only)
    _ke_fit: tuple | None = None  # (state, W*M, b*M_out, refresh) cached by the FitGroup
    _ke_keep: tuple | None = None  # (key, bool M, bool M_out) of the "eager" training path
    _ke_masked_layer = True  # state.MASKED_MARK: how the rooms below nn recognise a masked layer

    def __init__(self, *args: Any, split_mode: str = "kels", split_rate: float = 0.5, seed: int = 0,
                 layer_index: int = 0, keep_all_inputs: bool = False, keep_all_outputs: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the torch layer's own constructor
        words = layer_mask(self.weight.shape, split_mode, split_rate, seed=seed, layer_index=layer_index,
                           keep_all_inputs=keep_all_inputs, keep_all_outputs=keep_all_outputs,
                           device=self.weight.device)
        # a layer built directly is a split model of its own: its root and its only layer
        state = SplitState(split_mode, split_rate, seed)
        self._setup_mask(words, split_mode, split_rate, layer_index, state)
        state.attach(self, [("", self)])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return super().forward(input)  # the layer's own forward: KE trains the dense network
        if self._ke_wraps is not None:
            return self._own_forward_on_fit(input)
        w, b = self.fit_params()
        return self._fit_forward(input, w, b)

    def _own_forward_on_fit(self, input: torch.Tensor) -> torch.Tensor:
        """The wrapped subclass's own forward with W*M in the ``weight`` slot and b*M_out in ``bias``.

        W*M keeps the weight's dtype: the subclass (and autocast) then cast it exactly as they cast W, e.g.
        a weight standardisation stays in fp32. The masked tensors carry the gradient to the real Parameters
        as grad*M; the Parameters are back in their slots when this returns or raises."""
        w, b = self._masked_params(self.weight.dtype)
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        # _parameters directly: nn.Module.__setattr__ would refuse a non-Parameter in a Parameter's place
        params["weight"], params["bias"] = w, b
        try:
            return super().forward(input)
        finally:
            params["weight"], params["bias"] = weight, bias

    def _fit_forward(self, input: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _setup_mask(self, words: torch.Tensor, split_mode: str, split_rate: float, layer_index: int,
                    state: SplitState) -> None:
        if split_mode not in LAYER_MODES:
            raise ValueError(f"split_mode must be one of {LAYER_MODES}, got {split_mode!r}")
        self.split_mode = split_mode  # this layer's mask: for an adopted mask, "custom" and its density
        self.split_rate = K.check_split_rate(split_rate)
        self.layer_index = int(layer_index)  # seeds the layer's WELS and reset streams
        self.__dict__[LAYER_ATTR] = state  # the model's seed and caches (see ke_fast.state)
        self.mode = "dense"
        layers_changed()
        self._check_words(words)
        self.register_buffer("fit_mask", words.to(self.weight.device), persistent=True)
        # derived from fit_mask, so not saved; rebuilt whenever fit_mask changes
        self.register_buffer("bias_mask", output_mask(self.fit_mask, self.weight.shape), persistent=False)

    def _check_words(self, words: torch.Tensor) -> None:
        n = K.num_words(self.weight.numel())
        if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or tuple(words.shape) != (n,):
            got = f"{words.dtype} {tuple(words.shape)}" if isinstance(words, torch.Tensor) else type(words).__name__
            raise ValueError(f"fit_mask must be {n} int32 packed words for weight {tuple(self.weight.shape)}, got {got}")

    def set_fit_mask(self, words: torch.Tensor) -> None:
        """Replace the packed fit mask (and the derived bias mask)."""
        self._check_words(words)
        self.fit_mask = words.to(self.fit_mask.device)
        self.bias_mask = output_mask(self.fit_mask, self.weight.shape)
        self._drop_fit_caches()

    @property
    def ke_seed(self) -> int:
        """The seed the layer's model was split with (its :class:`~ke_fast.state.SplitState`'s)."""
        state = state_of_layer(self)
        if state is None:
            raise AttributeError(f"{type(self).__name__} has no split state, hence no seed")
        return state.seed

    @property
    def density(self) -> float:
        """Fraction of fit weights."""
        return K.density(self.fit_mask, self.weight.numel())

    def set_mode(self, mode: str, group: FitGroup | None = None) -> None:
        """``"dense"`` (train the whole layer) or ``"fit"`` (compute with the fit hypothesis only).

        ``group``: the :class:`FitGroup` whose layers refresh their W*M together (``fit_only`` and
        ``ke_fast.set_mode`` pass their model's; default: the layer's current one, else a group of its own).
        Leaving fit mode drops the cached W*M."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if group is not None and not isinstance(group, FitGroup):
            raise TypeError(f"group must be a FitGroup or None, got {type(group).__name__}")
        self.mode = mode
        if mode == "dense":
            self._ke_group = None
            self._drop_fit_caches()
        elif group is not None and group is not self._ke_group:
            self._drop_fit_caches()
            self._ke_group = group
        elif self._ke_group is None:
            self._ke_group = FitGroup([self])

    def fit_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W*M, b*M_out) in the compute dtype (the autocast dtype when autocast is on). With gradients off
        these are the layer's cached tensors: read them, do not modify them in place."""
        return self._masked_params(self._compute_dtype())

    # The methods below run on every fit-mode forward: they read the Parameters and buffers from their dicts
    # (``self.weight`` goes through nn.Module.__getattr__, ~0.5 us a time) to keep a cache hit at ~2 us.

    def _compute_dtype(self) -> torch.dtype:
        """The dtype fit mode hands W*M to the layer's op in: autocast's when on (not for a wrapped subclass,
        which casts W*M itself), else the weight's."""
        w = self._parameters["weight"]
        device_type = w.device.type
        if self._ke_wraps is None and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return w.dtype

    def _masked_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W*M, b*M_out) in ``dtype``, by the path the module note describes."""
        if torch.compiler.is_compiling():
            return self._op_params(dtype)
        w, b = self._parameters["weight"], self._parameters["bias"]
        if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
            path = TRAIN_PATH.get(w.device.type, "op")
            grad = True
        else:
            hit = self._ke_fit  # the cache hit of evaluation, checked here first: the common case
            if hit is not None and hit[3] is None and not w.is_inference() and hit[0] == self._fit_state(dtype):
                return hit[1], hit[2]
            path, grad = "cache", False
        if path == "op" or w.is_inference():  # inference tensors keep no version counter: no cache
            return self._op_params(dtype)
        if path == "eager":
            return self._eager_params(dtype)
        if self._ke_group is None:  # e.g. a copy made in fit mode: groups are not copied
            self._ke_group = FitGroup([self])
        return self._ke_group.params(self, dtype, grad)

    def _op_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = ops.masked_weight(self.weight, self.fit_mask, dtype)
        b = None if self.bias is None else ops.masked_weight(self.bias, self.bias_mask, dtype)
        return w, b

    def _eager_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self._parameters["weight"], self._parameters["bias"]
        fit_mask, bias_mask = self._buffers["fit_mask"], self._buffers["bias_mask"]
        key = (id(fit_mask), fit_mask._version, bias_mask._version)  # device moves drop the cache (_apply)
        keep = self._ke_keep
        if keep is None or keep[0] != key:
            keep_w = K.unpack_mask(fit_mask, w.shape).to(w.device)
            keep_b = None if b is None else K.unpack_mask(bias_mask, b.shape).to(b.device)
            keep = self._ke_keep = (key, keep_w, keep_b)
        return (torch.where(keep[1], w, 0).to(dtype),
                None if b is None else torch.where(keep[2], b, 0).to(dtype))

    def _fit_state(self, dtype: torch.dtype) -> tuple:
        """What the cached W*M depends on: a cached value is valid while this tuple is unchanged. Device and
        dtype moves (``_apply``), ``load_state_dict`` and ``set_fit_mask`` also drop the cache explicitly."""
        w, b = self._parameters["weight"], self._parameters["bias"]
        fit_mask, bias_mask = self._buffers["fit_mask"], self._buffers["bias_mask"]
        return (dtype, id(w), w.data_ptr(), w._version, id(fit_mask), fit_mask._version, id(bias_mask),
                bias_mask._version, None if b is None else (id(b), b.data_ptr(), b._version),
                torch.is_inference_mode_enabled())

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, split_mode={self.split_mode}, split_rate={self.split_rate}, "
                f"mode={self.mode}, density={self.density:.3f}")


class FitGroup:
    """The masked layers of one model in fit mode: their W*M are computed together, in one
    ``ke_fast::masked_weights`` call per (weight dtype, compute dtype) — one launch on a GPU.

    Gradients off: each layer keeps its W*M until its state (weight / bias / mask identity, address and
    version counter, compute dtype, inference mode) changes or a move / load / new mask drops it; the first
    layer that finds its value stale refreshes every stale layer of the group. Gradients on (the "batched" training path): one refresh computes the W*M of all layers
    with autograd; a layer reuses its value until the backward reaches that refresh (then the values
    are spent: the next forward computes new ones) or its state changes.

    ``ke_fast.fit_only(model)`` and ``ke_fast.set_mode(model, "fit")`` use one per set of layers, kept by the
    model's :class:`~ke_fast.state.SplitState`. Holds its layers weakly, and owns the launch tables of its
    ``masked_weights`` calls (one per device and set of sizes): they live as long as the group, so a CUDA graph
    that captured a refresh keeps reading valid tables."""

    def __init__(self, layers: list[MaskedLayer]) -> None:
        self._layers = [weakref.ref(m) for m in layers]
        self._tables: dict = {}  # ops.masked_weights' launch tables, owned here
        self._refreshes = 0  # counts refreshes with gradients; the spent ones are below _live
        self._live = 0

    def layers(self) -> list[MaskedLayer]:
        """The group's layers still alive, in fit mode and in this group."""
        return [m for m in (r() for r in self._layers) if m is not None and m.mode == "fit" and m._ke_group is self]

    def params(self, layer: MaskedLayer, dtype: torch.dtype, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W*M, b*M_out) of ``layer`` in ``dtype``, from the cache or after a refresh of the group."""
        state = layer._fit_state(dtype)
        hit = layer._ke_fit
        if hit is None or hit[0] != state or (hit[3] is not None) != grad or (grad and hit[3] < self._live):
            self._refresh(layer, state, grad)
            hit = layer._ke_fit
        return hit[1], hit[2]

    def _refresh(self, layer: MaskedLayer, state: tuple, grad: bool) -> None:
        """Recompute W*M of every stale layer of the group on ``layer``'s device (all of them with gradients)."""
        device = layer.weight.device
        todo = [(layer, state)]
        for m in self.layers():
            if m is layer or m.weight.device != device or m.weight.is_inference():
                continue
            st = m._fit_state(m._compute_dtype())
            hit = m._ke_fit
            if grad or hit is None or hit[0] != st or hit[3] is not None:
                todo.append((m, st))
        refresh = None
        if grad:
            self._refreshes += 1
            refresh = self._refreshes
        jobs: dict[tuple, list] = {}  # (tensor dtype, compute dtype) -> [(layer index, slot, tensor, words)]
        for i, (m, st) in enumerate(todo):
            jobs.setdefault((m.weight.dtype, st[0]), []).append((i, 0, m.weight, m.fit_mask))
            if m.bias is not None:
                jobs.setdefault((m.bias.dtype, st[0]), []).append((i, 1, m.bias, m.bias_mask))
        out: list[list] = [[None, None] for _ in todo]
        for (_, dtype), items in jobs.items():
            results = ops.masked_weights([t for _, _, t, _ in items], [w for _, _, _, w in items], dtype,
                                         tables=self._tables)
            for (i, slot, _, _), r in zip(items, results):
                out[i][slot] = r
            tracked = next((r for r in results if r.requires_grad), None) if grad else None
            if tracked is not None:  # the values are spent once the backward has gone through them
                tracked.register_hook(functools.partial(_spend, weakref.ref(self), refresh))
        for (m, st), (w, b) in zip(todo, out):
            m._ke_fit = (st, w, b, refresh)


def _spend(group_ref: weakref.ref, refresh: int, grad: torch.Tensor) -> None:
    group = group_ref()
    if group is not None:
        group._live = max(group._live, refresh + 1)


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    """nn.Conv2d with a fixed KE fit mask. Extra keywords: split_mode ("kels"/"wels"), split_rate,
    seed, layer_index (the WELS stream), keep_all_inputs / keep_all_outputs (KELS)."""

    def _fit_forward(self, input: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(input, w, b)


class MaskedConv1d(MaskedLayer, nn.Conv1d):
    """nn.Conv1d with a fixed KE fit mask (keywords as :class:`MaskedConv2d`)."""

    def _fit_forward(self, input: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(input, w, b)


class MaskedLinear(MaskedLayer, nn.Linear):
    """nn.Linear with a fixed KE fit mask (keywords as :class:`MaskedConv2d`)."""

    def _fit_forward(self, input: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(input, w, b)


MASKED_OF: dict[type, type] = {nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d, nn.Linear: MaskedLinear}


@functools.cache
def masked_class(cls: type) -> type:
    """The masked layer class for layers of class ``cls``: nn.Conv1d / nn.Conv2d / nn.Linear or a subclass.

    The torch classes map to :class:`MaskedConv1d` / :class:`MaskedConv2d` / :class:`MaskedLinear`. A
    subclass gets a class generated once per subclass (the same object every call), derived from both the
    masked torch class and the subclass: isinstance checks of either kind and the subclass's own methods
    keep working, dense mode runs the subclass's forward and fit mode runs it on W*M. Instances of a
    generated class pickle and deep-copy (the class is rebuilt from the subclass on load)."""
    if cls in MASKED_OF:
        return MASKED_OF[cls]
    base = next((b for b in MASKED_OF if issubclass(cls, b)), None)
    if base is None or issubclass(cls, MaskedLayer):
        raise TypeError(f"cls must be nn.Conv1d, nn.Conv2d, nn.Linear or a subclass of one, got {cls.__qualname__}")
    return type(f"Masked{cls.__name__}", (MASKED_OF[base], cls),
                {"__module__": __name__, "__doc__": f"{cls.__qualname__} with a fixed KE fit mask.", "_ke_wraps": cls,
                 "__reduce_ex__": _reduce_generated})


def _reduce_generated(self: nn.Module, protocol: int) -> tuple:
    # a generated class has no importable name: pickle the subclass it wraps and rebuild the class on load
    return _new_generated, (self._ke_wraps,), self.__getstate__()


def _new_generated(cls: type) -> nn.Module:
    """An empty instance of ``masked_class(cls)``; pickle and deepcopy then restore its state."""
    masked = masked_class(cls)
    return masked.__new__(masked)
