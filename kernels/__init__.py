"""ke_fast.kernels: Triton kernels and plain single-implementation launchers on tensors.

No nn.Module, no autograd and no choice of implementation here: each op has a Triton launcher (in the
module of its kernel), a C++ CPU entry point (:mod:`.cpu`) and a PyTorch reference (:mod:`.reference`)
with one signature, and :mod:`ke_fast.ops` registers them per device. This package also holds what
every implementation shares: the bit-mask and compressed formats (:mod:`.format`), the counter RNG's
streams (:mod:`.streams`), reset schemes, launch tables and their validation (:mod:`.launch`).

Triton is imported only by the modules that hold Triton kernels (:mod:`.rng`, :mod:`.bitmask`,
:mod:`.masked`, :mod:`.reinit`, :mod:`.sparse_conv`, :mod:`.aot`), and those are imported on first use
(``ke_fast.kernels.sparse_conv`` as an attribute or an import), so everything else works where Triton
is absent (macOS, Windows, a CPU-only venv).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from . import compressed, device, format, launch, streams  # noqa: A004 (format: the module's name is the idea)
from .compressed import Compressed, compress, decompress
from .format import (check_split_rate, density, kels_mask_bits, layer_stream, num_words, pack_mask, popcount,
                     unpack_mask)
from .launch import SCHEMES, fans_of, scheme_params
from .streams import PURPOSE_INIT, PURPOSE_MASK, PURPOSE_RESET, as_int64, check_seed, stream_id

# modules that import Triton, loaded on first access
TRITON_MODULES = ("rng", "bitmask", "masked", "reinit", "sparse_conv", "aot")

__all__ = [
    "compressed", "device", "format", "launch", "streams", "SCHEMES", "PURPOSE_INIT", "PURPOSE_MASK", "PURPOSE_RESET", "Compressed",
    "as_int64", "check_seed", "check_split_rate", "compress", "decompress", "density", "fans_of", "kels_mask_bits",
    "layer_stream", "num_words", "pack_mask", "popcount", "scheme_params", "stream_id", "unpack_mask",
    *TRITON_MODULES,
]


def __getattr__(name: str) -> ModuleType:
    """``kernels.rng``, ``kernels.sparse_conv``, ...: the Triton modules, imported when first asked for."""
    if name in TRITON_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
