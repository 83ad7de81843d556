"""Weight and score initialisations, generated deterministically.

Every tensor is drawn on the CPU in float32 from a generator seeded by (seed, layer name), then
copied to the layer's device and dtype. The same seed therefore gives bit-identical weights on any
device, whatever the global RNG state: a supermask is fully described by its config, its seed and
one bit per weight.
"""
from __future__ import annotations

import math
import zlib

import torch

INITS = ("kaiming_normal", "kaiming_uniform", "signed_constant")
RELU_GAIN = math.sqrt(2.0)


def layer_generator(seed: int, name: str, stream: str = "weight") -> torch.Generator:
    """A CPU generator for one tensor of one layer, independent of every other tensor."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(f"{name}/{stream}".encode())) % (2**63))
    return g


def fan_in(shape) -> int:
    return int(math.prod(shape[1:]))


def weight_std(shape, k: float = 1.0, scale_fan: bool = False) -> float:
    """Kaiming (fan_in, ReLU) standard deviation; with scale_fan the fan is k * fan_in, because a
    subnetwork keeping a k fraction sees only that fraction of its inputs."""
    fan = fan_in(shape) * (k if scale_fan else 1.0)
    return RELU_GAIN / math.sqrt(fan)


def init_weight(shape, init: str, generator: torch.Generator, k: float = 1.0,
                scale_fan: bool = False) -> torch.Tensor:
    """A float32 CPU tensor of the given shape drawn with one of INITS."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    std = weight_std(shape, k, scale_fan)
    if init == "kaiming_uniform":
        bound = math.sqrt(3.0) * std
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    w = torch.randn(shape, generator=generator) * std
    if init == "signed_constant":
        # Each weight is +-std: the sign of a Kaiming draw, the magnitude of its standard deviation.
        w = torch.where(w >= 0, std, -std)
    return w


def init_scores(shape, generator: torch.Generator) -> torch.Tensor:
    """Edge-popup's score init: Kaiming uniform with a=sqrt(5) (nn.Linear's default)."""
    s = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(s, a=math.sqrt(5), generator=generator)
    return s


@torch.no_grad()
def init_dense_(model: torch.nn.Module, init: str = "kaiming_normal", seed: int = 0) -> torch.nn.Module:
    """Draw every nn.Linear / nn.Conv2d weight of a dense model with one of INITS, deterministically
    per (seed, layer name), like the supermask layers."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            m.weight.copy_(init_weight(m.weight.shape, init, layer_generator(seed, name, "weight")))
            if m.bias is not None:
                m.bias.zero_()
    return model
