"""Training recipes: named sets of defaults for a run, as data in one place.

``official`` is the KE paper's recipe as its official code runs it (github.com/ahmdtaha/knowledge_evolution at
a3f2eb2; file:line citations beside each value), the default on image folders. ``demo`` is the small recipe
that trains the bundled digits in seconds, their default. A recipe only fills in what the command line did not
give: every flag overrides it. :func:`resolve` returns the effective values (the Config fields, plus the
model's ``width`` and the ``image_size``), which the run prints in one line and stores in summary.json.
"""
from __future__ import annotations

from typing import Any, Mapping

RECIPE_NAMES = ("official", "demo")

RECIPES: dict[str, dict[str, Any]] = {
    "official": dict(
        generations=5,          # train_KE_cls.py L211 num_generations "5"
        epochs=200,             # train_KE_cls.py L203 epochs 200
        batch_size=32,          # train_KE_cls.py L270 --batch_size 32
        lr=0.256,               # train_KE_cls.py L299 --lr 0.256
        momentum=0.9,           # train_KE_cls.py L268 --momentum 0.9
        weight_decay=1e-4,      # train_KE_cls.py L231-235: 1e-4, 5e-4 for VGG (VGG_WEIGHT_DECAY)
        label_smoothing=0.1,    # train_KE_cls.py L207 + L297 --label_smoothing 0.1
        warmup_epochs=5,        # train_KE_cls.py L261-264 cosine_lr, --warmup_length 5
        schedule="epoch",       # KE_model.py L96 lr_policy(epoch, iteration=None): once per epoch;
                                # utils/schedulers.py L39-46, L82-83 the warm-up + cosine formula
        val_every=10,           # configs/base_config.py L157 --test_interval 10 (KE_model.py L109)
        image_size=224,         # data/custom_dataset.py RandomResizedCrop(224) / CenterCrop(224)
        width=None,             # train_KE_cls.py L208 Split_ResNet18: the architecture's standard width
    ),
    "demo": dict(  # the bundled digits: a quarter-width ResNet-18, small-input stem, seconds per generation
        generations=8, epochs=30, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4, label_smoothing=0.1,
        warmup_epochs=5, schedule="step", val_every=0, image_size=224, width=16,
    ),
}
VGG_WEIGHT_DECAY = 5e-4  # train_KE_cls.py L231-233: split_alexnet / split_vgg11 / split_vgg11_bn
WIDTH_MODELS = ("resnet18", "resnet34", "resnet50", "vgg11_bn")  # the registry models whose width the recipe sets


def default_recipe(image_folder: bool) -> str:
    """The recipe a run takes when ``--recipe`` is not given: ``official`` on image folders, else ``demo``."""
    return "official" if image_folder else "demo"


def resolve(name: str, model: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The effective settings of recipe ``name`` for ``model``, each replaced by ``given`` where that holds a
    value that is not None (the command line's flags). ``width`` is None (the architecture's own) or an int,
    and only for :data:`WIDTH_MODELS`. Raises ValueError for an unknown recipe."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPE_NAMES}, got {name!r}")
    out = dict(RECIPES[name])
    if name == "official" and model.startswith("vgg"):
        out["weight_decay"] = VGG_WEIGHT_DECAY
    if model not in WIDTH_MODELS:
        out["width"] = None
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def describe(name: str, settings: Mapping[str, Any]) -> str:
    """The one line that states the effective recipe at the start of a run."""
    shown = ", ".join(f"{k} {'standard' if v is None else ','.join(map(str, v)) if isinstance(v, tuple) else v}"
                      for k, v in settings.items())
    return f"recipe {name}: {shown}"
