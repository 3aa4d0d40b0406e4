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
functions with one signature per op; nothing outside this file chooses between them.

``KE_FAST_BACKEND=auto|triton|cpp|reference`` (default ``auto``) is a debug override, read only by
:func:`implementation`. It offers only what is legal on the host: Triton on CPU tensors only under
``TRITON_INTERPRET=1`` (set before ke_fast is imported), the C++ kernels only on CPU tensors and only
where they could be built; ``cpp`` runs the reference for ops that have no C++ kernel.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional, Sequence

import torch

from . import kernels
from .kernels import backend, bitmask, cpu, masked, reference
from .kernels import reinit as _reinit
from .kernels.device import check_one_device, listed
from .kernels import sparse_conv as _sparse
from .kernels.rng import PURPOSE_INIT, PURPOSE_RESET, as_int64, check_seed, stream_prefix

ENV = "KE_FAST_BACKEND"
IMPLEMENTATIONS = ("triton", "cpp", "reference")
DEVICE_TYPES = ("cpu", "cuda")
OPS: list[str] = []  # every op of the ke_fast namespace, in definition order (filled by _define)


# ---- choosing the implementation: the one place ---------------------------------------------------

def legal_implementations(device_type: str, *, interpreting: bool | None = None,
                          cpp: bool | None = None) -> tuple[str, ...]:
    """The implementations that can run on tensors of ``device_type`` on this host (the first one is the
    default, except that the interpreter is never the CPU default).

    ``cuda``: triton, reference. ``cpu``: cpp (where the C++ kernels build), triton (only under the
    Triton interpreter), reference. ``interpreting`` / ``cpp`` override what the host says (for tests
    that reason about other hosts); ``cpp=None`` builds the C++ kernels on first use to find out."""
    if device_type == "cuda":
        return ("triton", "reference")
    if device_type != "cpu":
        return ("reference",)
    interpreting = backend.interpreting() if interpreting is None else interpreting
    cpp = (backend.cpu_extension() is not None) if cpp is None else cpp
    return (("cpp",) if cpp else ()) + (("triton",) if interpreting else ()) + ("reference",)


def implementation(device_type: str) -> str:
    """The implementation that runs ke_fast ops on ``device_type`` tensors: the host's default
    (CUDA: Triton; CPU: the C++ kernels, the reference where they cannot be built) unless
    ``KE_FAST_BACKEND`` names another legal one. Raises ValueError / RuntimeError naming the variable."""
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want != "auto" and want not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV} must be one of auto, {', '.join(IMPLEMENTATIONS)}; got {want!r}")
    legal = legal_implementations(device_type)
    if want == "auto":  # Triton on CPU tensors (the interpreter) is a test vehicle, never the default
        return legal[0] if device_type != "cpu" or legal[0] != "triton" else "reference"
    if want not in legal:
        why = ""
        if want == "triton" and device_type == "cpu":
            why = ": Triton on CPU tensors needs TRITON_INTERPRET=1 set before ke_fast is imported"
        elif want == "cpp" and device_type == "cpu":
            why = f": the C++ CPU kernels could not be built ({backend.cpu_extension_error()})"
        elif want == "cpp":
            why = ": the C++ kernels run on CPU tensors only"
        raise RuntimeError(f"{ENV}={want} cannot run on {device_type} tensors on this host{why}; "
                           f"available: {', '.join(legal)}")
    return want


def _pick(impls: dict[str, Callable], device_type: str) -> Callable:
    which = implementation(device_type)
    return impls.get(which, impls["reference"])  # cpp for an op without a C++ kernel: the reference


def _define(name: str, schema: str, impls: dict[str, Callable], prepare: Callable,
            mutates: tuple[str, ...] = ()) -> torch.library.CustomOpDef:
    """Define ``ke_fast::<name>`` and register one kernel per device type: ``prepare(*args)`` validates
    and normalises the arguments (it raises before any work), then the implementation runs."""

    def unsupported(*args, **kwargs):
        raise NotImplementedError(f"ke_fast::{name} has kernels for {' and '.join(DEVICE_TYPES)} tensors only")

    op = torch.library.custom_op(f"ke_fast::{name}", unsupported, mutates_args=mutates, schema=schema)
    OPS.append(name)
    for device_type in DEVICE_TYPES:
        def kernel(*args, _device_type=device_type):
            return _pick(impls, _device_type)(*prepare(*args))

        kernel.__name__ = f"{name}_{device_type}"
        op.register_kernel(device_type)(kernel)
    return op


# ---- masked weight -------------------------------------------------------------------------------

def _masked_prepare(weight, words, dtype=None):
    dtype = masked.check_args(weight, words, dtype)  # words on the weight's device included
    return weight.contiguous(), words.contiguous(), dtype


_masked_op = _define("masked_weight", "(Tensor weight, Tensor words, ScalarType? dtype=None) -> Tensor",
                     {"triton": masked.apply_mask, "cpp": cpu.apply_mask, "reference": reference.apply_mask},
                     _masked_prepare)


@_masked_op.register_fake
def _(weight, words, dtype=None):
    dtype = masked.check_args(weight, words, dtype)
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
    masked.check_many(weights, words, dtype)
    check_one_device("masked_weights", [*listed("weights", weights), ("table", table), ("tiles", tiles)])
    if table.shape != (len(weights), masked.TABLE_COLUMNS) or table.dtype != torch.int64:
        raise ValueError(f"table must be int64 of shape ({len(weights)}, {masked.TABLE_COLUMNS}) (kernels.masked."
                         f"masks_table of the weights' sizes), got {table.dtype} of shape {tuple(table.shape)}")
    return weights, words, table, tiles, dtype


_masks_op = _define("masked_weights",
                    "(Tensor[] weights, Tensor[] words, Tensor table, Tensor tiles, ScalarType dtype) -> Tensor",
                    {"triton": masked.apply_masks, "cpp": cpu.apply_masks, "reference": reference.apply_masks},
                    _masks_prepare)


@_masks_op.register_fake
def _(weights, words, table, tiles, dtype):
    masked.check_many(weights, words, dtype)
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

# (table, tiles) of the multi-tensor masked weight per (device, tile size, sizes): built and copied to the device
# once per set of layers (and then filled with their addresses once per address set, on the table itself)
_MASK_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_MAX_MASK_TABLES = 16


def masked_weights(weights: Sequence[torch.Tensor], words: Sequence[torch.Tensor],
                   dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
    """``[(w * M).to(dtype) for w in weights]`` in one ``ke_fast::masked_weights`` call: one kernel launch on a
    GPU for all the tensors (C++ / the reference run them one by one on a CPU). ``weights`` share one dtype
    and device; ``words[i]`` are the packed mask words of ``weights[i]``; ``dtype`` defaults to the weights'.
    The results are views of one flat tensor, in the weights' shapes (row-major). Differentiable: each
    weight's gradient is ``grad * M`` (in one launch for all)."""
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
        key = (xs[0].device, masked.block_size(), tuple(x.numel() for x in xs))
        tables = _MASK_TABLES.get(key)
        if tables is None:
            if len(_MASK_TABLES) >= _MAX_MASK_TABLES:
                _MASK_TABLES.pop(next(iter(_MASK_TABLES)))
            tables = _MASK_TABLES[key] = masked.masks_table(key[2], key[0])
        flat = torch.ops.ke_fast.masked_weights.default(xs, [words[i].contiguous() for i in kept], *tables, dtype)
        for i, part in zip(kept, flat.split(key[2])):
            outs[i] = part.view(weights[i].shape)
    return outs


# ---- WELS mask bits --------------------------------------------------------------------------------

def _wels_prepare(out, numel, seed, stream, threshold):
    if out.dtype != torch.int32 or out.dim() != 1 or out.numel() != bitmask.num_words(numel) \
            or not out.is_contiguous():
        raise ValueError(f"out must be {bitmask.num_words(numel)} contiguous int32 words for {numel} elements, "
                         f"got {out.dtype} of shape {tuple(out.shape)}")
    return out, numel, seed, stream, threshold


_wels_op = _define("wels_bits_", "(Tensor(a!) out, int numel, int seed, int stream, int threshold) -> ()",
                   {"triton": bitmask.wels_bits_, "cpp": cpu.wels_bits_, "reference": reference.wels_bits_},
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
    numel, threshold = bitmask.check_wels_args(shape, split_rate, seed, stream)
    out = torch.empty(bitmask.num_words(numel), dtype=torch.int32, device=device)
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
    {"triton": _reinit.reset_entries_, "cpp": cpu.reset_entries_, "reference": reference.reset_entries_},
    _reset_prepare, mutates=("weights",))


@_reset_op.register_fake
def _(weights, words, table, tiles, seed, prefix, has_normal):
    return None


class ReinitPlan:
    """Re-draw the reset entries (mask bit 0) of many tensors: validated and laid out once, then
    :meth:`run` per generation — one ``ke_fast::reset_entries_`` call (one kernel launch on a GPU) per
    dtype, with no per-layer host work. ``ke_fast.reinit_(model, g)`` keeps one plan per model.

    Args:
        weights: contiguous fp32/fp16/bf16/fp64 tensors on one device (conv/linear weights and biases).
        masks: one per weight: packed int32 words (``ceil(numel/32)``) or a bool/uint8/float 0-1 tensor
            of the weight's shape (e.g. the official KE code's float ``mask``). 1 = fit (kept). Dense masks
            are validated and packed once per mask tensor and version (a cache keyed weakly on the tensor),
            so building a plan every generation from the same masks (the one-shot use) skips that work;
            the launch tables are likewise cached per set of sizes.
        seed: the run's seed (Philox key), an int in [0, 2^64).
        init: reset scheme, one of ``kernels.SCHEMES``; default the official KE reset U(+-1/sqrt(fan_in)).
        fans: per weight ``(fan_in, fan_out)`` or None to derive it from the shape (required for 1-D
            tensors: biases take U(+-1/sqrt(fan_in)) of their layer).
        layer_ids: per weight the layer index of its stream (default: the position in the list). Values
            depend on (seed, purpose, generation, layer id, element index) only.
        fan_mode: ``fan_in`` or ``fan_out`` for the kaiming schemes.
    Raises TypeError / ValueError naming the argument before anything is written. The plan keeps
    references to ``weights``: rebuild it if their storage changes (e.g. after ``model.to(...)``).
    """

    def __init__(self, weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *, seed: int,
                 init: str = "kaiming_uniform_a_sqrt5", fans: Sequence[tuple[int, int] | None] | None = None,
                 layer_ids: Sequence[int] | None = None, fan_mode: str = "fan_in") -> None:
        self.seed = check_seed(seed)
        jobs = _reinit.prepare(weights, masks, init, fans, layer_ids, fan_mode)
        self.weights = list(weights)
        self._launches = [_reinit.launch_table(group) for group in _reinit.dtype_groups(jobs)]

    def run(self, generation: int, purpose: str = "reset") -> None:
        """Re-draw the reset entries for ``generation`` (``purpose="init"``: the generation-0 values)."""
        _reinit.check_generation(generation, purpose)
        prefix = as_int64(stream_prefix(PURPOSE_RESET if purpose == "reset" else PURPOSE_INIT, generation))
        for weights, words, table, tiles, has_normal in self._launches:
            torch.ops.ke_fast.reset_entries_.default(weights, words, table, tiles, as_int64(self.seed), prefix,
                                                     has_normal)


# ---- sparse WELS layers ----------------------------------------------------------------------------

def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def _conv_prepare(x, bits, values, offsets, shape, bias, stride, padding, dilation, groups):
    _sparse.check_conv_args(x, shape, groups)
    _sparse.check_compressed(bits, values, offsets, shape, bias)
    check_one_device("sparse_conv2d", [("x", x), ("bits", bits), ("values", values), ("offsets", offsets),
                                       ("bias", bias)])
    return x, bits, values, offsets, shape, bias, stride, padding, dilation, groups


def _linear_prepare(x, bits, values, offsets, shape, bias):
    _sparse.check_linear_args(x, shape)
    _sparse.check_compressed(bits, values, offsets, shape, bias)
    check_one_device("sparse_linear", [("x", x), ("bits", bits), ("values", values), ("offsets", offsets),
                                       ("bias", bias)])
    return x, bits, values, offsets, shape, bias


_conv_op = _define("sparse_conv2d",
                   "(Tensor x, Tensor bits, Tensor values, Tensor offsets, int[] shape, Tensor? bias, int[] stride, "
                   "int[] padding, int[] dilation, int groups) -> Tensor",
                   {"triton": _sparse.sparse_conv2d, "reference": reference.sparse_conv2d}, _conv_prepare)
_linear_op = _define("sparse_linear",
                     "(Tensor x, Tensor bits, Tensor values, Tensor offsets, int[] shape, Tensor? bias) -> Tensor",
                     {"triton": _sparse.sparse_linear, "reference": reference.sparse_linear}, _linear_prepare)


@_conv_op.register_fake
def _(x, bits, values, offsets, shape, bias, stride, padding, dilation, groups):
    _sparse.check_conv_args(x, shape, groups)
    out = x.new_empty(_sparse.conv_out_size(x.shape, shape, stride, padding, dilation))
    return out.contiguous(memory_format=torch.channels_last)


@_linear_op.register_fake
def _(x, bits, values, offsets, shape, bias):
    _sparse.check_linear_args(x, shape)
    return x.new_empty((*x.shape[:-1], shape[0]))


# ---- the dispatcher: sparse (Triton, compressed weight) or dense (W*M + cuDNN/cuBLAS) ------------------
# Decided per (layer signature, input shape, dtype, device) by timing both paths on first use (where Triton runs),
# as Triton's autotuner does, and cached (ops.sparse_decisions / clear_ / save_ / load_sparse_decisions).
# While torch.compile traces or a CUDA graph captures, nothing is timed: a cached decision, else the static
# rule below. KE_FAST_SPARSE=auto|on|off overrides everything.
SPARSE_MAX_ROWS = 64  # static rule (tracing without a cached decision): a roofline argument, not a measurement
SPARSE_MAX_DENSITY = 0.7
DECISIONS_FORMAT = 1
_DECISIONS: dict[tuple, bool] = {}  # _decision_key(...) -> True (sparse) / False (dense)


def use_sparse(rows: int, density: float, device: torch.device, measure: Callable[[], bool] | None = None) -> bool:
    """Whether a sparse layer with ``rows`` GEMM rows and this density runs the Triton sparse kernel.

    ``KE_FAST_SPARSE=off`` or an implementation other than Triton: never; ``on``: always; ``auto`` (the
    default): ``measure()`` when given (the dispatcher's cached or timed decision), else the static rule
    ``rows <= SPARSE_MAX_ROWS and density <= SPARSE_MAX_DENSITY``."""
    want = os.environ.get("KE_FAST_SPARSE", "auto").lower()
    if want not in ("auto", "on", "off"):
        raise ValueError(f"KE_FAST_SPARSE must be auto, on or off, got {want!r}")
    if want == "off" or implementation(device.type) != "triton":
        return False
    if want == "on":
        return True
    return measure() if measure is not None else (rows <= SPARSE_MAX_ROWS and density <= SPARSE_MAX_DENSITY)


def _tracing() -> bool:
    """torch.compile is tracing or the current CUDA stream is capturing a graph: no timing, no sync."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def path_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds per call of ``fn`` after one warm-up call (which compiles a kernel on first use): Triton's
    ``do_bench`` on CUDA (L2 flushed, a few ms of repetitions), the median of 5 calls elsewhere."""
    fn()
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=20) / 1e3
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[2]


DecisionKey = tuple  # (op, weight shape, kept count, geometry, x shape, dtype, device, keeps W*M)


def _decision_key(op: str, cw: kernels.sparse_conv.Compressed, x: torch.Tensor, keeps_dense: bool,
                  geometry: tuple[int, ...] = ()) -> DecisionKey:
    return (op, tuple(cw.shape), cw.values.numel(), geometry, tuple(x.shape), x.dtype, x.device, keeps_dense)


def _key_str(key: DecisionKey) -> str:
    op, shape, nnz, geometry, x_shape, dtype, device, keeps = key
    return (f"{op}|w{'x'.join(map(str, shape))}|nnz{nnz}|g{','.join(map(str, geometry))}|x{'x'.join(map(str, x_shape))}"
            f"|{str(dtype).replace('torch.', '')}|{device}|{'kept' if keeps else 'decompress'}")


def _key_from_str(text: str) -> DecisionKey:
    """Inverse of :func:`_key_str`; raises ValueError for anything else."""
    parts = text.split("|")
    ints = lambda v, sep: tuple(int(i) for i in v.split(sep) if i)  # noqa: E731
    try:
        if len(parts) != 8 or not isinstance(getattr(torch, parts[5], None), torch.dtype) \
                or parts[7] not in ("kept", "decompress") or parts[0] not in ("conv2d", "linear"):
            raise ValueError(text)
        return (parts[0], ints(parts[1][1:], "x"), int(parts[2][3:]), ints(parts[3][1:], ","),
                ints(parts[4][1:], "x"), getattr(torch, parts[5]), torch.device(parts[6]), parts[7] == "kept")
    except (ValueError, RuntimeError):
        raise ValueError(f"not a sparse decision key: {text!r}") from None


def _decide(op: str, cw: kernels.sparse_conv.Compressed, x: torch.Tensor, dense: torch.Tensor | None,
            geometry: tuple[int, ...], rows: int, density: float, run_sparse: Callable[[], object],
            run_dense: Callable[[], object]) -> Callable[[], bool]:
    """The dispatcher's ``measure`` for :func:`use_sparse` (called only where the Triton implementation runs):
    the cached decision for this call's key; else, outside tracing and capture, time both paths and cache the
    faster; while tracing, the static rule (not cached)."""

    def measure() -> bool:
        key = _decision_key(op, cw, x, dense is not None, geometry)
        hit = _DECISIONS.get(key)
        if hit is not None:
            return hit
        if _tracing():
            return rows <= SPARSE_MAX_ROWS and density <= SPARSE_MAX_DENSITY
        with torch.no_grad():
            sparse = path_seconds(run_sparse, x.device) < path_seconds(run_dense, x.device)
        _DECISIONS[key] = sparse
        return sparse

    return measure


def sparse_decisions() -> dict[str, str]:
    """The dispatcher's cached decisions: key -> ``"sparse"`` or ``"dense"``. A key names the op, the weight
    shape and kept count, the conv geometry, the input shape, dtype and device, the implementation and
    whether the layer keeps its W*M (``kept``) or decompresses per call (decisions are made only where the
    Triton implementation runs)."""
    return {_key_str(k): "sparse" if v else "dense" for k, v in _DECISIONS.items()}


def clear_sparse_decisions() -> None:
    """Forget every cached decision: the next call of each layer times both paths again."""
    _DECISIONS.clear()


def _device_names() -> dict[str, str]:
    names = {"cpu": "cpu"}
    if torch.cuda.is_available():
        names.update({f"cuda:{i}": torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return names


def save_sparse_decisions(path: str | os.PathLike) -> None:
    """Write the cached decisions to a JSON file (e.g. next to the model's checkpoint), with the name of
    each device they were measured on."""
    names = _device_names()
    used = {str(k[6]) for k in _DECISIONS}
    doc = {"format": DECISIONS_FORMAT, "devices": {d: names.get(d, d) for d in sorted(used)},
           "decisions": sparse_decisions()}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)


def load_sparse_decisions(path: str | os.PathLike) -> int:
    """Add the decisions of a file written by :func:`save_sparse_decisions` to the cache; those measured on
    a device whose name differs from this host's device of the same index are skipped (another GPU may
    decide otherwise). Returns how many were loaded. Raises ValueError for a file of another format."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("format") != DECISIONS_FORMAT or not isinstance(doc.get("decisions"), dict):
        raise ValueError(f"{path}: not a ke_fast sparse decisions file of format {DECISIONS_FORMAT}")
    names, saved = _device_names(), doc.get("devices", {})
    loaded = 0
    decisions = {}
    for text, choice in doc["decisions"].items():
        try:
            key = _key_from_str(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if choice not in ("sparse", "dense"):
            raise ValueError(f"{path}: decision for {text!r} must be 'sparse' or 'dense', got {choice!r}")
        decisions[key] = choice == "sparse"
    for key, sparse in decisions.items():  # all checked first: a bad file adds nothing
        device = str(key[6])
        if names.get(device) is not None and names[device] == saved.get(device):
            _DECISIONS[key] = sparse
            loaded += 1
    return loaded


def conv_rows(x: torch.Tensor, cw: kernels.sparse_conv.Compressed, stride: int | Sequence[int],
              padding: int | Sequence[int], dilation: int | Sequence[int]) -> int:
    """GEMM rows (batch x output pixels) of a conv2d of ``x`` with a compressed weight."""
    size = _sparse.conv_out_size(x.shape, cw.shape, _pair(stride), _pair(padding), _pair(dilation))
    return size[0] * size[2] * size[3]


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)  # no .to() call on the hot path when it is a no-op


def _dense_of(cw: kernels.sparse_conv.Compressed, dense: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return _as(dense if dense is not None else _sparse.decompress(cw), dtype)


def sparse_conv2d(x: torch.Tensor, cw: kernels.sparse_conv.Compressed, bias: torch.Tensor | None = None,
                  stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                  dilation: int | Sequence[int] = 1, groups: int = 1, dense: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """conv2d with a compressed weight, on the sparse kernel or densely as the dispatcher decides (see
    :func:`use_sparse`; in ``auto`` mode timed on the first call of each shape, then cached). ``dense`` is
    the layer's kept W*M for the dense path (None: decompress on every dense call)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    _sparse.check_conv_args(x, cw.shape, groups)

    def run_sparse():
        return torch.ops.ke_fast.sparse_conv2d.default(x, cw.bits, cw.values, cw.offsets, list(cw.shape), bias,
                                                       stride, padding, dilation, groups)

    def run_dense():
        return torch.nn.functional.conv2d(x, _dense_of(cw, dense, x.dtype), _as(bias, x.dtype), stride, padding,
                                          dilation, groups)

    rows, density = conv_rows(x, cw, stride, padding, dilation), _sparse.density_of(cw)
    measure = _decide("conv2d", cw, x, dense, (*stride, *padding, *dilation, groups), rows, density, run_sparse,
                      run_dense)
    sparse = use_sparse(rows, density, x.device, measure)
    return run_sparse() if sparse else run_dense()


def sparse_linear(x: torch.Tensor, cw: kernels.sparse_conv.Compressed, bias: torch.Tensor | None = None,
                  dense: torch.Tensor | None = None) -> torch.Tensor:
    """linear with a compressed weight, sparse or dense as the dispatcher decides (see :func:`sparse_conv2d`)."""
    _sparse.check_linear_args(x, cw.shape)

    def run_sparse():
        return torch.ops.ke_fast.sparse_linear.default(x, cw.bits, cw.values, cw.offsets, list(cw.shape), bias)

    def run_dense():
        return torch.nn.functional.linear(x, _dense_of(cw, dense, x.dtype), _as(bias, x.dtype))

    rows, density = x.numel() // max(1, x.shape[-1]), _sparse.density_of(cw)
    sparse = use_sparse(rows, density, x.device, _decide("linear", cw, x, dense, (), rows, density, run_sparse,
                                                         run_dense))
    return run_sparse() if sparse else run_dense()
