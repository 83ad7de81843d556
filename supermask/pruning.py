"""Magnitude pruning of ordinary nn.Modules (the machinery behind lottery tickets / IMP).

In the spirit of ``torch.nn.utils.prune``, but the weights stay plain parameters (state_dicts load
into an unpruned model of the same architecture) and the masks are kept beside them as
``{module name: bool tensor}``:

    masks = full_masks(model)                                     # nothing pruned yet
    masks = magnitude_masks(model, masks, rate=0.2, scope="layer") # drop 20% of what remains
    keeper = MaskKeeper(model, masks)     # gradients masked; keeper.enforce(model) re-zeroes
    rewind_(model, init_state, masks)     # survivors back to their stored values, pruned at 0

Which weights go is exact and deterministic: a layer with n surviving weights loses
``round(rate * n)`` of them, those of smallest |w|; among equal |w| the higher flat index goes
first (the same tie rule as supermask.mask: what a stable descending sort keeps). Global scope
pools every layer but the output layer under one threshold, ties handed out in layer order.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from .init import init_weight, layer_generator
from .mask import mask_from_threshold, topk_threshold

SCOPES = ("layer", "global")
Masks = dict[str, torch.Tensor]


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear / nn.Conv2d, in registration order (the last one is the
    output layer in every model of supermask.models)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def output_layer(model: nn.Module) -> str:
    """The name of the model's last prunable layer (its output layer)."""
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("model has no Linear or Conv2d layer to prune")
    return layers[-1][0]


def full_masks(model: nn.Module) -> Masks:
    """All-True masks (the dense network) for every prunable layer."""
    return {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in prunable_layers(model)}


def num_to_prune(remaining: int, rate: float) -> int:
    """How many of `remaining` weights a round at `rate` removes: round half up, never all."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"prune rate must be in [0, 1), got {rate}")
    return min(max(0, remaining - 1), int(math.floor(rate * remaining + 0.5)))


def _keep_largest(magnitudes: torch.Tensor, alive: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask keeping the n_keep entries of largest magnitude among `alive` (flat order ties)."""
    if n_keep <= 0:
        return torch.zeros_like(alive)
    # Dead weights get magnitude -1 (< any |w|), so they are never picked while alive ones remain.
    scored = torch.where(alive, magnitudes.float(), torch.full_like(magnitudes, -1.0, dtype=torch.float32))
    return mask_from_threshold(scored, topk_threshold(scored, n_keep)) & alive


@torch.no_grad()
def magnitude_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None, rate: float = 0.2,
                    scope: str = "layer", output_rate: float | None = None) -> Masks:
    """New masks pruning `rate` of the weights each mask still keeps, those of smallest |weight|.

    The output layer is pruned at `output_rate` (default rate / 2, as Frankle & Carbin do), on its
    own in both scopes. scope="layer": every other layer loses `rate` of its survivors;
    scope="global": they are pooled and lose `rate` of all their survivors together.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    output_rate = rate / 2 if output_rate is None else output_rate
    layers = prunable_layers(model)
    masks = full_masks(model) if masks is None else dict(masks)
    out_name = output_layer(model)
    new: Masks = {}
    pooled = []
    for name, m in layers:
        alive = masks[name].to(device=m.weight.device, dtype=torch.bool)
        magnitudes = m.weight.detach().abs()
        if name == out_name or scope == "layer":
            n_alive = int(alive.sum())
            r = output_rate if name == out_name else rate
            new[name] = _keep_largest(magnitudes, alive, n_alive - num_to_prune(n_alive, r))
        else:
            pooled.append((name, magnitudes, alive))
    if pooled:
        flat_mag = torch.cat([mag.reshape(-1) for _, mag, _ in pooled])
        flat_alive = torch.cat([a.reshape(-1) for _, _, a in pooled])
        n_alive = int(flat_alive.sum())
        keep = _keep_largest(flat_mag, flat_alive, n_alive - num_to_prune(n_alive, rate))
        start = 0
        for name, mag, _ in pooled:
            new[name] = keep[start:start + mag.numel()].reshape(mag.shape)
            start += mag.numel()
    return {name: new[name].cpu() for name, _ in layers}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Set every pruned weight to exactly zero (0.0, also where it was inf or nan)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        w = modules[name].weight
        w.masked_fill_(~mask.to(device=w.device, dtype=torch.bool), 0.0)
    return model


class MaskKeeper:
    """Keeps pruned weights at exactly zero while a model trains.

    A gradient hook zeroes the gradient of every pruned weight, so its momentum / Adam moments stay
    zero and, the weight being zero, its weight decay (decoupled or not) is zero too: the optimiser
    never moves it. ``enforce(model)`` (pass it as training.train's after_step) re-zeroes them
    after each step as well, which makes the guarantee independent of the optimiser.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        modules = dict(model.named_modules())
        self.masks = {}
        self.handles = []
        for name, mask in masks.items():
            w = modules[name].weight
            keep = mask.to(device=w.device, dtype=w.dtype)
            self.masks[name] = mask.to(device=w.device, dtype=torch.bool)
            self.handles.append(w.register_hook(lambda g, keep=keep: g * keep))
        apply_masks_(model, self.masks)

    def enforce(self, model: nn.Module):
        """Zero the pruned weights again (after an optimiser step)."""
        apply_masks_(model, self.masks)

    def __call__(self, model: nn.Module):
        self.enforce(model)

    def remove(self):
        """Remove the gradient hooks; the weights stay as they are."""
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def rewind_(model: nn.Module, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None):
    """Load a stored state_dict (weights at initialisation or at the rewind iteration) bit for bit,
    then zero the pruned weights."""
    model.load_state_dict(state)
    if masks is not None:
        apply_masks_(model, masks)
    return model


@torch.no_grad()
def reinit_(model: nn.Module, init: str, seed: int, stream: str = "reinit") -> nn.Module:
    """Fresh weights for every prunable layer, deterministic per (seed, layer, stream) and
    independent of the original initialisation (the "random reinitialisation" control)."""
    for name, m in prunable_layers(model):
        m.weight.copy_(init_weight(m.weight.shape, init, layer_generator(seed, name, stream)))
    return model


def random_masks_like(masks: Mapping[str, torch.Tensor], seed: int, stream: str = "random-mask") -> Masks:
    """A uniformly random mask per layer keeping exactly as many weights as the given one."""
    out = {}
    for name, mask in masks.items():
        n, kept = mask.numel(), int(mask.sum())
        order = torch.randperm(n, generator=layer_generator(seed, name, stream))
        flat = torch.zeros(n, dtype=torch.bool)
        flat[order[:kept]] = True
        out[name] = flat.reshape(mask.shape)
    return out


def sparsity(masks: Mapping[str, torch.Tensor]) -> dict:
    """{"kept", "total", "weights_remaining" (%), "layers": {name: [kept, total]}}."""
    layers = {name: [int(m.sum()), m.numel()] for name, m in masks.items()}
    kept = sum(k for k, _ in layers.values())
    total = sum(t for _, t in layers.values())
    return {"kept": kept, "total": total, "weights_remaining": 100.0 * kept / max(1, total), "layers": layers}
