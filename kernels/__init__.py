"""ke_fast.kernels: Triton kernels and plain single-implementation launchers on tensors.

No nn.Module, no autograd and no choice of implementation here: each op has a Triton launcher (in the
module of its kernel), a C++ CPU entry point (:mod:`.cpu`) and a PyTorch reference (:mod:`.reference`)
with one signature, and :mod:`ke_fast.ops` registers them per device. This package also holds what
every implementation shares: the bit-mask format, the counter RNG, reset schemes and their validation.
"""
from . import rng, sparse_conv
from .bitmask import (check_split_rate, density, kels_mask_bits, layer_stream, num_words, pack_mask, popcount,
                      unpack_mask)
from .reinit import SCHEMES, fans_of, scheme_params
from .rng import PURPOSE_INIT, PURPOSE_MASK, PURPOSE_RESET, stream_id

__all__ = [
    "rng", "sparse_conv", "SCHEMES", "PURPOSE_INIT", "PURPOSE_MASK", "PURPOSE_RESET", "check_split_rate", "density",
    "fans_of", "kels_mask_bits", "layer_stream", "num_words", "pack_mask", "popcount", "scheme_params", "stream_id",
    "unpack_mask",
]
