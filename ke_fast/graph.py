"""Reading a model: which layers read its input and produce its output, where concatenations and residual
adds join channels, how many channels flow along each edge, in what order layers run.

Two readers give the same kind of graph, a ``torch.fx.Graph`` whose ``call_module`` nodes are the leaf
modules (conv / linear layers and their subclasses, masked layers, and modules whose forward is torch.nn's
own, e.g. BatchNorm or a subclass of it that changes only ``__init__``):

* ``"fx"``: symbolic tracing (and shapes when an example input is given): every branch of the code;
* ``"record"``: the model runs once on an example input (eval mode, no grad) under a ``TorchFunctionMode``
  that notes every torch function applied to a tensor the forward computed, while forward hooks note what
  each leaf module read and wrote. It reads models torch.fx cannot trace (data-dependent control flow, as in
  the official KE ``Split_densenet121``).

Everything that needs the graph (KELS roles in ``split``, ``extract_slim``, ``reset_bn_``) reads it here.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

METHODS = ("auto", "fx", "record")
PLAIN_RULE = "the plain KELS rule (first ceil(s*C_in) input channels of the first ceil(s*C_out) filters)"

# modules that carry channel i of their input to channel i of their output
PASS_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Dropout, nn.Identity,
                nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.GroupNorm, nn.Flatten,
                nn.modules.batchnorm._BatchNorm, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                nn.Sigmoid, nn.Tanh, nn.Mish, nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.AvgPool1d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
_CAT = frozenset({"cat", "concat", "concatenate"})
# function / method names (in-place "_" and dunders stripped) that keep channel i in channel i when they
# read one tensor the forward computed (constants and scalars aside)
_KEEP = frozenset({
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu",
    "selu", "celu", "mish", "softplus", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "clone", "contiguous", "detach", "to", "float", "half", "bfloat16", "double", "type",
    "type_as", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "pow", "clamp", "clip", "clamp_min",
    "clamp_max", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool2d", "interpolate", "upsample", "pad", "batch_norm", "instance_norm", "group_norm",
    "layer_norm", "add", "sub", "mul", "div", "true_divide", "truediv", "floordiv", "floor_divide", "rsub", "radd",
    "rmul", "rtruediv", "iadd", "isub", "imul", "itruediv", "where", "masked_fill"})
_REDUCE = frozenset({"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod"})
_RESHAPE = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"})
_VALUES = frozenset({"size", "dim", "numel", "getattr"})  # nodes that produce Python values, not tensors


class _Meta(NamedTuple):
    """What the recorder keeps of a tensor (fx's ShapeProp keeps more; both have ``.shape``)."""
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class Role:
    """A layer's KELS role."""
    first: bool = False  # reads the network input: keeps all input channels
    last: bool = False  # produces the output: keeps all outputs
    segments: list[int] | None = None  # its input is a channel concatenation of these sizes

    def describe(self) -> str:
        """The KELS role in words, for error messages."""
        parts = (["reads the model input"] if self.first else []) + (["produces the output"] if self.last else [])
        if self.segments is not None:
            parts.append(f"reads a concatenation of {self.segments} channels")
        return ", ".join(parts) or "hidden layer"


# ---- what a module / node is ------------------------------------------------------------------------

def is_leaf(m: nn.Module) -> bool:
    """A module the graph keeps as one node: conv / linear (subclasses and masked layers included) and any
    module whose forward is torch.nn's own (not a container)."""
    if isinstance(m, _ConvNd | nn.Linear):
        return True
    for cls in type(m).__mro__:
        if "forward" in cls.__dict__:
            return cls.__module__.startswith(("torch.nn", "torch.ao.nn")) and cls not in (nn.Module, nn.Sequential)
    return False


def mixes_channels(m: nn.Module) -> bool:
    """A module with a weight matrix (a parameter of 2+ dims: conv, linear, attention, ...) computes new
    channels: the network's input and output are not the channels on its other side."""
    return any(p.dim() >= 2 for p in m.parameters())


def is_depthwise(m: object) -> bool:
    """A conv whose filter i reads input channel i only (so channel i stays channel i)."""
    return isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def op_name(node: fx.Node) -> str:
    """The function / method a node calls, in-place ``_`` and dunders stripped (``__iadd__`` -> ``iadd``,
    ``relu_`` -> ``relu``); "" for other nodes."""
    if node.op == "call_method":
        return str(node.target).strip("_")
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)).strip("_")
    return ""


def shape_of(node: fx.Node) -> torch.Size | None:
    """The node's output shape when known (fx with an example input, or a recorded forward)."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return shape if isinstance(shape, torch.Size) else None


def is_cat(node: fx.Node) -> bool:
    """A channel concatenation: ``torch.cat`` / ``concat`` / ``concatenate`` along dim 1."""
    if node.op != "call_function" or op_name(node) not in _CAT:
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    shape = shape_of(node)
    if isinstance(dim, int) and dim < 0 and shape is not None:
        dim += len(shape)
    return dim == 1


def _is_value(node: fx.Node) -> bool:
    name = op_name(node)
    return name in _VALUES or (name == "getitem" and isinstance(node.args[0], fx.Node) and _is_value(node.args[0]))


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensors a node reads that the forward computed (not parameters, constants or sizes)."""
    return [a for a in node.all_input_nodes if a.op != "get_attr" and not _is_value(a)]


def _keeps_channel(node: fx.Node, src: fx.Node) -> bool:
    """Whether a reshape / reduction keeps dim 1 as the channels of ``src`` (unknown shapes: assumed)."""
    name = op_name(node)
    if name in _REDUCE:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        shape = shape_of(src)
        dims = dim if isinstance(dim, tuple | list) else (dim,)
        return dim is not None and all(isinstance(d, int) and (d if d >= 0 or shape is None else d + len(shape)) != 1
                                       for d in dims)
    a, b = shape_of(src), shape_of(node)
    return a is None or b is None or (len(a) > 1 and len(b) > 1 and a[:2] == b[:2])


def upstream(node: fx.Node, modules: dict[str, nn.Module], depthwise: bool = False) -> fx.Node:
    """Walk back from ``node`` through ops that keep channel i in channel i (BatchNorm, activations, pooling,
    arithmetic with constants, reshapes that keep dim 1; depthwise convs too if asked: a concatenation's
    segments survive them) to the node that made the channels: a layer, a concatenation, a residual add, the
    input, or an op this module does not understand."""
    while True:
        if node.op == "call_module":
            mod = modules.get(node.target)
            if not (isinstance(mod, PASS_MODULES) or (depthwise and is_depthwise(mod))) \
                    or not isinstance(node.args[0], fx.Node):
                return node
            node = node.args[0]
            continue
        if node.op not in ("call_function", "call_method") or is_cat(node):
            return node
        ins = data_inputs(node)
        name = op_name(node)
        if len(ins) != 1:
            return node
        if name == "getitem" and ins[0].op == "call_module" and shape_of(ins[0]) is None:
            node = ins[0]  # one output of a module returning several
        elif name in _KEEP or ((name in _REDUCE or name in _RESHAPE) and _keeps_channel(node, ins[0])):
            node = ins[0]
        else:
            return node


def channels(node: fx.Node, modules: dict[str, nn.Module]) -> int:
    """The channel count (dim 1) of a node's output: its shape when known, else from the module or the
    concatenation that made it. Raises ValueError when neither tells."""
    while True:
        shape = shape_of(node)
        if shape is not None and len(shape) > 1:
            return int(shape[1])
        if node.op == "call_module":
            for attr in ("out_channels", "out_features", "num_features", "num_channels"):
                if hasattr(modules[node.target], attr):
                    return int(getattr(modules[node.target], attr))
        if is_cat(node):
            return sum(channels(a, modules) for a in node.args[0])
        if not node.all_input_nodes or node.op == "placeholder":
            raise ValueError(f"cannot infer the channel count of {node.name!r}; pass example_input")
        node = node.all_input_nodes[0]


# ---- the graph --------------------------------------------------------------------------------------

class ModelGraph:
    """A model's data flow (an fx.Graph of leaf modules and torch functions) and what KELS reads from it.

    ``graph``: the nodes in execution order; ``modules``: qualified name -> module for ``call_module``
    targets; ``how``: ``"fx"`` or ``"record"``; ``model_name``: the model's class, for messages."""

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], how: str, model_name: str) -> None:
        self.graph, self.modules, self.how, self.model_name = graph, modules, how, model_name

    def upstream(self, node: fx.Node, depthwise: bool = False) -> fx.Node:
        """:func:`upstream` in this graph."""
        return upstream(node, self.modules, depthwise)

    def channels(self, node: fx.Node) -> int:
        """:func:`channels` in this graph."""
        return channels(node, self.modules)

    def segments(self, node: fx.Node) -> list[int] | None:
        """Channel sizes of the concatenation ``node`` carries (through channel-preserving ops and depthwise
        convs, nested concatenations flattened), or None when it carries none."""
        node = self.upstream(node, depthwise=True)
        if not is_cat(node):
            return None
        out: list[int] = []
        for part in node.args[0]:
            inner = self.segments(part)
            out += inner if inner is not None else [self.channels(self.upstream(part, depthwise=True))]
        return out

    def order(self, names: Iterable[str]) -> list[str]:
        """The given module names in the order the graph first calls them (names never called left out)."""
        names = set(names)
        return list(dict.fromkeys(n.target for n in self.graph.nodes if n.op == "call_module" and n.target in names))

    def norm_producers(self, names: Iterable[str]) -> dict[str, str]:
        """``{BatchNorm: layer}`` for every BatchNorm whose channels come straight from one of the named
        layers (through channel-preserving ops)."""
        names, out = set(names), {}
        for node in self.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules.get(node.target), nn.modules.batchnorm._BatchNorm):
                src = self.upstream(node.args[0])
                if src.op == "call_module" and src.target in names:
                    out[node.target] = src.target
        return out

    def roles(self, names: Iterable[str]) -> tuple[dict[str, Role], list[str]]:
        """KELS role of every named layer, and the layers whose role this graph cannot tell (in words).

        "first": the layer reads the model input, "last": it produces the model output, each without a
        channel-mixing module (:func:`mixes_channels`, named or not) in between; ``segments``: the
        concatenation its input is. A layer the graph never calls, one whose input reaches a concatenation
        only through an op not understood here, or whose segments do not add up to its inputs, keeps the
        plain rule and is listed."""
        names = set(names)
        layer_of = {n: n.target for n in self.graph.nodes if n.op == "call_module" and n.target in names}
        sources: dict[fx.Node, frozenset] = {}  # layers (or "input") reaching a node without a channel mixer
        catted: dict[fx.Node, bool] = {}  # a concatenation reaches the node without a channel mixer
        for node in self.graph.nodes:  # nodes come in execution (topological) order
            mixer = node.op == "call_module" and (node in layer_of or mixes_channels(self.modules[node.target]))
            if node in layer_of:
                sources[node] = frozenset([node])
            elif mixer:
                sources[node] = frozenset()
            elif node.op == "placeholder":
                sources[node] = frozenset(["input"])
            else:
                sources[node] = frozenset().union(*(sources[a] for a in node.all_input_nodes))
            catted[node] = is_cat(node) or (not mixer and any(catted[a] for a in data_inputs(node)))
        roles, unread = {n: Role() for n in names}, []
        for node, name in layer_of.items():
            role = roles[name]
            role.first = role.first or "input" in frozenset().union(*(sources[a] for a in node.all_input_nodes))
            if role.first or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            stop = self.upstream(node.args[0], depthwise=True)
            if not is_cat(stop):
                if catted[stop] and stop.op in ("call_function", "call_method") and len(data_inputs(stop)) == 1:
                    unread.append(f"{name!r} (its input comes from a concatenation through {op_name(stop)!r})")
                continue
            segs, wanted = self.segments(node.args[0]), self._in_channels(name)
            if wanted is not None and sum(segs) != wanted:
                unread.append(f"{name!r} (a concatenation of {segs} channels, but it reads {wanted})")
            else:
                role.segments = segs
        for node in self.graph.nodes:
            if node.op == "output":
                for src in sources[node]:
                    if src != "input":
                        roles[src.target].last = True
        called = set(layer_of.values())
        unread += [f"{n!r} (never called in the {'traced' if self.how == 'fx' else 'recorded'} forward)"
                   for n in sorted(names - called)]
        return roles, unread

    def _in_channels(self, name: str) -> int | None:
        m = self.modules.get(name)
        return getattr(m, "in_channels", getattr(m, "in_features", None))


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx graph of ``model`` with the leaf modules of :func:`is_leaf` as call_module nodes."""

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return is_leaf(m)

    tracer = Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph)


def _inputs(example_input: Any) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def read(model: nn.Module, example_input: Any = None, *, method: str = "auto") -> ModelGraph:
    """The data flow of ``model`` (see the module docstring).

    ``method="auto"``: torch.fx (shapes from ``example_input`` when given); where fx cannot trace the model
    (or its graph does not run on ``example_input``), one recorded forward on ``example_input``.
    ``"fx"`` / ``"record"`` force one reader. The model's train/eval mode is restored and no BatchNorm
    statistic moves. Raises ValueError when no reader can read the model (e.g. fx fails and no
    ``example_input``), naming the model's class."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    name = type(model).__name__
    if method != "record":
        try:
            gm = trace(model)
            if example_input is not None:
                from torch.fx.passes.shape_prop import ShapeProp

                with _eval(model), _eval(gm):
                    ShapeProp(gm).propagate(*_inputs(example_input))
            return ModelGraph(gm.graph, dict(gm.named_modules()), "fx", name)
        except Exception as exc:  # data-dependent control flow etc.
            if method == "fx" or example_input is None:
                raise ValueError(f"torch.fx cannot trace {name} ({type(exc).__name__}: {exc}); pass example_input "
                                 f"so ke_fast can read one forward of it") from exc
    if example_input is None:
        raise ValueError(f"method='record' reads one forward of {name}: pass example_input")
    return _record(model, example_input)


class _eval:
    """Context: eval mode and no grad (no BatchNorm statistic moves); the mode is restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was, self.grad = model, model.training, torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        self.model.train(self.was)


class _Recorder(TorchFunctionMode):
    """Notes one forward as an fx.Graph: leaf modules through their hooks (``call_module``), every other
    torch function applied to a tensor the forward computed as ``call_function`` / ``call_method``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.node_of: dict[int, fx.Node] = {}  # id(tensor) -> the node that last wrote it
        self.alive: list[torch.Tensor] = []  # every tensor seen stays alive, so no id is reused meanwhile
        self.depth = 0  # > 0 inside a leaf module: its own torch calls are not noted
        self.calls: list[tuple] = []  # (args, kwargs) of the leaf calls under way
        self.names = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}

    def arg(self, a: Any) -> Any:
        """Tensors -> their nodes (a tensor the forward did not compute becomes a get_attr constant)."""
        if isinstance(a, torch.Tensor):
            if id(a) not in self.node_of:
                self.bind(self.graph.get_attr(self.names.get(id(a), f"_constant{len(self.alive)}")), a)
            return self.node_of[id(a)]
        if isinstance(a, list | tuple):
            return type(a)(self.arg(x) for x in a) if type(a) in (list, tuple) else [self.arg(x) for x in a]
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        return a

    def bind(self, node: fx.Node, out: Any) -> None:
        """Make ``node`` the producer of ``out`` (each tensor of a returned tuple gets a getitem node)."""
        if isinstance(out, torch.Tensor):
            node.meta["tensor_meta"] = _Meta(out.shape, out.dtype)
            self.node_of[id(out)] = node
            self.alive.append(out)
        elif isinstance(out, list | tuple):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self.bind(self.graph.call_function(operator.getitem, (node, i)), t)

    def computed(self, a: Any) -> bool:
        if isinstance(a, torch.Tensor):
            node = self.node_of.get(id(a))
            return node is not None and node.op != "get_attr"
        if isinstance(a, list | tuple):
            return any(self.computed(x) for x in a)
        return isinstance(a, dict) and any(self.computed(x) for x in a.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and self.computed((args, kwargs)) and (isinstance(out, torch.Tensor) or (
                isinstance(out, list | tuple) and any(isinstance(t, torch.Tensor) for t in out))):
            name = getattr(func, "__name__", "")
            method = getattr(torch.Tensor, name, None) is func or getattr(func, "__qualname__", "").startswith(
                ("TensorBase.", "Tensor."))
            node = self.graph.create_node("call_method" if method else "call_function", name if method else func,
                                          self.arg(args), self.arg(kwargs))
            self.bind(node, out)
        return out

    def pre_hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.depth == 0:
            self.calls.append((self.arg(args), self.arg(kwargs)))
        self.depth += 1

    def hook(self, name: str, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.depth -= 1
        if self.depth == 0 and self.calls:
            a, k = self.calls.pop()
            self.bind(self.graph.call_module(name, a, k), out)


def _record(model: nn.Module, example_input: Any) -> ModelGraph:
    """One forward of ``model`` on ``example_input`` read as a graph (see :class:`_Recorder`)."""
    rec = _Recorder(model)
    modules = dict(model.named_modules())
    leaves = [(n, m) for n, m in modules.items() if is_leaf(m)]
    handles = []
    try:
        for n, m in leaves:
            handles.append(m.register_forward_pre_hook(rec.pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(lambda *a, n=n: rec.hook(n, *a), with_kwargs=True, always_call=True))
        inputs = _inputs(example_input)
        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor):
                rec.bind(rec.graph.placeholder(f"input{i}"), x)
        with _eval(model), rec:
            out = model(*inputs)
        rec.graph.output(rec.arg(out))
    finally:
        for h in handles:
            h.remove()
    return ModelGraph(rec.graph, modules, "record", type(model).__name__)


def call_order(model: nn.Module, modules: list[tuple[str, nn.Module]], example_input: Any) -> list[str]:
    """The names of ``modules`` in the order they are called (once per call) when ``model`` runs on
    ``example_input`` (a tensor or a tuple of them) in eval mode without gradients: no BatchNorm statistic
    moves; the model's train/eval mode is restored and the hooks removed, also on error."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=n: order.append(name)) for n, m in modules]
    try:
        with _eval(model):
            model(*_inputs(example_input))
    finally:
        for h in handles:
            h.remove()
    return order


def layer_roles(model: nn.Module, layers: list[tuple[str, nn.Module]], example_input: Any = None, *,
                method: str = "auto") -> dict[str, Role]:
    """KELS role of every layer in ``layers`` (:meth:`ModelGraph.roles`) from :func:`read`.

    Never silent: layers whose role cannot be read keep the plain rule and one warning names the model's
    class, those layers and the rule. Where the recorded forward itself fails (an op the recorder cannot
    run), the execution order decides (the first and the last channel-mixing module to run are "first" and
    "last" if they are layers; no concatenation read), with one warning saying so."""
    names = [n for n, _ in layers]
    if "" in names:  # the model is itself one layer: it reads the input and produces the output
        return {"": Role(first=True, last=True)}
    try:
        roles, unread = read(model, example_input, method=method).roles(names)
    except ValueError:
        raise
    except Exception as exc:  # the recorder failed: does the model run at all?
        watched = [(n, m) for n, m in model.named_modules() if n in names or (is_leaf(m) and mixes_channels(m))]
        order = call_order(model, watched, example_input)
        if not any(n in names for n in order):
            raise ValueError("example_input ran no conv/linear layer of the model") from exc
        roles = {n: Role() for n in names}
        if order[0] in roles:
            roles[order[0]].first = True
        if order[-1] in roles:
            roles[order[-1]].last = True
        warnings.warn(f"ke_fast could not record the data flow of {type(model).__name__} ({type(exc).__name__}: "
                      f"{exc}); KELS roles follow the execution order: the first layer to run keeps all its inputs, "
                      f"the last all its outputs, every layer else {PLAIN_RULE}: concatenations are not read",
                      stacklevel=3)
        return roles
    if unread:
        warnings.warn(f"ke_fast could not read part of the data flow of {type(model).__name__}: {'; '.join(unread)}. "
                      f"These layers follow {PLAIN_RULE}.", stacklevel=3)
    return roles


def norm_producers(model: nn.Module, names: Iterable[str], example_input: Any = None) -> dict[str, str]:
    """``{BatchNorm: layer}`` for the named layers (:meth:`ModelGraph.norm_producers`)."""
    return read(model, example_input).norm_producers(names)


__all__ = ["METHODS", "PASS_MODULES", "PLAIN_RULE", "ModelGraph", "Role", "call_order", "channels", "data_inputs",
           "is_cat", "is_depthwise", "is_leaf", "layer_roles", "mixes_channels", "norm_producers", "op_name", "read",
           "shape_of", "trace", "upstream"]
