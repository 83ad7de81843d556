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

INITS = ("kaiming_normal", "kaiming_uniform", "signed_constant", "xavier_normal", "xavier_constant")
# Glorot & Bengio 2010 (gain 1), as hidden-networks' utils/builder.py: their std takes no scale_fan.
XAVIER = ("xavier_normal", "xavier_constant")
RELU_GAIN = math.sqrt(2.0)


def layer_generator(seed: int, name: str, stream: str = "weight") -> torch.Generator:
    """A CPU generator for one tensor of one layer, independent of every other tensor."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(f"{name}/{stream}".encode())) % (2**63))
    return g


def fan_in(shape) -> int:
    """Inputs per output unit of a weight of shape (out, in, *kernel): in * prod(kernel)."""
    return int(math.prod(shape[1:]))


def fan_out(shape) -> int:
    """Outputs per input unit of a weight of shape (out, in, *kernel): out * prod(kernel)."""
    return int(shape[0] * math.prod(shape[2:]))


def xavier_std(shape) -> float:
    """Xavier (Glorot) normal standard deviation: sqrt(2 / (fan_in + fan_out)), gain 1."""
    return math.sqrt(2.0 / (fan_in(shape) + fan_out(shape)))


def weight_std(shape, k: float = 1.0, scale_fan: bool = False) -> float:
    """Kaiming (fan_in, ReLU) standard deviation; with scale_fan the fan is k * fan_in, because a
    subnetwork keeping a k fraction sees only that fraction of its inputs."""
    fan = fan_in(shape) * (k if scale_fan else 1.0)
    return RELU_GAIN / math.sqrt(fan)


def hn_scale_fan_factor(init: str, k: float) -> float:
    """What turns a weight drawn here with scale_fan into hidden-networks' (utils/builder.py): its
    fan is fan_in * (1 - prune_rate), its prune_rate being the fraction kept (k), where ours is
    fan_in * k (the paper's formula; their issue #9). kaiming_normal and signed_constant: std
    gain / sqrt(fan_in * (1 - k)) there, gain / sqrt(fan_in * k) here, factor sqrt(k / (1 - k));
    kaiming_uniform and the xavier inits take no scale_fan there (factor sqrt(k), undoing ours,
    and 1). Raises ValueError for k >= 1 (their fan is 0)."""
    if not 0 < k < 1:
        raise ValueError(f"hidden-networks' scale_fan needs 0 < k < 1, got {k}")
    if init in XAVIER:
        return 1.0
    return math.sqrt(k) if init == "kaiming_uniform" else math.sqrt(k / (1 - k))


def init_weight(shape, init: str, generator: torch.Generator, k: float = 1.0,
                scale_fan: bool = False) -> torch.Tensor:
    """A float32 CPU tensor of the given shape drawn with one of INITS: kaiming_normal
    N(0, std^2), kaiming_uniform U(-sqrt(3) std, sqrt(3) std), signed_constant +-std (std:
    weight_std with k and scale_fan); xavier_normal N(0, xavier_std^2) and xavier_constant
    +-xavier_std with random signs, which ignore k and scale_fan as hidden-networks' builder does.
    Raises ValueError for another init."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    std = xavier_std(shape) if init in XAVIER else weight_std(shape, k, scale_fan)
    if init == "kaiming_uniform":
        bound = math.sqrt(3.0) * std
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    w = torch.randn(shape, generator=generator) * std
    if init in ("signed_constant", "xavier_constant"):
        # Each weight is +-std: the sign of a normal draw, the magnitude of its standard deviation.
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
