"""The architectures of the papers, as ordinary nn.Modules without biases.

``build(name, input_shape, num_classes, width)`` returns a plain dense model; ``supermask.convert``
turns it into a supermask model. Keeping one definition for both is what makes "dense baseline of
the same architecture" exact.
"""
from __future__ import annotations

import math

import torch.nn as nn

MODELS = ("fc", "conv2", "conv4", "conv6", "conv8", "conv4wide", "conv6wide", "resnet18", "cresnet18", "resnet50",
          "resnet101", "wide_resnet50_2", "wide_resnet101_2")
# The stages of torchvision's / hidden-networks' ResNets: (block, blocks per stage) by depth.
RESNET_STAGES = {18: ("basic", [2, 2, 2, 2]), 50: ("bottleneck", [3, 4, 6, 3]), 101: ("bottleneck", [3, 4, 23, 3])}


def scaled(channels: int, width: float) -> int:
    """channels * width, rounded to the nearest count (at least 1): our models' width."""
    return max(1, int(round(channels * width)))


def truncated(channels: int, width: float) -> int:
    """int(channels * width) (at least 1): hidden-networks' width_mult in Conv4Wide / Conv6Wide
    (models/frankle.py's scale), which truncates where scaled rounds (64 * 0.15: 9, not 10)."""
    return max(1, int(channels * width))


def fc(input_shape, num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """LeNet-300-100 (Frankle & Carbin's MNIST net), hidden sizes times width."""
    h1, h2 = scaled(300, width), scaled(100, width)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), h1, bias=False), nn.ReLU(),
                         nn.Linear(h1, h2, bias=False), nn.ReLU(), nn.Linear(h2, num_classes, bias=False))


def conv(depth: int, input_shape, num_classes: int = 10, width: float = 1.0, scale=scaled) -> nn.Sequential:
    """Conv2/4/6/8: pairs of 3x3 convs (64, 128, 256, 512 channels) each followed by a 2x2 max
    pool, then FC 256-256-classes; every channel and unit count times width, by scale (scaled:
    rounded; truncated: hidden-networks' Conv4Wide / Conv6Wide)."""
    layers, in_ch, (_, h, w) = [], input_shape[0], input_shape
    for stage in range(depth // 2):
        out_ch = scale(64 * 2**stage, width)
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.ReLU(),
                   nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2)]
        in_ch, h, w = out_ch, h // 2, w // 2
    hidden = scale(256, width)
    layers += [nn.Flatten(), nn.Linear(in_ch * h * w, hidden, bias=False), nn.ReLU(),
               nn.Linear(hidden, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, num_classes, bias=False)]
    return nn.Sequential(*layers)


def resnet(input_shape, num_classes: int = 10, width: float = 1.0, depth: int = 18,
           width_per_group: int = 64, cifar_stem: bool | None = None) -> nn.Module:
    """torchvision's ResNet of this depth (18, 50 or 101; with width_per_group 128: the Wide
    ResNet-50-2 / 101-2) with every channel count times width, BatchNorm (made non-affine by convert) and a
    bias-free classifier, as hidden-networks' models/resnet.py. cifar_stem: a 3x3 stride-1 first
    conv and no max pool (hidden-networks' models/resnet_cifar.py, its cResNet18); None: that stem
    on small images (<= 64 px), the ImageNet one (7x7 stride 2, 3x3 max pool) on larger ones.
    Raises KeyError for another depth."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: PLC0415

    kind, layers = RESNET_STAGES[depth]
    block = BasicBlock if kind == "basic" else Bottleneck

    class ScaledResNet(ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # the first stage starts from the (scaled) stem
                self.inplanes = scaled(64, width)
            return super()._make_layer(block, scaled(planes, width), blocks, stride, dilate)

    model = ScaledResNet(block, layers, num_classes=num_classes, width_per_group=width_per_group)
    stem = scaled(64, width)
    small = input_shape[-1] <= 64 if cifar_stem is None else cifar_stem
    model.conv1 = nn.Conv2d(input_shape[0], stem, 3 if small else 7, 1 if small else 2,
                            1 if small else 3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    if small:
        model.maxpool = nn.Identity()
    model.fc = nn.Linear(scaled(512, width) * block.expansion, num_classes, bias=False)
    return model


def resnet18(input_shape, num_classes: int = 10, width: float = 1.0, depth: int = 18,
             width_per_group: int = 64) -> nn.Module:
    """resnet(...) with the stem chosen by the input size (kept for its callers)."""
    return resnet(input_shape, num_classes, width, depth, width_per_group)


# name -> (depth, width_per_group, cifar_stem) of the ResNets
RESNETS = {"resnet18": (18, 64, None), "cresnet18": (18, 64, True), "resnet50": (50, 64, None),
           "resnet101": (101, 64, None), "wide_resnet50_2": (50, 128, None), "wide_resnet101_2": (101, 128, None)}


def build(name: str, input_shape, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """The dense network called name (one of MODELS) for inputs of input_shape (C, H, W) with
    num_classes outputs, every layer's channels/units times width (> 0). conv4wide / conv6wide
    are conv4 / conv6 with hidden-networks' truncating width (int(channels * width)); cresnet18
    is ResNet-18 with the CIFAR stem at any input size. Raises ValueError for an unknown name or
    a width <= 0."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if name == "fc":
        return fc(input_shape, num_classes, width)
    if name in RESNETS:
        depth, per_group, cifar_stem = RESNETS[name]
        return resnet(input_shape, num_classes, width, depth, per_group, cifar_stem)
    if name.endswith("wide"):
        return conv(int(name[4]), input_shape, num_classes, width, scale=truncated)
    return conv(int(name[4:]), input_shape, num_classes, width)
