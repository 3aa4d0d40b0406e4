"""Drop-in masked layers: subclasses of nn.Conv1d / nn.Conv2d / nn.Linear that only override ``forward``.

``weight`` and ``bias`` stay the Parameters (state_dict keys and isinstance checks as in PyTorch); a
persistent int32 buffer ``fit_mask`` holds the packed fit mask (1 bit per weight). ``mode`` is
``"dense"`` (the plain PyTorch op: KE trains the dense network) or ``"fit"`` (the fit hypothesis
alone: W*M and the autocast cast fused in one kernel pass, then cuDNN / cuBLAS; the bias is masked by
the output-filter mask).

Subclasses of the three torch layers (e.g. timm's weight-standardising ``StdConv2d``) get a masked class
of their own from :func:`masked_class`: dense mode runs their own ``forward``, fit mode runs that same
``forward`` with W*M presented as ``self.weight`` (and the masked bias as ``self.bias``).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels as K
from . import ops
from .masks import LAYER_MODES, layer_mask, output_mask

MODES = ("dense", "fit")


class MaskedLayer:
    """Mixin of the masked layers (placed before the torch class): constructor keywords, mask buffers,
    mode, state-dict rules and the forward; subclasses only say how W and b are applied."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    fit_mask: torch.Tensor
    bias_mask: torch.Tensor
    _ke_wraps: type | None = None  # the user's subclass of a torch layer that a generated class wraps

    def __init__(self, *args: Any, split_mode: str = "kels", split_rate: float = 0.5, seed: int = 0,
                 layer_index: int = 0, keep_all_inputs: bool = False, keep_all_outputs: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the torch layer's own constructor
        words = layer_mask(self.weight.shape, split_mode, split_rate, seed=seed, layer_index=layer_index,
                           keep_all_inputs=keep_all_inputs, keep_all_outputs=keep_all_outputs,
                           device=self.weight.device)
        self._setup_mask(words, split_mode, split_rate, layer_index, seed)

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
        a weight standardisation stays in fp32. The masked tensors are the outputs of ``masked_weight``,
        so the gradient reaches the real Parameters as grad*M; the Parameters are back in their slots when
        this returns or raises."""
        w = ops.masked_weight(self.weight, self.fit_mask)
        b = None if self.bias is None else ops.masked_weight(self.bias, self.bias_mask)
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
                    seed: int = 0) -> None:
        if split_mode not in LAYER_MODES:
            raise ValueError(f"split_mode must be one of {LAYER_MODES}, got {split_mode!r}")
        self.split_mode = split_mode
        self.split_rate = K.check_split_rate(split_rate)
        self.layer_index = int(layer_index)
        self.ke_seed = K.rng.check_seed(seed)  # the run seed: later resets draw from it
        self.mode = "dense"
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

    @property
    def density(self) -> float:
        """Fraction of fit weights."""
        return K.density(self.fit_mask, self.weight.numel())

    def set_mode(self, mode: str) -> None:
        """``"dense"`` (train the whole layer) or ``"fit"`` (compute with the fit hypothesis only)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def fit_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W*M, b*M_out) in the compute dtype (the autocast dtype when autocast is on)."""
        device_type = self.weight.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        w = ops.masked_weight(self.weight, self.fit_mask, dtype)
        b = None if self.bias is None else ops.masked_weight(self.bias, self.bias_mask, dtype)
        return w, b

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

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, split_mode={self.split_mode}, split_rate={self.split_rate}, "
                f"mode={self.mode}, density={self.density:.3f}")


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
