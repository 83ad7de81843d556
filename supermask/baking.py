"""Deployable models: a trained supermask or IMP network baked into plain torch modules, and
torch.export of it (supermask.export writes the .pt2 file).
"""
from __future__ import annotations

import copy
import io

import torch
import torch.nn as nn

from .layers import NonAffineBatchNorm, SupermaskConv2d, SupermaskLinear, supermask_layers
from .parametrize import remove_masks


# ---------------------------------------------------------------------------------------------
# Deployable models


@torch.no_grad()
def bake(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of model made of plain torch.nn modules: every supermask layer an nn.Linear / nn.Conv2d
    holding weight * mask (eval-mode effective weight), every parametrized weight a plain Parameter
    holding weight * mask (supermask.parametrize.remove_masks), every NonAffineBatchNorm an
    nn.BatchNorm2d(affine=False) with its running statistics; with masks (IMP), weight * mask for
    those layers. Call prime(model) first for global top-k."""
    model.eval()
    effective = {name: layer.effective_weight().detach().clone() for name, layer in supermask_layers(model)}
    out = copy.deepcopy(model)
    hook = getattr(out, "_supermask_global_hook", None)
    if hook is not None:
        hook.remove()
        del out._supermask_global_hook
    out._forward_pre_hooks.clear()
    for parent_name, parent in list(out.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = None
            if isinstance(child, SupermaskLinear):
                new = nn.Linear(child.in_features, child.out_features, bias=False)
            elif isinstance(child, SupermaskConv2d):
                new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                child.padding, child.dilation, child.groups, bias=False,
                                padding_mode=child.padding_mode)
            elif isinstance(child, NonAffineBatchNorm):
                new = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, affine=False,
                                     track_running_stats=child.track_running_stats)
                new.load_state_dict(child.state_dict())
            if isinstance(new, nn.Linear | nn.Conv2d):
                new.weight.copy_(effective[full])
                new.weight.requires_grad_(False)
            if new is not None:
                setattr(parent, child_name, new.eval())
    remove_masks(out)  # parametrized weights (convert's safe path, weights="keep"): plain weight * mask
    for name, mask in (masks or {}).items():
        layer = out.get_submodule(name)
        layer.weight.mul_(mask.to(layer.weight.dtype))
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()


def deployable(model: nn.Module, masks: dict[str, torch.Tensor] | None, bake_masks: bool = False,
               baked: nn.Module | None = None) -> nn.Module:
    """What the .pt2 holds: the supermask model itself in eval mode (per-layer top-k supermasks, whose
    ops export as they are), else (bake_masks, IMP masks, global top-k: a model-level hook) the baked
    model: plain layers holding weight * mask, loadable with torch alone (baked: bake(model, masks)
    when the caller has it already)."""
    if (not bake_masks and masks is None and supermask_layers(model)
            and getattr(model, "_supermask_global_hook", None) is None):
        return model.eval()
    return baked if baked is not None else bake(model, masks)


def export_program(model: nn.Module, input_shape):
    """torch.export's program of a model in eval mode, with a dynamic batch dimension."""
    example = torch.zeros((2, *input_shape))
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def fp32_state_dict_bytes(model: nn.Module) -> int:
    """Size of torch.save(state_dict) of the inference network in float32 (weights and buffers)."""
    buf = io.BytesIO()
    torch.save({k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}, buf)
    return buf.getbuffer().nbytes
