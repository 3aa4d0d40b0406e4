"""The fit hypothesis on its own: a KELS slim network (plain PyTorch, fewer channels) and a WELS sparse
network (conv/linear weights in the compressed bit-mask format, run by the Triton sparse kernels).

Both outputs equal the fit-only forward of the split dense model (``ke_fast.fit_only``) in eval mode.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from . import dispatch
from . import kernels as K
from . import graph as G
from .convert import revert
from .masks import masked_layers
from .nn import MASKED_OF, MaskedLayer


# ---- KELS: slim network --------------------------------------------------------------------------

def extract_slim(model: nn.Module, *, example_input: Any = None) -> nn.Module:
    """A physically smaller plain-PyTorch copy of a split model holding only the kept channels.

    Kept output channels of a layer are the filters with any fit weight; kept inputs follow the graph
    (:func:`ke_fast.graph.read`: through BatchNorm, activations, pooling, residual adds, channel
    concatenations and channel-major flattens), so the slim network computes exactly what the fit hypothesis
    computes. ``example_input`` (an input batch) is needed only for models torch.fx cannot trace: their
    graph is read from one forward on it. Raises ValueError for WELS-split models (their fit hypothesis is
    sparse, not slim: use :func:`extract_sparse`), when masks are not channel-consistent (a layer whose fit
    weights read a channel its producer drops), for layers of a subclass with a forward of its own (e.g.
    weight standardisation over a filter's kept inputs would differ), named, and for models no graph
    reader can read.
    """
    layers = dict(masked_layers(model))
    if not layers:
        raise ValueError("model has no masked layer: call ke_fast.split(model) first")
    wels = [n for n, m in layers.items() if m.split_mode == "wels"]
    if wels:
        raise ValueError(f"extract_slim needs KELS masks; layer {wels[0]!r} is WELS-split, whose fit hypothesis is "
                         f"sparse: use ke_fast.extract_sparse")
    _check_torch_forward(layers.items(), "extract_slim")
    try:
        g = G.read(model, example_input)
    except ValueError as exc:
        raise ValueError(f"extract_slim: {exc}") from exc
    kept: dict[fx.Node, torch.Tensor | None] = {}  # kept channel indices of each node's output (None = all)
    plan: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}  # module -> (kept in, kept out)

    def merge(name: str, k_in: torch.Tensor | None, k_out: torch.Tensor | None) -> None:
        if name in plan:  # a module called twice must see the same channels
            old_in, old_out = plan[name]
            if not (_same(old_in, k_in) and _same(old_out, k_out)):
                raise ValueError(f"module {name!r} is used twice with different kept channels")
        plan[name] = (k_in, k_out)

    node_device = next(iter(layers.values())).fit_mask.device
    for node in g.graph.nodes:
        ins = G.data_inputs(node)
        first = kept.get(ins[0]) if ins else None
        if node.op == "call_module" and node.target in layers:
            m = layers[node.target]
            dense = K.unpack_mask(m.fit_mask, m.weight.shape).reshape(m.weight.shape[0], m.weight.shape[1], -1)
            k_out = dense.any(dim=(1, 2)).nonzero().flatten()
            cols = dense.any(dim=(0, 2)).nonzero().flatten()
            depthwise = isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1
            if depthwise:
                k_in = k_out if first is None or _same(first, k_out) else None
                if k_in is None:
                    raise ValueError(f"depthwise layer {node.target!r}: kept filters differ from kept inputs")
            elif first is not None:
                k_in = _kept_inputs(g, node, ins[0], first, _n_channels(m))
                if not bool(torch.isin(cols, k_in).all()):
                    raise ValueError(f"layer {node.target!r}: fit weights read channels its input does not keep; "
                                     f"masks are not channel-consistent (KELS masks are)")
            else:
                k_in = None
            merge(node.target, k_in, k_out)
            kept[node] = k_out
        elif node.op == "call_module" and isinstance(g.modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            merge(node.target, None, first)
            kept[node] = first
        elif G.is_cat(node):
            parts, offset = [], 0
            for part in node.args[0]:
                k = kept.get(part)
                c = g.channels(part)
                parts.append(torch.arange(c, device=node_device) + offset if k is None else k + offset)
                offset += c
            kept[node] = torch.cat(parts)
        elif node.op in ("call_function", "call_method", "call_module") and len(ins) > 1:
            ks = [kept.get(a) for a in ins]
            known = [k for k in ks if k is not None]
            if known and not all(_same(known[0], k) for k in known):
                raise ValueError(f"{node.name!r} combines tensors with different kept channels")
            kept[node] = known[0] if known else None
        elif node.op == "call_module" and not isinstance(g.modules.get(node.target), G.PASS_MODULES) \
                and any(True for _ in g.modules[node.target].parameters()):
            raise ValueError(f"extract_slim cannot slim through module {node.target!r} "
                             f"({type(g.modules[node.target]).__name__}); split it or leave it out of the model")
        else:
            kept[node] = _carry(node, ins[0], first) if first is not None else first
    slim = copy.deepcopy(model)
    masked_copy = {n: m for n, m in slim.named_modules() if isinstance(m, MaskedLayer)}
    with torch.no_grad():
        for name, m in masked_copy.items():
            w, b = m.weight * K.unpack_mask(m.fit_mask, m.weight.shape), m.bias
            if b is not None:
                b = b * K.unpack_mask(m.bias_mask, b.shape)
            k_in, k_out = plan.get(name, (None, None))
            _slim_layer(m, w, b, k_in, k_out)
    revert(slim)
    bns = {n: m for n, m in slim.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    with torch.no_grad():
        for name, (_, k) in plan.items():
            if name in bns and k is not None:
                _slim_bn(bns[name], k)
    return slim


def _check_torch_forward(layers: Iterable[tuple[str, nn.Module]], what: str) -> None:
    """Refuse layers of a subclass with a forward of its own (e.g. weight standardisation, padding computed
    from the input): a slim or sparse layer computes the torch op, which is not what that forward computes."""
    for name, m in layers:
        cls = m._ke_wraps
        if cls is None:
            continue
        base = next(b for b in MASKED_OF if issubclass(cls, b))
        own = [f for f in ("forward", "_conv_forward") if getattr(cls, f, None) is not getattr(base, f, None)]
        if own:
            raise ValueError(f"{what}: layer {name!r} is a {cls.__qualname__}, whose own {own[0]} the extracted "
                             f"layer cannot reproduce (it computes the plain {base.__name__} op); evaluate it with "
                             f"ke_fast.fit_only instead")


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _n_channels(m: nn.Module) -> int:
    return m.in_channels if hasattr(m, "in_channels") else m.in_features


def _carry(node: fx.Node, src: fx.Node, kept: torch.Tensor) -> torch.Tensor:
    """The kept channels of ``src`` as indices into dim 1 of ``node`` (one input, channels preserved or
    flattened channel-major, as the graph reader's shapes tell; unknown shapes: preserved)."""
    a, b = G.shape_of(src), G.shape_of(node)
    if a is None or b is None or len(a) < 2 or len(b) < 2 or a[1] == b[1]:
        return kept
    per = math.prod(a[2:])
    if b[1] != a[1] * per:
        raise ValueError(f"extract_slim cannot follow kept channels through {node.name!r} ({tuple(a)} -> {tuple(b)})")
    return _expand(kept, per)


def _expand(kept: torch.Tensor, per: int) -> torch.Tensor:
    """Feature indices of the kept channels after a channel-major flatten of ``per`` values per channel."""
    return (kept[:, None] * per + torch.arange(per, device=kept.device)).flatten()


def _kept_inputs(g: G.ModelGraph, node: fx.Node, src: fx.Node, kept: torch.Tensor, features: int) -> torch.Tensor:
    """The inputs of layer ``node`` that read the ``kept`` channels of ``src``. A layer reading more features
    than ``src`` has channels reads a channel-major flatten of it (e.g. VGG's classifier on 512 x 7 x 7): each
    kept channel stands for that many consecutive features."""
    try:
        c = g.channels(src)
    except ValueError:
        c = None
    if c is None or features == c or features % c:
        if c is not None and features != c:
            raise ValueError(f"layer {node.target!r} reads {features} features from {c} channels: extract_slim cannot "
                             f"map its inputs to the kept channels")
        return kept
    return _expand(kept, features // c)


def _slim_layer(m: nn.Module, w: torch.Tensor, b: torch.Tensor | None, k_in: torch.Tensor | None,
                k_out: torch.Tensor | None) -> None:
    depthwise = isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1
    if k_out is not None:
        w = w[k_out.to(w.device)]
        b = None if b is None else b[k_out.to(w.device)]
    if k_in is not None and not depthwise:
        w = w[:, k_in.to(w.device)]
    m.weight = nn.Parameter(w.contiguous())
    if b is not None:
        m.bias = nn.Parameter(b.contiguous())
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape[0], w.shape[1]
    else:
        m.out_channels = w.shape[0]
        m.in_channels = w.shape[0] if depthwise else w.shape[1] * m.groups
        if depthwise:
            m.groups = w.shape[0]


def _slim_bn(bn: nn.modules.batchnorm._BatchNorm, k: torch.Tensor) -> None:
    k = k.to(bn.running_mean.device if bn.running_mean is not None else k.device)
    if bn.affine:
        bn.weight = nn.Parameter(bn.weight[k].contiguous())
        bn.bias = nn.Parameter(bn.bias[k].contiguous())
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[k].contiguous()
        bn.running_var = bn.running_var[k].contiguous()
    bn.num_features = len(k)


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-adds of the conv/linear layers for one forward of ``example_input``."""
    total = 0

    def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * mod.weight[0].numel()  # each output element: C_in/groups * k * k MACs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total


def slim_report(dense: nn.Module, slim: nn.Module, example_input: Any) -> dict[str, float]:
    """Parameters and multiply-adds of the dense and the slim network, and their ratios."""
    pd, ps = count_params(dense), count_params(slim)
    md, ms = count_macs(dense, example_input), count_macs(slim, example_input)
    return dict(dense_params=pd, slim_params=ps, param_ratio=ps / pd, dense_macs=md, slim_macs=ms, mac_ratio=ms / md)


# ---- WELS: sparse network ------------------------------------------------------------------------

class _SparseLayer(nn.Module):
    """A conv/linear layer whose weight is held in the compressed WELS format (buffers ``bits``,
    ``values``, ``offsets``) with an optional ``bias`` buffer. Inference only (no weight gradient).

    ``keep_dense`` (default True): the layer also keeps W*M decompressed once (buffer ``dense``, not saved in
    the state_dict, rebuilt after a load) for the dispatcher's dense path; False saves that memory (dense
    weight bytes per layer) and decompresses on every dense call instead. After editing the compressed
    buffers in place, call :meth:`refresh_dense`."""

    def __init__(self, cw: K.compressed.Compressed, bias: torch.Tensor | None, keep_dense: bool = True) -> None:
        super().__init__()
        self.weight_shape = tuple(cw.shape)
        self.register_buffer("bits", cw.bits)
        self.register_buffer("values", cw.values)
        self.register_buffer("offsets", cw.offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("dense", None, persistent=False)
        self.keep_dense = keep_dense
        self.refresh_dense()

    @property
    def compressed(self) -> K.compressed.Compressed:
        return K.compressed.Compressed(self.weight_shape, self.bits, self.values, self.offsets)

    def refresh_dense(self) -> None:
        """Rebuild the kept W*M from the compressed buffers (or drop it when ``keep_dense`` is False)."""
        self.dense = K.compressed.decompress(self.compressed) if self.keep_dense else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the number of kept values differs between layers and checkpoints: adopt the stored sizes,
        # but only after checking that bits, values and offsets agree with each other and the shape
        keys = [prefix + k for k in ("bits", "values", "offsets")]
        if all(k in state_dict for k in keys):
            try:
                K.compressed.Compressed(self.weight_shape, *(state_dict[k] for k in keys)).validate()
            except ValueError as exc:
                error_msgs.append(f"{prefix[:-1] or 'layer'}: corrupt or mismatched compressed weight: {exc}")
                return
            for k in ("bits", "values", "offsets"):
                setattr(self, k, torch.empty_like(state_dict[prefix + k], device=self.bits.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.refresh_dense()

    def extra_repr(self) -> str:
        n, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        return (f"weight_shape={self.weight_shape}, density={self.values.numel() / max(1, n * k):.3f}, "
                f"bytes={self.compressed.nbytes()}")


class SparseConv2d(_SparseLayer):
    """conv2d with a compressed weight: the Triton sparse kernel where the dispatcher measured it faster,
    otherwise cuDNN on the kept W*M (and always that on CPU). See :class:`_SparseLayer` for ``keep_dense``."""

    def __init__(self, cw: K.compressed.Compressed, bias: torch.Tensor | None, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], groups: int, keep_dense: bool = True) -> None:
        super().__init__(cw, bias, keep_dense)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.sparse_conv2d(x, self.compressed, self.bias, self.stride, self.padding, self.dilation,
                                      self.groups, dense=self.dense)


class SparseLinear(_SparseLayer):
    """linear with a compressed weight (see :class:`SparseConv2d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.sparse_linear(x, self.compressed, self.bias, dense=self.dense)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding_mode != "zeros":
        raise ValueError(f"extract_sparse supports padding_mode='zeros' only, got {m.padding_mode!r}")
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        if any((d * (k - 1)) % 2 for d, k in zip(m.dilation, m.kernel_size)):
            raise ValueError("padding='same' with an even effective kernel is not supported by extract_sparse")
        return tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size))  # type: ignore[return-value]
    return tuple(m.padding)  # type: ignore[return-value]


def extract_sparse(model: nn.Module, *, keep_dense: bool = True) -> nn.Module:
    """A copy of a split model whose conv2d / linear layers hold only their fit weights, compressed
    (bit mask + packed values + chunk offsets; ~58 % of dense bf16 at split rate 0.5).

    Its output equals the fit-only forward of ``model``; it saves and loads with state_dict (sizes
    are taken from the checkpoint after validation) and runs the Triton sparse kernels on CUDA. Raises
    ValueError, naming the layer, for layers it cannot reproduce: Conv1d, grouped convs, padding modes
    other than zeros, and subclasses with a forward of their own (the sparse layer computes the torch op).

    ``keep_dense`` (default True) makes each layer keep its W*M, decompressed once here, for the
    dispatcher's dense path (cuDNN / cuBLAS, and every layer on CPU): the model then holds the dense weights
    too. False keeps only the compressed format and decompresses on every dense call (slower, smaller).
    The dispatcher (``ke_fast.dispatch.sparse_conv2d``) times both paths on each layer's first call per input
    shape; run one eager forward before ``torch.compile`` or CUDA-graph capture so they reuse those
    decisions (see ``dispatch.save_sparse_decisions`` to keep them next to the model)."""
    layers = masked_layers(model)
    if not layers:
        raise ValueError("model has no masked layer: call ke_fast.split(model) first")
    _check_torch_forward(layers, "extract_sparse")
    for name, m in layers:
        if isinstance(m, nn.Conv1d):
            raise ValueError(f"layer {name!r}: extract_sparse supports Conv2d and Linear layers, not Conv1d")
        if isinstance(m, nn.Conv2d):
            _conv_padding(m)
            if m.groups not in (1, m.in_channels) or (m.groups > 1 and m.out_channels != m.groups):
                raise ValueError(f"layer {name!r}: sparse conv supports groups=1 and depthwise, not groups={m.groups}")
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in masked_layers(sparse):
            fit = K.unpack_mask(m.fit_mask, m.weight.shape)
            cw = K.compressed.compress(m.weight.detach(), fit)
            bias = None if m.bias is None else m.bias.detach() * K.unpack_mask(m.bias_mask, m.bias.shape)
            if isinstance(m, nn.Conv2d):
                new: nn.Module = SparseConv2d(cw, bias, tuple(m.stride), _conv_padding(m), tuple(m.dilation), m.groups,
                                              keep_dense)
            else:
                new = SparseLinear(cw, bias, keep_dense)
            new.train(m.training)
            parent, _, leaf = name.rpartition(".")
            setattr(sparse.get_submodule(parent) if parent else sparse, leaf, new)
    sparse.register_load_state_dict_pre_hook(_check_sparse_state)
    return sparse


def _check_sparse_state(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Validate every compressed layer of a state_dict before anything is copied: a corrupt checkpoint
    is refused whole and leaves the model as it was."""
    for name, m in module.named_modules():
        if not isinstance(m, _SparseLayer):
            continue
        p = f"{prefix}{name}." if name else prefix
        keys = [p + k for k in ("bits", "values", "offsets")]
        if all(k in state_dict for k in keys):
            try:
                K.compressed.Compressed(m.weight_shape, *(state_dict[k] for k in keys)).validate()
            except ValueError as exc:
                raise RuntimeError(f"Error(s) in loading state_dict: {name or 'layer'}: corrupt or mismatched "
                                   f"compressed weight: {exc}") from exc
