"""The architectures of the papers, as ordinary nn.Modules without biases.

``build(name, input_shape, num_classes, width)`` returns a plain dense model; ``supermask.convert``
turns it into a supermask model. Keeping one definition for both is what makes "dense baseline of
the same architecture" exact.
"""
from __future__ import annotations

import math

import torch.nn as nn

MODELS = ("fc", "conv2", "conv4", "conv6", "conv8", "resnet18", "resnet50", "wide_resnet50_2")


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def fc(input_shape, num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """LeNet-300-100 (Frankle & Carbin's MNIST net), hidden sizes times width."""
    h1, h2 = scaled(300, width), scaled(100, width)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), h1, bias=False), nn.ReLU(),
                         nn.Linear(h1, h2, bias=False), nn.ReLU(), nn.Linear(h2, num_classes, bias=False))


def conv(depth: int, input_shape, num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """Conv2/4/6/8: pairs of 3x3 convs (64, 128, 256, 512 channels) each followed by a 2x2 max
    pool, then FC 256-256-classes; every channel and unit count times width."""
    layers, in_ch, (_, h, w) = [], input_shape[0], input_shape
    for stage in range(depth // 2):
        out_ch = scaled(64 * 2**stage, width)
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.ReLU(),
                   nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2)]
        in_ch, h, w = out_ch, h // 2, w // 2
    hidden = scaled(256, width)
    layers += [nn.Flatten(), nn.Linear(in_ch * h * w, hidden, bias=False), nn.ReLU(),
               nn.Linear(hidden, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, num_classes, bias=False)]
    return nn.Sequential(*layers)


def resnet18(input_shape, num_classes: int = 10, width: float = 1.0, depth: int = 18,
             width_per_group: int = 64) -> nn.Module:
    """torchvision's ResNet-18 (depth 50: ResNet-50, with width_per_group 128: Wide ResNet-50-2)
    with every channel count times width and a bias-free classifier; on small images (<= 64 px)
    the CIFAR stem: a 3x3 stride-1 first conv and no max pool."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: PLC0415

    block, layers = (BasicBlock, [2, 2, 2, 2]) if depth == 18 else (Bottleneck, [3, 4, 6, 3])

    class ScaledResNet(ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # the first stage starts from the (scaled) stem
                self.inplanes = scaled(64, width)
            return super()._make_layer(block, scaled(planes, width), blocks, stride, dilate)

    model = ScaledResNet(block, layers, num_classes=num_classes, width_per_group=width_per_group)
    stem, small = scaled(64, width), input_shape[-1] <= 64
    model.conv1 = nn.Conv2d(input_shape[0], stem, 3 if small else 7, 1 if small else 2,
                            1 if small else 3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    if small:
        model.maxpool = nn.Identity()
    model.fc = nn.Linear(scaled(512, width) * block.expansion, num_classes, bias=False)
    return model


def build(name: str, input_shape, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if name == "fc":
        return fc(input_shape, num_classes, width)
    if name == "resnet18":
        return resnet18(input_shape, num_classes, width)
    if name == "resnet50":
        return resnet18(input_shape, num_classes, width, depth=50)
    if name == "wide_resnet50_2":
        return resnet18(input_shape, num_classes, width, depth=50, width_per_group=128)
    return conv(int(name[4:]), input_shape, num_classes, width)
