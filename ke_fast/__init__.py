"""ke_fast: fast Knowledge Evolution (KE) for PyTorch — Triton kernels plus a thin layer of masked modules.

    import ke_fast
    ke_fast.split(model, "kels", 0.5, seed=0)      # masked layers, in place
    ke_fast.reset_(model, generation=2)             # reset hypothesis re-drawn: one fused launch
    with ke_fast.fit_only(model): evaluate(model)   # the fit hypothesis alone

Old names kept for one release (the same objects): ``reinit_`` = :func:`reset_`, ``ReinitPlan`` =
:class:`ResetPlan`; ``ke_fast.masks`` is the module :mod:`ke_fast.masks`, and calling it,
``ke_fast.masks(model)``, forwards to :func:`fit_masks` with a DeprecationWarning.
"""
from . import dispatch, kernels, ops
from .convert import adopt, fit_only, reinit_, reset_, revert, set_mode, split
from . import masks  # the module (callable for one release: see its docstring), never shadowed by a function
from .masks import fit_masks, masked_layers
from .extract import SparseConv2d, SparseLinear, extract_slim, extract_sparse, slim_report
from .nn import MaskedConv1d, MaskedConv2d, MaskedLayer, MaskedLinear
from .ops import wels_mask_bits
from .reset import ReinitPlan, ResetPlan

__version__ = "0.1.0"
__all__ = ["dispatch", "kernels", "ops", "ResetPlan", "ReinitPlan", "wels_mask_bits", "extract_slim", "extract_sparse",
           "SparseConv2d", "SparseLinear", "slim_report", "split", "revert", "adopt", "reset_", "reinit_", "fit_only",
           "set_mode", "fit_masks", "masks", "masked_layers", "MaskedConv1d", "MaskedConv2d", "MaskedLinear",
           "MaskedLayer"]
