"""Reading a model: the layers reading its input and producing its output, where concatenations and residual
adds join channels, the channel count along each edge, the order layers run in. Everything that needs the
graph (KELS roles in ``split``, ``extract_slim``, ``reset_bn_``, ``--reset-from``) reads it here.

Two readers give the same kind of graph, a ``torch.fx.Graph`` whose ``call_module`` nodes are the leaf modules
(:func:`is_leaf`): ``"fx"``, symbolic tracing (shapes too when an example input is given), and ``"record"``,
one forward on an example input (eval mode, no grad) under a ``TorchFunctionMode`` noting every torch function
applied to a tensor the forward computed, while forward hooks note what each leaf module read and wrote: it
reads models fx cannot trace (data-dependent control flow, as the official KE ``Split_densenet121``)."""
from __future__ import annotations

import contextlib
import operator
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

METHODS = ("auto", "fx", "record")
PLAIN_RULE = "the plain KELS rule (first ceil(s*C_in) input channels of the first ceil(s*C_out) filters)"

# modules that carry channel i of their input to channel i of their output
PASS_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU,
                nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Dropout, nn.Dropout1d,
                nn.Dropout2d, nn.Identity, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_CAT = frozenset({"cat", "concat", "concatenate"})
# function / method names (in-place "_" and dunders stripped) that keep channel i in channel i when they
# read one tensor the forward computed (constants and scalars aside)
_KEEP = frozenset("""relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu selu celu mish
    softplus dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout clone contiguous detach to float
    half bfloat16 double type type_as abs neg exp log sqrt rsqrt square pow clamp clip clamp_min clamp_max max_pool1d
    max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
    adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d lp_pool2d interpolate upsample pad batch_norm
    instance_norm group_norm layer_norm add sub mul div true_divide truediv floordiv floor_divide rsub radd rmul
    rtruediv iadd isub imul itruediv where masked_fill""".split())
_REDUCE = frozenset("mean sum amax amin std var logsumexp prod".split())
_RESHAPE = frozenset("flatten view reshape squeeze unsqueeze view_as reshape_as".split())
_VALUES = frozenset("size dim numel getattr".split())  # nodes that produce Python values, not tensors


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
    dim, shape = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0), shape_of(node)
    return (dim + len(shape) if isinstance(dim, int) and dim < 0 and shape is not None else dim) == 1


def _is_value(node: fx.Node) -> bool:
    return op_name(node) in _VALUES or (op_name(node) == "getitem" and isinstance(node.args[0], fx.Node)
                                        and _is_value(node.args[0]))


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensors a node reads that the forward computed (not parameters, constants or sizes)."""
    return [a for a in node.all_input_nodes if a.op != "get_attr" and not _is_value(a)]


def _keeps_channel(node: fx.Node, src: fx.Node) -> bool:
    """Whether a reshape / reduction keeps dim 1 as the channels of ``src`` (unknown shapes: assumed)."""
    name = op_name(node)
    if name in _REDUCE:
        dim, shape = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None), shape_of(src)
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
                    or not node.args or not isinstance(node.args[0], fx.Node):
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
    """A model's data flow and what KELS reads from it. ``graph``: an fx.Graph of leaf modules and torch
    functions, in execution order; ``modules``: name -> module of its ``call_module`` targets; ``how``:
    ``"fx"`` or ``"record"``."""

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], how: str) -> None:
        self.graph, self.modules, self.how = graph, modules, how

    def channels(self, node: fx.Node) -> int:
        """:func:`channels` in this graph."""
        return channels(node, self.modules)

    def segments(self, node: fx.Node) -> list[int] | None:
        """Channel sizes of the concatenation ``node`` carries (through channel-preserving ops and depthwise
        convs, nested concatenations flattened), or None when it carries none."""
        node = upstream(node, self.modules, depthwise=True)
        if not is_cat(node):
            return None
        out: list[int] = []
        for part in node.args[0]:
            inner = self.segments(part)
            out += inner if inner is not None else [self.channels(upstream(part, self.modules, depthwise=True))]
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
                src = upstream(node.args[0], self.modules)
                if src.op == "call_module" and src.target in names:
                    out[node.target] = src.target
        return out

    def roles(self, names: Iterable[str]) -> tuple[dict[str, Role], list[str]]:
        """KELS role of every named layer, and (in words) the layers whose role cannot be read: never called,
        reaching a concatenation through an op not understood here, or segments not adding up to its inputs.
        "first" / "last": the layer reads the model input / produces its output with no channel-mixing module
        (:func:`mixes_channels`, named or not) in between; ``segments``: the concatenation its input is."""
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
            stop = upstream(node.args[0], self.modules, depthwise=True)
            if not is_cat(stop):
                if catted[stop]:  # a concatenation upstream, reached through something not read here
                    unread.append(f"{name!r} (its input comes from a concatenation through "
                                  f"{op_name(stop) or stop.target!r})")
                continue
            segs = self.segments(node.args[0])
            wanted = getattr(self.modules[name], "in_channels", getattr(self.modules[name], "in_features", None))
            if wanted is not None and sum(segs) != wanted:
                unread.append(f"{name!r} (a concatenation of {segs} channels, but it reads {wanted})")
            else:
                role.segments = segs
        for src in frozenset().union(*(sources[n] for n in self.graph.nodes if n.op == "output")) - {"input"}:
            roles[src.target].last = True
        unread += [f"{n!r} (never called in the {'traced' if self.how == 'fx' else 'recorded'} forward)"
                   for n in sorted(names - set(layer_of.values()))]
        return roles, unread


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
    """The data flow of ``model``. ``method="auto"``: torch.fx (shapes from ``example_input`` when given), else
    (fx fails, or its graph does not run on ``example_input``) one recorded forward on ``example_input``;
    ``"fx"`` / ``"record"`` force one. The train/eval mode is restored and no BatchNorm statistic moves.
    Raises ValueError, naming the model's class, when no reader can (fx fails and no ``example_input``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    name = type(model).__name__  # for messages
    if method != "record":
        try:
            gm = trace(model)
            if example_input is not None:
                from torch.fx.passes.shape_prop import ShapeProp

                with _eval(model), _eval(gm):
                    ShapeProp(gm).propagate(*_inputs(example_input))
            return ModelGraph(gm.graph, dict(gm.named_modules()), "fx")
        except Exception as exc:  # data-dependent control flow etc.
            if method == "fx" or example_input is None:
                raise ValueError(f"torch.fx cannot trace {name} ({type(exc).__name__}: {exc}); pass example_input "
                                 f"so ke_fast can read one forward of it") from exc
    if example_input is None:
        raise ValueError(f"method='record' reads one forward of {name}: pass example_input")
    return _record(model, example_input)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad (no BatchNorm statistic moves); the train/eval mode is restored, also on error."""
    was = model.training
    try:
        with torch.no_grad():
            yield model.eval()
    finally:
        model.train(was)


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
            node.meta["tensor_meta"] = SimpleNamespace(shape=out.shape, dtype=out.dtype)  # as ShapeProp's
            self.node_of[id(out)] = node
            self.alive.append(out)
        elif isinstance(out, list | tuple):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self.bind(self.graph.call_function(operator.getitem, (node, i)), t)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        computed = any(getattr(self.node_of.get(id(t)), "op", "get_attr") != "get_attr" for t in _tensors((args, kwargs)))
        if self.depth == 0 and computed and any(True for _ in _tensors(out)):
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


def _tensors(a: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested lists, tuples and dicts."""
    if isinstance(a, torch.Tensor):
        yield a
    elif isinstance(a, list | tuple | dict):
        for x in (a.values() if isinstance(a, dict) else a):
            yield from _tensors(x)


def _record(model: nn.Module, example_input: Any) -> ModelGraph:
    """One forward of ``model`` on ``example_input`` read as a graph (see :class:`_Recorder`)."""
    rec, modules, handles = _Recorder(model), dict(model.named_modules()), []
    try:
        for n, m in ((n, m) for n, m in modules.items() if is_leaf(m)):
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
    return ModelGraph(rec.graph, modules, "record")


def call_order(model: nn.Module, modules: list[tuple[str, nn.Module]], example_input: Any) -> list[str]:
    """The names of ``modules`` in the order they are called (once per call) when ``model`` runs on
    ``example_input`` (a tensor or a tuple of them) under :func:`_eval`; hooks removed, also on error."""
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
    """KELS role of every layer in ``layers`` (:meth:`ModelGraph.roles` of :func:`read`). Never silent: layers
    whose role cannot be read keep the plain rule, and one warning names the model's class, them and the rule;
    where the recorder fails, the first / last channel-mixing module to run are "first" / "last", and one
    warning says so."""
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
        roles = {n: Role(first=n == order[0], last=n == order[-1]) for n in names}
        warnings.warn(f"ke_fast could not record the data flow of {type(model).__name__} ({type(exc).__name__}: "
                      f"{exc}); KELS roles follow the execution order: the first layer to run keeps all its inputs, "
                      f"the last all its outputs, every layer else {PLAIN_RULE}: concatenations are not read",
                      stacklevel=3)
        return roles
    if unread:
        warnings.warn(f"ke_fast could not read part of the data flow of {type(model).__name__}: {'; '.join(unread)}. "
                      f"These layers follow {PLAIN_RULE}.", stacklevel=3)
    return roles

