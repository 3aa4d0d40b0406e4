"""Models for ``ke_fast``: a registry by name (timm's ``create_model`` seam) and ``MODULE:FUNCTION`` for any
network a user writes, the KE paper's architectures in torchvision's layout (:mod:`ke_fast.architectures`:
ResNet-18/34/50, DenseNet-121/169, VGG-11-bn), and small networks for tiny images: a DenseNet, an MLP, a
CNN.

Every model here is written in plain ``torch.nn`` with no data-dependent control flow, so all of them
trace with ``torch.fx``. None modifies a block's input in place, so autograd through any intermediate
activation stays valid (ReLUs acting on freshly computed tensors may still be in place, as in torchvision).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .architectures import (VGG, BasicBlock, Bottleneck, DenseNet, ResNet, conv1x1, conv3x3, densenet121,
                            densenet169, resnet18, resnet34, resnet50, vgg11_bn)

__all__ = [
    "BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "DenseNet", "densenet121",
    "densenet169", "VGG", "vgg11_bn", "DenseNetTiny", "MLP", "SmallCNN", "MODELS", "build_model", "check_model",
    "model_names", "model_options", "resolve",
]


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv3x3 producing ``growth`` maps, concatenated onto the input."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        # Not in place: the input is reused verbatim in the concatenation.
        self.relu = nn.ReLU()
        self.conv = conv3x3(in_channels, growth)

    def forward(self, x: Tensor) -> Tensor:
        new = self.conv(self.relu(self.norm(x)))
        return torch.cat([x, new], dim=1)


class _Transition(nn.Module):
    """BN-ReLU-1x1 conv-2x2 average pool between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = conv1x1(in_channels, out_channels)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.norm(x))))


class DenseNetTiny(nn.Module):
    """A small DenseNet-style network for tiny images.

    Args:
        num_classes: size of the output of ``classifier``.
        in_channels: number of input image channels.
        growth: channels added by each dense layer.
        layers_per_block: number of dense layers in each dense block; a
            transition (which halves spatial size) separates consecutive
            blocks, so an input needs at least ``2**(len-1)`` pixels per side.
        init_channels: output channels of the stem convolution.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        growth: int = 8,
        layers_per_block: Sequence[int] = (3, 3),
        init_channels: int = 16,
    ) -> None:
        super().__init__()
        if len(layers_per_block) == 0:
            raise ValueError("layers_per_block must name at least one block")
        self.stem = conv3x3(in_channels, init_channels)
        blocks: list[nn.Module] = []
        channels = init_channels
        for i, n_layers in enumerate(layers_per_block):
            for _ in range(n_layers):
                blocks.append(_DenseLayer(channels, growth))
                channels += growth
            if i != len(layers_per_block) - 1:
                # Halve channels as in DenseNet-BC so growth stays bounded.
                out = max(channels // 2, 1)
                blocks.append(_Transition(channels, out))
                channels = out
        self.features = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.stem(x))
        # In-place ReLU is safe here: ``self.norm`` output is a fresh tensor.
        x = self.relu(self.norm(x))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


class MLP(nn.Module):
    """Flatten, then a stack of Linear+ReLU layers, then a Linear ``classifier``.

    Args:
        in_features: number of features after flattening all but the batch dim.
        hidden: widths of the hidden layers (may be empty).
        num_classes: size of the output of ``classifier``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 128),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers.append(nn.Linear(prev, h))
            layers.append(nn.ReLU(inplace=True))
            prev = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(self.flatten(x)))


class SmallCNN(nn.Module):
    """A compact conv net for 8x8 images (e.g. sklearn digits).

    Layout: conv-BN-ReLU stem, a two-conv residual block, a strided
    conv-BN-ReLU that doubles channels, global average pool and a Linear ``fc``.

    Args:
        num_classes: size of the output of ``fc``.
        in_channels: number of input image channels.
        width: channels of the stem and residual block (doubled afterwards).
    """

    def __init__(self, num_classes: int = 10, *, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv3x3(width, width)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv4 = conv3x3(width, width * 2, stride=2)
        self.bn4 = nn.BatchNorm2d(width * 2)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 2, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(x)))
        out = self.bn3(self.conv3(out))
        x = self.relu(out + x)
        x = self.relu(self.bn4(self.conv4(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def mlp(num_classes: int = 10, in_channels: int | None = None, *, in_features: int | None = None,
        hidden: Sequence[int] = (256, 128)) -> MLP:
    """:class:`MLP` by the registry's arguments: ``in_features`` defaults to ``in_channels`` (flat inputs)."""
    features = in_features if in_features is not None else in_channels
    if features is None:
        raise ValueError("model 'mlp' needs in_features (or in_channels, for flat inputs)")
    return MLP(features, hidden=hidden, num_classes=num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "densenet121": densenet121,
    "densenet169": densenet169,
    "vgg11_bn": vgg11_bn,
    "densenet_tiny": DenseNetTiny,
    "mlp": mlp,
    "small_cnn": SmallCNN,
}


def model_names() -> list[str]:
    """The registered model names, sorted (what ``--model`` accepts besides ``MODULE:FUNCTION``)."""
    return sorted(MODELS)


def resolve(name: str) -> Callable[..., nn.Module]:
    """The factory a model name stands for: a name of :data:`MODELS`, or ``"MODULE:FUNCTION"`` (as
    application strings in uvicorn / gunicorn: ``FUNCTION`` may be a dotted path inside the module, e.g.
    ``"mypkg.nets:Zoo.small"``; the current directory is importable, as for ``python -m``). Imports the
    module but builds nothing. Raises ValueError naming what is wrong: an unknown name, a malformed spec, a
    module that cannot be imported, a missing attribute, or one that is not callable."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise ValueError(f"unknown model name={name!r}; valid names are: {', '.join(model_names())}, or "
                         f"MODULE:FUNCTION for a network of your own (e.g. mypkg.nets:make_net)")
    module, _, attr = name.partition(":")
    if not module or not attr or ":" in attr or not all(p.isidentifier() for p in (*module.split("."), *attr.split("."))):
        raise ValueError(f"model {name!r}: expected MODULE:FUNCTION with dotted Python names, e.g. mypkg.nets:make_net")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module)
    except Exception as exc:  # not found, or the module itself failed (syntax, its own imports)
        raise ValueError(f"model {name!r}: cannot import module {module!r} ({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {name!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {name!r}: {attr!r} is a {type(obj).__name__}, not a function or class that builds "
                         f"an nn.Module")
    return obj


def model_options(name: str) -> list[str]:
    """The keyword arguments the factory of ``name`` accepts besides ``num_classes`` / ``in_channels`` (e.g.
    ``width`` for the ResNets and VGG: what a CLI may pass on), sorted; [] when it has no readable signature."""
    factory = resolve(name)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (e.g. a builtin)
        return []
    return sorted(p.name for p in params if p.name not in ("num_classes", "in_channels")
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_model(name: str) -> str:
    """Validate a ``--model`` value without building it (:func:`resolve`); returns it. Raises ValueError."""
    resolve(name)
    return name


def build_model(name: str, *, num_classes: int | None = None, in_channels: int | None = None,
                **kwargs: object) -> nn.Module:
    """Build the model ``name`` stands for (:func:`resolve`), called with ``num_classes`` and ``in_channels``
    when given (the factory's defaults otherwise) and ``kwargs``.

    Raises:
        ValueError: ``name`` cannot be resolved, or the factory does not accept these arguments.
        TypeError: the factory returned something that is not an ``nn.Module``.
    """
    factory = resolve(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} does not accept the arguments {sorted(kwargs)}: {exc}") from None
    except ValueError:  # no signature to read (e.g. a builtin): the call tells
        pass
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model
