"""The KE paper's architectures in torchvision's layout: ResNet-18/34/50, DenseNet-121/169, VGG-11-bn.

Module names, shapes and registration order are torchvision's, so a torchvision ``state_dict`` loads into
the model built with the same arguments (``in_channels=3`` and the default widths). The extra keyword
arguments (``in_channels``, ResNet ``stem`` / ``width``, DenseNet sizes, VGG ``width`` / ``hidden`` /
``pool``) only make smaller or small-image variants. Every model traces with ``torch.fx`` and modifies no
block input in place, so autograd through intermediate activations stays valid.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_STEMS = ("imagenet", "small")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias (BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _init(model: nn.Module, conv_mode: str = "fan_out", linear_std: float | None = None) -> None:
    """torchvision's initialisation: Kaiming-normal convs (ResNet / VGG: fan_out for ReLU; DenseNet: the
    defaults, fan_in), BN 1/0, zero conv biases; Linear weights N(0, linear_std) when given (VGG), else
    torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if conv_mode == "fan_out":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


# ---- ResNet --------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projected) shortcut."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # out of place: ``x`` may be needed by autograd or by a caller holding intermediate activations
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, ResNet v1.5), 1x1 expand, plus shortcut."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with torchvision's layout and an optional small-image stem.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks in each of the four stages.
        num_classes: size of the output of ``fc``.
        in_channels: number of input image channels.
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool) or ``"small"`` (3x3/1 conv, no pooling) for
            8x8 to 32x32 inputs.
        width: base channel count; stage ``i`` has ``width * 2**i`` planes.
        zero_init_residual: zero the last BN of every residual branch so each block starts as the identity.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], num_classes: int = 1000, *,
                 in_channels: int = 3, stem: str = "imagenet", width: int = 64, zero_init_residual: bool = False) -> None:
        super().__init__()
        if stem not in _STEMS:
            raise ValueError(f"stem must be one of {list(_STEMS)}, got {stem!r}")
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {len(layers)}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, width)
            self.maxpool = nn.Identity()  # keeps the module structure (and state_dict keys) of both stems alike
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        _init(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, *, in_channels: int = 3, stem: str = "imagenet", width: int = 64,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 (11,689,512 parameters at the defaults, as torchvision)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels=in_channels, stem=stem, width=width,
                  zero_init_residual=zero_init_residual)


def resnet34(num_classes: int = 1000, *, in_channels: int = 3, stem: str = "imagenet", width: int = 64,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-34 (21,797,672 parameters at the defaults, as torchvision)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels=in_channels, stem=stem, width=width,
                  zero_init_residual=zero_init_residual)


def resnet50(num_classes: int = 1000, *, in_channels: int = 3, stem: str = "imagenet", width: int = 64,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 v1.5 (25,557,032 parameters at the defaults, as torchvision)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels=in_channels, stem=stem, width=width,
                  zero_init_residual=zero_init_residual)


# ---- DenseNet ------------------------------------------------------------------------------------

class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (``bn_size * growth_rate`` maps) - BN-ReLU-3x3 conv (``growth_rate`` maps) on the
    concatenation of everything the block has computed so far."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)  # in place on the norm's fresh output, never on the concatenation
        self.conv1 = conv1x1(num_input_features, bn_size * growth_rate)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(bn_size * growth_rate, growth_rate)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        x = self.conv2(self.relu2(self.norm2(x)))
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; the output concatenates the block's input and every layer's output."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size,
                                                      drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool between dense blocks."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv1x1(num_input_features, num_output_features)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC in torchvision's layout (``features.conv0`` ... ``features.norm5``, ``classifier``).

    Args:
        block_config: dense layers per block.
        num_classes: size of the output of ``classifier``.
        in_channels: number of input image channels.
        growth_rate, num_init_features, bn_size, drop_rate: as torchvision's DenseNet.
    """

    def __init__(self, block_config: Sequence[int], num_classes: int = 1000, *, in_channels: int = 3,
                 growth_rate: int = 32, num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0) -> None:
        super().__init__()
        if not block_config or min(block_config) < 1 or min(growth_rate, num_init_features, bn_size) < 1:
            raise ValueError(f"block_config must list positive layer counts and growth_rate, num_init_features, "
                             f"bn_size be positive, got {tuple(block_config)}, {growth_rate}, {num_init_features}, "
                             f"{bn_size}")
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]))
        c = num_init_features
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, bn_size, growth_rate, drop_rate))
            c += n * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(c, c // 2))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, num_classes)
        _init(self, conv_mode="fan_in")
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(out, 1))


def densenet121(num_classes: int = 1000, *, in_channels: int = 3, growth_rate: int = 32, num_init_features: int = 64,
                bn_size: int = 4, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-121 (7,978,856 parameters at the defaults, as torchvision)."""
    return DenseNet((6, 12, 24, 16), num_classes, in_channels=in_channels, growth_rate=growth_rate,
                    num_init_features=num_init_features, bn_size=bn_size, drop_rate=drop_rate)


def densenet169(num_classes: int = 1000, *, in_channels: int = 3, growth_rate: int = 32, num_init_features: int = 64,
                bn_size: int = 4, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-169 (14,149,480 parameters at the defaults, as torchvision)."""
    return DenseNet((6, 12, 32, 32), num_classes, in_channels=in_channels, growth_rate=growth_rate,
                    num_init_features=num_init_features, bn_size=bn_size, drop_rate=drop_rate)


# ---- VGG -----------------------------------------------------------------------------------------

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # torchvision's configuration "A"


class VGG(nn.Module):
    """VGG in torchvision's layout: ``features`` (conv-BN-ReLU and max-pools, as indexed by torchvision),
    ``avgpool`` (adaptive, ``pool`` x ``pool``), ``classifier`` (Linear-ReLU-Dropout x 2, Linear)."""

    def __init__(self, cfg: Sequence[int | str], num_classes: int = 1000, *, in_channels: int = 3, width: int = 64,
                 hidden: int = 4096, pool: int = 7, dropout: float = 0.5) -> None:
        super().__init__()
        if min(width, hidden, pool) < 1 or not 0 <= dropout <= 1:
            raise ValueError(f"width, hidden and pool must be positive and dropout in [0, 1], got {width}, {hidden}, "
                             f"{pool}, {dropout}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = max(1, int(v) * width // 64)
                layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(c * pool * pool, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes))
        _init(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11_bn(num_classes: int = 1000, *, in_channels: int = 3, width: int = 64, hidden: int = 4096, pool: int = 7,
             dropout: float = 0.5) -> VGG:
    """VGG-11 with BatchNorm (132,868,840 parameters at the defaults, as torchvision). ``width`` scales every
    conv (64 -> torchvision's), ``hidden`` is the classifier's width."""
    return VGG(_VGG11, num_classes, in_channels=in_channels, width=width, hidden=hidden, pool=pool, dropout=dropout)
