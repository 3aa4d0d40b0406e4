"""The configuration of one KE run, and the one place where every option is checked.

:class:`Config` validates itself when it is made (and again in :meth:`Config.validate`): a bad value raises
:class:`ConfigError` (a ValueError) naming the field. Its message is kept as parts (:class:`Opt` for an
option) so that the command line can say the same thing in its own words: ``split_rate must be in (0, 1]``
in Python, ``--split-rate must be in (0, 1]`` on the command line (:meth:`OptionMessage.render`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

from . import kernels as K
from .recipes import RECIPE_NAMES
from .variants import MASK_CRITERIA

EVOLVE_MODES = ("rand", "zero", "rewind")
SPLITS = ("kels", "wels")
SCHEDULES = ("step", "epoch")  # the warm-up + cosine learning rate: changed every step, or once per epoch
REGULARIZERS = ("smooth", "cskd")  # label smoothing alone; plus CS-KD (Yun et al., CVPR 2020)
_NO_VALUE = object()


class Opt(NamedTuple):
    """An option named in a message: ``name`` (Python) or its flag (command line), with an optional value."""

    name: str
    value: Any = _NO_VALUE


def render(parts: tuple[Any, ...], flags: Mapping[str, str] | None = None) -> str:
    """The text of a message made of strings and :class:`Opt`: ``name`` / ``name='value'`` without ``flags``;
    with them (field -> flag, default ``--field-name``) ``--flag`` / ``--flag value`` (a bool: the flag alone)."""
    out = []
    for p in parts:
        if not isinstance(p, Opt):
            out.append(str(p))
        elif flags is None:
            out.append(p.name if p.value is _NO_VALUE else f"{p.name}={p.value!r}")
        else:
            flag = flags.get(p.name, "--" + p.name.replace("_", "-"))
            out.append(flag if p.value is _NO_VALUE or isinstance(p.value, bool) else f"{flag} {p.value}")
    return "".join(out)


class OptionMessage:
    """Mixin of the exceptions whose message names options: ``str(exc)`` in Python terms, :meth:`render`
    in the command line's; ``field`` is the option at fault."""

    def __init__(self, field: str, *parts: Any) -> None:
        self.field, self.parts = field, parts
        super().__init__(render(parts))

    def render(self, flags: Mapping[str, str]) -> str:
        return render(self.parts, flags)


class ConfigError(OptionMessage, ValueError):
    """An invalid :class:`Config` value or combination; ``field`` names the option at fault."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Config:
    """One KE run. Defaults follow the paper (SGD 0.9, wd 1e-4, cosine with 5 warm-up epochs, label
    smoothing 0.1, KELS 0.5) except the sizes, which suit the bundled demo. Checked when made: a bad value
    raises :class:`ConfigError`."""

    split: str = "kels"
    split_rate: float = 0.5
    generations: int = 8
    epochs: int | tuple[int, ...] = 30  # per generation: one value, or one per generation
    batch_size: int = 32
    lr: float | tuple[float, ...] = 0.05  # peak learning rate: one value, or one per generation
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    label_smoothing: float = 0.1
    seed: int = 0
    evolve_mode: str = "rand"  # rand: re-draw H^R; zero: zero it; rewind: back to its generation-0 values
    init: str = "kaiming_normal"  # initial weights (drawn from the counter RNG, so "rewind" needs no copy)
    reset_init: str = "kaiming_uniform_a_sqrt5"  # the official KE reset
    resample_mask: bool = False  # WELS: a new mask every generation (drawn, or re-chosen by mask_criterion)
    reset_bn: bool = False  # reset BatchNorm affine/statistics of reset channels too
    task: str = "classify"  # a name in ke_fast.tasks.TASKS: classify, metric, regression
    reset_from: str | None = None  # layer-threshold forgetting: keep the layers before it, reset it and after
    mask_criterion: str = "random"  # WELS fit mask: random, or the top-k by "magnitude" / "snip" (ke_fast.variants)
    amp: bool | None = None  # bf16 autocast: None = on for CUDA only, True = on any device, False = off
    channels_last: bool | None = None  # None = on for CUDA
    schedule: str = "step"  # "epoch": the lr changes once per epoch, as the official KE code (ke_fast.recipes)
    regularizer: str = "smooth"  # "cskd": plus class-wise self-knowledge distillation on same-class pairs
    val_every: int = 0  # epochs between evaluations on the validation split while training (0: never)
    graphs: bool | None = None  # the training step as one CUDA graph (ke_fast.step); None: automatic (off)
    recipe: str | None = None  # the recipe (ke_fast.recipes) the defaults came from, recorded with the run

    def epochs_in(self, generation: int) -> int:
        """The epochs of ``generation`` (1-based)."""
        return self.epochs if isinstance(self.epochs, int) else self.epochs[generation - 1]

    def lr_in(self, generation: int) -> float:
        """The peak learning rate of ``generation`` (1-based)."""
        return self.lr[generation - 1] if isinstance(self.lr, (tuple, list)) else self.lr

    @property
    def total_epochs(self) -> int:
        """The epochs of every generation together (what the compute-matched baseline trains)."""
        return sum(self.epochs_in(g) for g in range(1, self.generations + 1))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "Config":
        """Check every field and combination; returns self. Raises ConfigError naming the field."""
        from .tasks import TASKS  # the registry imports nothing of the config; here to keep the arrow one way

        def fail(field: str, *parts: Any) -> None:
            raise ConfigError(field, *parts)

        if self.split not in SPLITS:
            fail("split", Opt("split"), f" must be 'kels' or 'wels', got {self.split!r}")
        try:
            K.check_split_rate(self.split_rate)
        except (TypeError, ValueError):
            fail("split_rate", Opt("split_rate"), f" must be a number in (0, 1], got {self.split_rate!r}")
        for name in ("generations", "batch_size"):
            if not _int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, Opt(name), f" must be a positive int, got {getattr(self, name)!r}")
        for name, ok, what in (("epochs", lambda v: _int(v) and v >= 1, "a positive int"),
                               ("lr", lambda v: _real(v) and v > 0, "a finite number > 0")):
            value = getattr(self, name)
            if isinstance(value, list):  # JSON / a caller's list: kept as a tuple (hashable, compared equal)
                value = tuple(value)
                setattr(self, name, value)
            values = value if isinstance(value, tuple) else (value,)
            if not values or not all(ok(v) for v in values):
                fail(name, Opt(name), f" must be {what}, or one per generation, got {value!r}")
            if isinstance(value, tuple) and len(value) != self.generations:
                fail(name, Opt(name), f" must hold one value per generation ({self.generations}), got {len(value)}: "
                                      f"{','.join(map(str, value))}")
        for name in ("momentum", "weight_decay"):
            if not (_real(getattr(self, name)) and getattr(self, name) >= 0):
                fail(name, Opt(name), f" must be a finite number >= 0, got {getattr(self, name)!r}")
        if not _int(self.warmup_epochs) or self.warmup_epochs < 0:
            fail("warmup_epochs", Opt("warmup_epochs"), f" must be an int >= 0, got {self.warmup_epochs!r}")
        if not (_real(self.label_smoothing) and 0 <= self.label_smoothing <= 1):
            fail("label_smoothing", Opt("label_smoothing"), f" must be in [0, 1], got {self.label_smoothing!r}")
        if not _int(self.seed) or not 0 <= self.seed < 2 ** 64:
            fail("seed", Opt("seed"), f" must be in 0 .. 2^64-1, got {self.seed!r}")
        if self.evolve_mode not in EVOLVE_MODES:
            fail("evolve_mode", Opt("evolve_mode"), f" must be one of {EVOLVE_MODES}, got {self.evolve_mode!r}")
        for name in ("init", "reset_init"):
            if getattr(self, name) not in K.SCHEMES:
                fail(name, Opt(name), f" must be one of {K.SCHEMES}, got {getattr(self, name)!r}")
        if self.task not in TASKS:
            fail("task", Opt("task"), f" must be one of {tuple(TASKS)}, got {self.task!r}")
        if self.reset_from is not None and (not isinstance(self.reset_from, str) or not self.reset_from):
            fail("reset_from", Opt("reset_from"), f" must be None or a layer name / module prefix, got "
                                                  f"{self.reset_from!r}")
        if self.mask_criterion not in MASK_CRITERIA:
            fail("mask_criterion", Opt("mask_criterion"), f" must be one of {MASK_CRITERIA}, got "
                                                          f"{self.mask_criterion!r}")
        if self.mask_criterion != "random" and self.split != "wels":
            fail("mask_criterion", Opt("mask_criterion", self.mask_criterion), " applies to ", Opt("split", "wels"),
                 " only (KELS masks are whole channels, fixed by the graph)")
        for name in ("resample_mask", "reset_bn"):
            if not isinstance(getattr(self, name), bool):
                fail(name, Opt(name), f" must be True or False, got {getattr(self, name)!r}")
        if self.resample_mask and self.split != "wels":
            fail("resample_mask", Opt("resample_mask"), " applies to ", Opt("split", "wels"),
                 " only (KELS masks follow the channels and never change)")
        for name, choices in (("schedule", SCHEDULES), ("regularizer", REGULARIZERS)):
            if getattr(self, name) not in choices:
                fail(name, Opt(name), f" must be one of {choices}, got {getattr(self, name)!r}")
        if self.regularizer == "cskd" and self.task != "classify":
            fail("regularizer", Opt("regularizer", "cskd"), " applies to ", Opt("task", "classify"), " only")
        if not _int(self.val_every) or self.val_every < 0:
            fail("val_every", Opt("val_every"), f" must be an int >= 0 (0: never while training), got "
                                                f"{self.val_every!r}")
        if self.recipe is not None and self.recipe not in RECIPE_NAMES:
            fail("recipe", Opt("recipe"), f" must be None or one of {RECIPE_NAMES}, got {self.recipe!r}")
        for name in ("amp", "channels_last", "graphs"):
            if getattr(self, name) not in (None, True, False):
                fail(name, Opt(name), f" must be None (automatic), True or False, got {getattr(self, name)!r}")
        return self
