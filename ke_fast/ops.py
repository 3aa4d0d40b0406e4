"""torch.library ops ``ke_fast::*``: the one door from the nn layer to the kernels.

Every op is defined once here and registers, per device, the kernel that runs it:

=================  =====================================  ==========================================
op                 ``cuda``                               ``cpu``
=================  =====================================  ==========================================
masked_weight      Triton (kernels/masked.py)             C++ (kernels/csrc), else the reference
masked_weights     Triton, one launch for many tensors    C++ per tensor, else the reference
wels_bits\\_        Triton (kernels/bitmask.py)            C++, else the reference
reset_entries\\_    Triton (kernels/reinit.py)             C++, else the reference
sparse_conv2d      Triton (kernels/sparse_conv.py)        the reference (decompress + F.conv2d)
sparse_linear      Triton (kernels/sparse_conv.py)        the reference (decompress + F.linear)
=================  =====================================  ==========================================

plus a fake (meta) kernel each, and an autograd formula where the op is differentiable
(``masked_weight`` / ``masked_weights``: the gradient is ``grad * M``), so ``torch.compile(fullgraph=True)``
sees one opaque node per op and ``torch.library.opcheck`` passes. The kernels in ``kernels/`` are single-implementation
functions with one signature per op; nothing outside this file chooses between them. The Triton launchers are
imported the first time a Triton implementation is chosen, so everything else works where Triton is absent.

The ``KE_FAST_*`` variables are read once, at import and by :func:`reload_settings`, never per op call.
``KE_FAST_BACKEND=auto|triton|cpp|reference`` (default ``auto``) is a debug override, read only here and used
only by :func:`implementation`. It offers only what is legal on the host: Triton on CPU tensors only under
``TRITON_INTERPRET=1`` (set before ke_fast is imported), the C++ kernels only on CPU tensors and only
where they could be built; ``cpp`` runs the reference for ops that have no C++ kernel.
``KE_FAST_SPARSE=auto|on|off`` steers the sparse/dense dispatcher, :mod:`ke_fast.dispatch`, whose names
(``ops.sparse_conv2d``, ``ops.save_sparse_decisions``, ...) stay readable here as aliases for one release.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from . import kernels
from .kernels import backend, compressed, cpu, format, launch, reference
from .kernels.device import check_one_device, listed
from .kernels.streams import as_int64

ENV = "KE_FAST_BACKEND"
SPARSE_ENV = "KE_FAST_SPARSE"
IMPLEMENTATIONS = ("triton", "cpp", "reference")
SPARSE_MODES = ("auto", "on", "off")
DEVICE_TYPES = ("cpu", "cuda")
OPS: list[str] = []  # every op of the ke_fast namespace, in definition order (filled by _define)


# ---- settings: the environment, read once ----------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """``KE_FAST_*`` as the ops use them (lower-cased, empty = auto); checked where used, naming the variable."""

    backend: str  # KE_FAST_BACKEND: auto | triton | cpp | reference
    sparse: str  # KE_FAST_SPARSE: auto | on | off


def _read_settings() -> Settings:
    read = lambda name: os.environ.get(name, "auto").strip().lower() or "auto"  # noqa: E731
    return Settings(backend=read(ENV), sparse=read(SPARSE_ENV))


_settings = _read_settings()
_CHOSEN: dict[str, str] = {}  # device type -> implementation (implementation()'s answer, once per setting)
_KERNELS: dict[tuple[str, str], Callable] = {}  # (op, device type) -> the function its kernel runs


def settings() -> Settings:
    """The settings in force (read at import or by the last :func:`reload_settings`)."""
    return _settings


def reload_settings() -> Settings:
    """Read ``KE_FAST_*`` (and ``TRITON_INTERPRET``) again and forget every choice made from the old values: for
    tests and tools that change the environment after ke_fast was imported. Returns the new settings."""
    global _settings
    _settings = _read_settings()
    _CHOSEN.clear()
    _KERNELS.clear()
    backend.reload()
    return _settings


# ---- choosing the implementation: the one place ---------------------------------------------------

def legal_implementations(device_type: str, *, interpreting: bool | None = None, cpp: bool | None = None,
                          triton: bool | None = None) -> tuple[str, ...]:
    """The implementations that can run on tensors of ``device_type`` on this host (the first one is the
    default, except that the interpreter is never the CPU default).

    ``cuda``: triton, reference. ``cpu``: cpp (where the C++ kernels build), triton (only under the Triton
    interpreter), reference; never triton where Triton is not installed. ``interpreting`` / ``cpp`` / ``triton``
    override what the host says (tests); ``cpp=None`` builds the C++ kernels on first use to find out."""
    triton = backend.has_triton() if triton is None else triton
    if device_type == "cuda":
        return ("triton", "reference") if triton else ("reference",)
    if device_type != "cpu":
        return ("reference",)
    interpreting = triton and (backend.interpreting() if interpreting is None else interpreting)
    cpp = (backend.cpu_extension() is not None) if cpp is None else cpp
    return (("cpp",) if cpp else ()) + (("triton",) if interpreting else ()) + ("reference",)


def implementation(device_type: str) -> str:
    """The implementation that runs ke_fast ops on ``device_type`` tensors: the host's default
    (CUDA: Triton; CPU: the C++ kernels, the reference where they cannot be built) unless
    ``KE_FAST_BACKEND`` names another legal one. Decided once per device type and setting (see
    :func:`reload_settings`). Raises ValueError / RuntimeError naming the variable."""
    chosen = _CHOSEN.get(device_type)
    if chosen is not None:
        return chosen
    want = _settings.backend
    if want != "auto" and want not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV} must be one of auto, {', '.join(IMPLEMENTATIONS)}; got {want!r}")
    legal = legal_implementations(device_type)
    if want == "auto":  # Triton on CPU tensors (the interpreter) is a test vehicle, never the default
        chosen = legal[0] if device_type != "cpu" or legal[0] != "triton" else "reference"
    elif want in legal:
        chosen = want
    else:
        why = ""
        if want == "triton" and not backend.has_triton():
            why = ": Triton is not installed"
        elif want == "triton" and device_type == "cpu":
            why = ": Triton on CPU tensors needs TRITON_INTERPRET=1 set before ke_fast is imported"
        elif want == "cpp" and device_type == "cpu":
            why = f": the C++ CPU kernels could not be built ({backend.cpu_extension_error()})"
        elif want == "cpp":
            why = ": the C++ kernels run on CPU tensors only"
        raise RuntimeError(f"{ENV}={want} cannot run on {device_type} tensors on this host{why}; "
                           f"available: {', '.join(legal)}")
    _CHOSEN[device_type] = chosen
    return chosen


# per op, its implementations: a function, or "module.function" of a Triton launcher (imported when first chosen)
_IMPLS: dict[str, dict[str, Callable | str]] = {}


def _kernel(name: str, device_type: str) -> Callable:
    """The function the kernel of op ``name`` runs on ``device_type`` tensors (looked up once per setting)."""
    fn = _KERNELS.get((name, device_type))
    if fn is None:
        impls = _IMPLS[name]
        fn = impls.get(implementation(device_type), impls["reference"])  # cpp for an op without a C++ kernel
        if isinstance(fn, str):
            module, attr = fn.rsplit(".", 1)
            fn = getattr(importlib.import_module(f"{kernels.__name__}.{module}"), attr)
        _KERNELS[(name, device_type)] = fn
    return fn


def _outside_dynamo(fn: Callable) -> Callable:
    """``fn`` outside Dynamo's frame evaluation, as ``CustomOpDef.register_kernel`` wraps kernels, but without
    importing ``torch._dynamo`` (seconds) on the first call: before that import nothing can be tracing."""
    disabled: Callable | None = None

    def run(*args: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            dynamo = sys.modules.get("torch._dynamo")
            if dynamo is None or not hasattr(dynamo, "disable"):
                return fn(*args)
            disabled = dynamo.disable(fn)
        return disabled(*args)

    run.__name__ = fn.__name__
    return run


# Device kernels registered on the dispatcher directly (CustomOpDef.register_kernel's wrapper imports torch._dynamo);
# custom_op still provides the schema, the fake kernel, the autograd kernel and the version bumps of mutated args.
_IMPL_LIB = torch.library.Library("ke_fast", "IMPL")


def _define(name: str, schema: str, impls: dict[str, Callable | str], prepare: Callable,
            mutates: tuple[str, ...] = ()) -> torch.library.CustomOpDef:
    """Define ``ke_fast::<name>`` and register one kernel per device type: ``prepare(*args)`` validates
    and normalises the arguments (it raises before any work), then the chosen implementation runs."""

    def unsupported(*args, **kwargs):
        raise NotImplementedError(f"ke_fast::{name} has kernels for {' and '.join(DEVICE_TYPES)} tensors only")

    op = torch.library.custom_op(f"ke_fast::{name}", unsupported, mutates_args=mutates, schema=schema)
    OPS.append(name)
    _IMPLS[name] = impls
    for device_type in DEVICE_TYPES:
        def kernel(*args, _device_type=device_type):
            return _kernel(name, _device_type)(*prepare(*args))

        kernel.__name__ = f"{name}_{device_type}"
        _IMPL_LIB.impl(name, _outside_dynamo(kernel), device_type.upper())
    return op


# ---- masked weight -------------------------------------------------------------------------------

def _masked_prepare(weight, words, dtype=None):
    dtype = launch.check_args(weight, words, dtype)  # words on the weight's device included
    return weight.contiguous(), words.contiguous(), dtype


_masked_op = _define("masked_weight", "(Tensor weight, Tensor words, ScalarType? dtype=None) -> Tensor",
                     {"triton": "masked.apply_mask", "cpp": cpu.apply_mask, "reference": reference.apply_mask},
                     _masked_prepare)


@_masked_op.register_fake
def _(weight, words, dtype=None):
    dtype = launch.check_args(weight, words, dtype)
    return weight.new_empty(weight.shape, dtype=dtype)


def _masked_setup(ctx, inputs, output):
    weight, words, _ = inputs
    ctx.save_for_backward(words)
    ctx.weight_dtype = weight.dtype


def _masked_backward(ctx, grad):
    (words,) = ctx.saved_tensors
    return torch.ops.ke_fast.masked_weight.default(grad, words, ctx.weight_dtype), None, None


_masked_op.register_autograd(_masked_backward, setup_context=_masked_setup)


def masked_weight(weight: torch.Tensor, words: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``(weight * M).to(dtype)`` in one pass (M unpacked from the int32 ``words``, 1 = keep; ``dtype``
    defaults to the weight's); its gradient is ``grad * M`` in one pass. Any strides; the mask follows
    the weight's logical row-major order."""
    return torch.ops.ke_fast.masked_weight.default(weight, words, dtype)


def _masks_prepare(weights, words, table, tiles, dtype):
    launch.check_many(weights, words, dtype)
    check_one_device("masked_weights", [*listed("weights", weights), ("table", table), ("tiles", tiles)])
    if table.shape != (len(weights), launch.TABLE_COLUMNS) or table.dtype != torch.int64:
        raise ValueError(f"table must be int64 of shape ({len(weights)}, {launch.TABLE_COLUMNS}) (kernels.launch."
                         f"masks_table of the weights' sizes), got {table.dtype} of shape {tuple(table.shape)}")
    return weights, words, table, tiles, dtype


_masks_op = _define("masked_weights",
                    "(Tensor[] weights, Tensor[] words, Tensor table, Tensor tiles, ScalarType dtype) -> Tensor",
                    {"triton": "masked.apply_masks", "cpp": cpu.apply_masks, "reference": reference.apply_masks},
                    _masks_prepare)


@_masks_op.register_fake
def _(weights, words, table, tiles, dtype):
    launch.check_many(weights, words, dtype)
    return weights[0].new_empty(sum(w.numel() for w in weights), dtype=dtype)


def _masks_setup(ctx, inputs, output):
    weights, words, table, tiles, _ = inputs
    ctx.save_for_backward(table, tiles, *words)
    ctx.weight_dtype = weights[0].dtype
    ctx.shapes = [w.shape for w in weights]


def _masks_backward(ctx, grad):
    table, tiles, *words = ctx.saved_tensors
    numels = [s.numel() for s in ctx.shapes]
    flat = torch.ops.ke_fast.masked_weights.default(list(grad.contiguous().split(numels)), words, table, tiles,
                                                    ctx.weight_dtype)
    return [g.view(s) for g, s in zip(flat.split(numels), ctx.shapes)], [None] * len(words), None, None, None


_masks_op.register_autograd(_masks_backward, setup_context=_masks_setup)

def masked_weights(weights: Sequence[torch.Tensor], words: Sequence[torch.Tensor],
                   dtype: Optional[torch.dtype] = None, *, tables: dict | None = None) -> list[torch.Tensor]:
    """``[(w * M).to(dtype) for w in weights]`` in one ``ke_fast::masked_weights`` call: one kernel launch on a
    GPU for all the tensors (C++ / the reference run them one by one on a CPU). ``weights`` share one dtype
    and device; ``words[i]`` are the packed mask words of ``weights[i]``; ``dtype`` defaults to the weights'.
    The results are views of one flat tensor, in the weights' shapes (row-major). Differentiable: each
    weight's gradient is ``grad * M`` (in one launch for all).

    ``tables``: a dict the caller owns (e.g. its :class:`~ke_fast.nn.FitGroup`'s) that keeps the launch table of
    these sizes (and its per-layout copies, :func:`ke_fast.kernels.reinit.addressed`) for later calls: it lives as
    long as its owner, so a CUDA graph that captured the call keeps valid tables. None builds one for this call
    (a host-to-device copy). Building one while the current CUDA stream captures a graph raises RuntimeError:
    make the same call once before the capture."""
    if isinstance(weights, torch.Tensor) or isinstance(words, torch.Tensor):
        raise TypeError("weights and words must be lists of tensors")
    weights, words = list(weights), list(words)
    if not weights or len(weights) != len(words):
        raise ValueError(f"masked_weights needs one words tensor per weight, at least one: got {len(weights)} "
                         f"weights, {len(words)} words")
    dtype = weights[0].dtype if dtype is None else dtype
    kept = [i for i, w in enumerate(weights) if w.numel()]
    outs = [w.new_empty(w.shape, dtype=dtype) for w in weights]
    if kept:
        xs = [weights[i].contiguous() for i in kept]
        key = (xs[0].device, launch.block_size(), tuple(x.numel() for x in xs))
        table = None if tables is None else tables.get(key)
        if table is None:
            launch.refuse_in_capture(key[0], "ke_fast.ops.masked_weights: building the launch table of these sizes")
            table = launch.masks_table(key[2], key[0])
            if tables is not None:
                tables[key] = table
        flat = torch.ops.ke_fast.masked_weights.default(xs, [words[i].contiguous() for i in kept], *table, dtype)
        for i, part in zip(kept, flat.split(key[2])):
            outs[i] = part.view(weights[i].shape)
    return outs


# ---- WELS mask bits --------------------------------------------------------------------------------

def _wels_prepare(out, numel, seed, stream, threshold):
    if out.dtype != torch.int32 or out.dim() != 1 or out.numel() != format.num_words(numel) \
            or not out.is_contiguous():
        raise ValueError(f"out must be {format.num_words(numel)} contiguous int32 words for {numel} elements, "
                         f"got {out.dtype} of shape {tuple(out.shape)}")
    return out, numel, seed, stream, threshold


_wels_op = _define("wels_bits_", "(Tensor(a!) out, int numel, int seed, int stream, int threshold) -> ()",
                   {"triton": "bitmask.wels_bits_", "cpp": cpu.wels_bits_, "reference": reference.wels_bits_},
                   _wels_prepare, mutates=("out",))


@_wels_op.register_fake
def _(out, numel, seed, stream, threshold):
    return None


def wels_mask_bits(shape: Sequence[int] | torch.Size, split_rate: float, *, seed: int, stream: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """WELS mask words for a weight of ``shape``: each weight is fit with probability ``split_rate``.

    Drawn straight into bits from (seed, stream) by the counter RNG, so the same call gives the same
    bits on every device, implementation and rank. ``stream`` is any int in [0, 2^64) (see
    :func:`ke_fast.kernels.layer_stream`)."""
    numel, threshold = format.check_wels_args(shape, split_rate, seed, stream)
    out = torch.empty(format.num_words(numel), dtype=torch.int32, device=device)
    torch.ops.ke_fast.wels_bits_.default(out, numel, as_int64(seed), as_int64(stream), threshold)
    return out


# ---- the reset ---------------------------------------------------------------------------------------

def _reset_prepare(weights, words, table, tiles, seed, prefix, has_normal):
    if len(weights) != len(words) or table.shape != (len(weights), 8):
        raise ValueError(f"a reset table has one row per weight: {len(weights)} weights, {len(words)} words, "
                         f"table of shape {tuple(table.shape)}")
    check_one_device("reset_entries_", [*listed("weights", weights), *listed("words", words), ("table", table),
                                        ("tiles", tiles)])
    return weights, words, table, tiles, seed, prefix, has_normal


_reset_op = _define(
    "reset_entries_",
    "(Tensor(a!)[] weights, Tensor[] words, Tensor table, Tensor tiles, int seed, int prefix, bool has_normal) -> ()",
    {"triton": "reinit.reset_entries_", "cpp": cpu.reset_entries_, "reference": reference.reset_entries_},
    _reset_prepare, mutates=("weights",))


@_reset_op.register_fake
def _(weights, words, table, tiles, seed, prefix, has_normal):
    return None


# ---- sparse WELS layers ----------------------------------------------------------------------------

def _conv_prepare(x, bits, values, offsets, shape, bias, stride, padding, dilation, groups):
    compressed.check_conv_args(x, shape, groups)
    compressed.check_compressed(bits, values, offsets, shape, bias)
    check_one_device("sparse_conv2d", [("x", x), ("bits", bits), ("values", values), ("offsets", offsets),
                                       ("bias", bias)])
    return x, bits, values, offsets, shape, bias, stride, padding, dilation, groups


def _linear_prepare(x, bits, values, offsets, shape, bias):
    compressed.check_linear_args(x, shape)
    compressed.check_compressed(bits, values, offsets, shape, bias)
    check_one_device("sparse_linear", [("x", x), ("bits", bits), ("values", values), ("offsets", offsets),
                                       ("bias", bias)])
    return x, bits, values, offsets, shape, bias


_conv_op = _define("sparse_conv2d",
                   "(Tensor x, Tensor bits, Tensor values, Tensor offsets, int[] shape, Tensor? bias, int[] stride, "
                   "int[] padding, int[] dilation, int groups) -> Tensor",
                   {"triton": "sparse_conv.sparse_conv2d", "reference": reference.sparse_conv2d}, _conv_prepare)
_linear_op = _define("sparse_linear",
                     "(Tensor x, Tensor bits, Tensor values, Tensor offsets, int[] shape, Tensor? bias) -> Tensor",
                     {"triton": "sparse_conv.sparse_linear", "reference": reference.sparse_linear}, _linear_prepare)


@_conv_op.register_fake
def _(x, bits, values, offsets, shape, bias, stride, padding, dilation, groups):
    compressed.check_conv_args(x, shape, groups)
    out = x.new_empty(reference.conv_out_size(x.shape, shape, stride, padding, dilation))
    return out.contiguous(memory_format=torch.channels_last)


@_linear_op.register_fake
def _(x, bits, values, offsets, shape, bias):
    compressed.check_linear_args(x, shape)
    return x.new_empty((*x.shape[:-1], shape[0]))


# ---- the dispatcher's names, kept here as aliases for one release -------------------------------------
_DISPATCH_ALIASES = ("DECISIONS_FORMAT", "SPARSE_MAX_DENSITY", "SPARSE_MAX_ROWS", "clear_sparse_decisions", "conv_rows",
                     "load_sparse_decisions", "path_seconds", "save_sparse_decisions", "sparse_conv2d",
                     "sparse_decisions", "sparse_linear", "use_sparse")


def __getattr__(name: str) -> Any:
    """``ops.sparse_conv2d`` etc.: read from :mod:`ke_fast.dispatch`, ``ops.ReinitPlan`` from :mod:`ke_fast.reset`
    (both import this module: read on first use, not at import)."""
    if name in _DISPATCH_ALIASES:
        return getattr(importlib.import_module(f"{__package__}.dispatch"), name)
    if name == "ReinitPlan":
        return importlib.import_module(f"{__package__}.reset").ResetPlan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
