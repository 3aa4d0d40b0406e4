"""One object per split model: :class:`SplitState` holds what ``split`` / ``adopt`` decided once (split mode,
split rate, seed) and what the model-level operations keep between calls (the model's masked layers, its reset
plans, its fit groups), in place of per-layer copies and module-level tables.

Where it lives: ``model.__dict__["_ke_split"]`` on the module ``split`` / ``adopt`` was called on (the root; a
masked layer built directly is its own root), and ``layer.__dict__["_ke_state"]`` on each masked layer (the same
object). It is neither a Module nor a tensor: state_dict keys (``fit_mask`` is the only one a split adds),
``named_modules``, ``.to()`` and DDP see nothing new. A submodule used alone, a DDP wrapper or torch.compile's
OptimizedModule reaches it through its layers (:func:`layers_and_state`).

Lifecycle: made by ``split`` / ``adopt``; deep-copied and pickled with the model (``torch.save(model)`` too), its
settings only: a copy rebuilds its caches, for its own tensors, on first use; a layer that moves (``.to()``,
``.half()``) drops its state's plans and groups; ``revert`` removes it. A layer pickled by ke_fast before this
object existed gets a state of its own from its ``ke_seed`` when loaded.

Cache policy (every cache of ke_fast is listed in ARCHITECTURE.md): a cache is owned by the object whose life it
serves and dies with it; an entry is replaced only when its own inputs change, never evicted by unrelated calls;
nothing is built while a CUDA stream captures a graph (a miss there raises). Here: per layer set, one reset plan
(a :class:`~ke_fast.ops.ReinitPlan`, owning its launch tables) and one fit group (a :class:`~ke_fast.nn.FitGroup`,
owning its ``masked_weights`` tables).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn

from . import kernels as K
from . import ops

ROOT_ATTR = "_ke_split"  # on the root module: its SplitState
LAYER_ATTR = "_ke_state"  # on every masked layer: the SplitState it belongs to
MASKED_MARK = "_ke_masked_layer"  # a class attribute of ke_fast.nn.MaskedLayer: isinstance without importing nn
T = TypeVar("T")
# Bumped whenever a module becomes or stops being a masked layer through ke_fast (split, adopt, revert, a layer
# built, copied or loaded): a kept list of layers is walked again after any such change. A counter, not a cache.
_layer_changes = 0


def layers_changed() -> None:
    """Note that some module became or stopped being a masked layer (kept layer lists are then re-walked)."""
    global _layer_changes
    _layer_changes += 1


def is_masked(m: nn.Module) -> bool:
    """Whether ``m`` is a ke_fast masked layer (``isinstance(m, ke_fast.nn.MaskedLayer)``)."""
    return getattr(type(m), MASKED_MARK, False) is True


def walk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every masked layer of ``model``, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if is_masked(m)]


class SplitState:
    """The state of one split model (see the module note for where it lives and its lifecycle).

    Settings: ``mode`` (``"kels"``, ``"wels"``, or ``"custom"`` for masks taken over by ``adopt``), ``split_rate``
    (None for adopted masks: each layer has its own density) and ``seed`` (the run seed: WELS masks and every
    reset draw from it). Caches (neither copied nor pickled): the root's masked layers, checked on every use;
    per layer set the objects :meth:`kept` returns."""

    def __init__(self, mode: str, split_rate: float | None, seed: int) -> None:
        self.mode = mode
        self.split_rate = split_rate
        self.seed = K.check_seed(seed)
        self._clear()

    def _clear(self) -> None:
        self._root: weakref.ref | None = None
        self._listed: list[tuple[str, tuple[str, ...], weakref.ref]] | None = None
        self._listed_at = -1  # _layer_changes when the list was walked
        self._kept: dict[tuple, tuple[list[weakref.ref], Any, Any]] = {}

    def __getstate__(self) -> dict:
        # copies and pickles carry the settings only: the caches refer to the original's modules and tensors
        return {"mode": self.mode, "split_rate": self.split_rate, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._clear()

    def __repr__(self) -> str:
        return f"SplitState(mode={self.mode!r}, split_rate={self.split_rate}, seed={self.seed})"

    def attach(self, root: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
        """Make this the state of ``root`` and of ``layers`` (masked layers of it)."""
        for _, m in layers:
            m.__dict__[LAYER_ATTR] = self
        root.__dict__[ROOT_ATTR] = self
        self._remember(root, walk(root))

    def layers(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        """The masked layers of ``root`` (the module this state is the root state of), in ``named_modules``
        order: the list kept from the last call while every layer of it is still a masked layer at its path
        (a few dict look-ups per layer) and no module became or stopped being a masked layer through ke_fast
        since (split, adopt, revert, a layer built, copied or loaded), else found again by walking the model.
        Not seen until then: an existing masked layer moved into the model by plain assignment."""
        listed = self._listed
        if listed is not None and self._listed_at == _layer_changes and self._root is not None \
                and self._root() is root:
            out = []
            for name, path, ref in listed:
                m: nn.Module | None = root
                for part in path:
                    m = m._modules.get(part)
                    if m is None:
                        break
                if m is None or m is not ref() or not is_masked(m):
                    break
                out.append((name, m))
            else:
                return out
        out = walk(root)
        self._remember(root, out)
        return out

    def _remember(self, root: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
        self._root = weakref.ref(root)
        self._listed_at = _layer_changes
        self._listed = [(n, tuple(n.split(".")) if n else (), weakref.ref(m)) for n, m in layers]

    def kept(self, kind: str, layers: list[tuple[str, nn.Module]], key: Any, build: Callable[[], T]) -> T:
        """The object ``build()`` made for ``kind`` (``"reset"``: the layers' ReinitPlan, ``"fit"``: their
        FitGroup) and this set of layers, kept while the state lives; made again when ``key`` differs from the
        one it was made with (the plan's tensors, masks or arguments changed). One entry per (kind, layer set):
        a model and a submodule of it used alone keep one each, and neither evicts the other."""
        slot = (kind, tuple(id(m) for _, m in layers))
        entry = self._kept.get(slot)
        if entry is not None and entry[1] == key and all(r() is m for r, (_, m) in zip(entry[0], layers)):
            return entry[2]
        obj = build()
        # entries of layer sets with a layer gone (e.g. replaced) would keep its tensors alive: drop them
        for dead in [s for s, (refs, _, _) in self._kept.items() if any(r() is None for r in refs)]:
            del self._kept[dead]
        self._kept[slot] = ([weakref.ref(m) for _, m in layers], key, obj)
        return obj

    def cached(self, kind: str) -> list:
        """The objects kept for ``kind`` (``"reset"`` or ``"fit"``), one per layer set, oldest first."""
        return [obj for (k, _), (_, _, obj) in self._kept.items() if k == kind]

    def drop_caches(self) -> None:
        """Forget the reset plans and fit groups (a layer moved: they hold its old tensors)."""
        self._kept.clear()


def state_of_layer(m: nn.Module) -> SplitState | None:
    """The SplitState of a masked layer (None for any other module)."""
    st = m.__dict__.get(LAYER_ATTR)
    return st if isinstance(st, SplitState) else None


def layers_and_state(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], SplitState | None]:
    """(the masked layers of ``model`` in ``named_modules`` order, the SplitState they all belong to).

    For the root of a split model the layers come from its state (no walk); any other module (a submodule, a
    DDP wrapper) is walked. The state is None when the layers belong to several states (e.g. layers built
    directly, or taken from two split models) or there is none."""
    root = model.__dict__.get(ROOT_ATTR)
    layers = root.layers(model) if isinstance(root, SplitState) else walk(model)
    states = {id(st): st for st in (state_of_layer(m) for _, m in layers)}
    return layers, next(iter(states.values())) if len(states) == 1 else None


def split_state(model: nn.Module) -> SplitState | None:
    """The :class:`SplitState` of ``model``: its own if ``split`` / ``adopt`` was called on it, else the one all
    its masked layers share; None when it has no masked layer or its layers belong to several states."""
    root = model.__dict__.get(ROOT_ATTR)
    return root if isinstance(root, SplitState) else layers_and_state(model)[1]


def seed_of(layers: list[tuple[str, nn.Module]]) -> int:
    """The seed the layers were split with; ValueError when they were split with different seeds."""
    seeds: dict[int, str] = {}
    for name, m in layers:
        st = state_of_layer(m)
        if st is None:
            raise ValueError(f"layer {name!r} carries no split state, so its seed is unknown: pass seed=")
        seeds.setdefault(st.seed, name)
    if len(seeds) > 1:
        shown = ", ".join(f"{n!r}: {s}" for s, n in seeds.items())
        raise ValueError(f"the masked layers were split with different seeds ({shown}): pass seed=")
    return next(iter(seeds))


def check_tied_masks(layers: list[tuple[str, nn.Module]], why: str) -> None:
    """Layers sharing a weight or bias Parameter (tied weights) must still hold one mask for it: ValueError
    naming both layers otherwise (e.g. after ``set_fit_mask`` on one of them). ``why``: what would go wrong."""
    first: dict[int, tuple[str, torch.Tensor]] = {}
    for name, m in layers:
        for kind, p, words in (("weight", m.weight, m.fit_mask), ("bias", m.bias, m.bias_mask)):
            if p is None:
                continue
            owner, owner_words = first.setdefault(id(p), (name, words))
            if owner != name and owner_words is not words and not torch.equal(owner_words, words):
                raise ValueError(f"layers {owner!r} and {name!r} share a {kind} Parameter but hold different fit "
                                 f"masks for it (changed after split, e.g. by set_fit_mask on one of them): {why}. "
                                 f"Give both the same mask")


def reset_plan(layers: list[tuple[str, nn.Module]], state: SplitState | None, *, seed: int, init: str,
               fan_mode: str, whole: Mapping[str, str]) -> tuple[ops.ReinitPlan, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The ReinitPlan re-drawing the reset entries of ``layers`` (weights and biases; ``whole`` as in
    :func:`ke_fast.convert.reinit_`), kept on ``state`` while its tensors, masks and arguments are unchanged, and
    the (parameter, contiguous working copy) pairs of non-contiguous parameters, to copy back after it runs.

    A Parameter several layers share (tied weights) is listed once, from its first layer's stream, and only if
    they agree on its mask: ValueError naming both otherwise, before anything is written."""
    weights, masks, fans, ids, mask_keys = [], [], [], [], []
    strided: list[tuple[torch.Tensor, torch.Tensor]] = []
    listed: dict[int, tuple[str, tuple]] = {}  # id(parameter) -> (first layer holding it, its mask)

    def data(p: torch.Tensor) -> torch.Tensor:
        # detach() shares the parameter's version counter: the reset shows as an in-place change.
        # Masks follow the row-major order: e.g. a channels_last weight is reset in a contiguous copy.
        if p.is_contiguous():
            return p.detach()
        strided.append((p, p.detach().contiguous()))
        return strided[-1][1]

    def add(name: str, p: torch.Tensor, words: torch.Tensor, fan: tuple[int, int], layer_id: int) -> None:
        # a whole tensor kept or reset: its words are made only when a plan is built (see whole_words)
        mask = (whole[name], p.numel(), words.device) if name in whole else words
        first = listed.setdefault(id(p), (name, mask))
        if first[0] != name:
            if not _same_mask(first[1], mask):
                raise ValueError(f"layers {first[0]!r} and {name!r} share a Parameter but hold different fit masks "
                                 f"for it (changed after split?, or different whole= choices); reinit_ would reset "
                                 f"entries one of them keeps")
            return
        weights.append(data(p))
        masks.append(mask)
        mask_keys.append(mask[0] if isinstance(mask, tuple) else (mask.data_ptr(), mask._version))
        fans.append(fan)
        ids.append(layer_id)

    for name, m in layers:
        fan = K.fans_of(m.weight.shape)
        add(name, m.weight, m.fit_mask, fan, 2 * m.layer_index)
        if m.bias is not None:
            add(name, m.bias, m.bias_mask, fan, 2 * m.layer_index + 1)  # biases get streams of their own
    key = (seed, init, fan_mode, tuple((w.data_ptr(), k) for w, k in zip(weights, mask_keys)))

    def build() -> ops.ReinitPlan:  # validated and laid out once, reused every generation
        words = [whole_words(*m) if isinstance(m, tuple) else m for m in masks]
        return ops.ReinitPlan(weights, words, seed=seed, fans=fans, layer_ids=ids, init=init, fan_mode=fan_mode)

    plan = build() if state is None else state.kept("reset", layers, key, build)
    return plan, strided


def whole_words(how: str, numel: int, device: torch.device) -> torch.Tensor:
    """Packed words of a whole tensor kept (``"keep"``: every bit 1, tail bits 0) or reset (``"reset"``: 0),
    made by fills on ``device`` (no host-to-device copy)."""
    words = torch.full((K.num_words(numel),), -1 if how == "keep" else 0, dtype=torch.int32, device=device)
    if how == "keep" and numel % 32:
        words[-1] = (1 << (numel % 32)) - 1
    return words


def _same_mask(a: torch.Tensor | tuple, b: torch.Tensor | tuple) -> bool:
    """Whether two masks of one Parameter (packed words, or a ``whole`` choice as (how, numel, device)) agree."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return a[0] == b[0]
    a, b = (whole_words(*m) if isinstance(m, tuple) else m for m in (a, b))
    return a is b or torch.equal(a, b)

