"""Turn an ordinary model into a supermask model, torch.nn.utils.prune style.

``convert(model, k)`` replaces every nn.Linear / nn.Conv2d by a supermask layer of the same shape
(stride, padding, dilation, groups kept; biases dropped) and every BatchNorm by a non-affine one.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import ops
from .layers import MASK_KINDS, NonAffineBatchNorm, SupermaskConv2d, SupermaskLinear, supermask_layers
from .mask import global_thresholds

TOPK_SCOPES = ("layer", "global")


def _replacement(name: str, m: nn.Module, k, init, scale_fan, seed):
    kw = dict(k=k, init=init, scale_fan=scale_fan, seed=seed, name=name,
              device=m.weight.device if hasattr(m, "weight") and m.weight is not None else None)
    if isinstance(m, SupermaskLinear | SupermaskConv2d):
        return None
    if isinstance(m, nn.Linear):
        return SupermaskLinear(m.in_features, m.out_features, **kw)
    if isinstance(m, nn.Conv2d):
        return SupermaskConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                               m.dilation, m.groups, m.padding_mode, **kw)
    if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and not isinstance(m, NonAffineBatchNorm):
        return NonAffineBatchNorm(m.num_features, m.eps, m.momentum if m.momentum is not None else 0.1,
                                  m.track_running_stats, device=kw["device"])
    return None


def convert(model: nn.Module, k: float = 0.5, init: str = "signed_constant", scale_fan: bool = False,
            seed: int | None = 0, topk: str = "layer", inplace: bool = False,
            skip: tuple[str, ...] = (), mask: str = "topk") -> nn.Module:
    """Make model a supermask model (a copy unless inplace). With a seed, weights and scores are
    generated deterministically per layer name; seed=None draws from torch's global RNG.
    Module names in ``skip`` are left as they are (e.g. a dense first layer). mask="sampled" gives
    Bernoulli(sigmoid(score)) masks instead of edge-popup's top-k."""
    if topk not in TOPK_SCOPES:
        raise ValueError(f"topk must be one of {TOPK_SCOPES}, got {topk!r}")
    if mask not in MASK_KINDS:
        raise ValueError(f"mask must be one of {MASK_KINDS}, got {mask!r}")
    if not inplace:
        model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in skip:
                continue
            new = _replacement(full, child, k, init, scale_fan, seed)
            if new is not None:
                setattr(module, child_name, new)
    for _, layer in supermask_layers(model):
        layer.mask_kind = mask
    if topk == "global" and mask == "topk":
        use_global_topk(model, k)
    return model


class _GlobalTopK:
    """Forward pre-hook: one threshold across all supermask layers, computed once per forward."""

    def __init__(self, k: float):
        self.k = k
        self._key = None

    def __call__(self, model, args):
        layers = [m for _, m in supermask_layers(model)]
        key = tuple((m.scores._version, m.scores.data_ptr()) for m in layers) + (self.k,)
        if model.training or torch.is_grad_enabled() or key != self._key:
            select = global_thresholds
            if layers and ops._choose(layers[0].scores) == "triton":  # the radix-select kernel, same answer
                from .kernels import global_thresholds as select  # noqa: PLC0415
            for m, t in zip(layers, select([m.scores for m in layers], self.k)):
                m.shared_threshold = t
            self._key = key


def use_global_topk(model: nn.Module, k: float) -> nn.Module:
    """Switch model to one global top-k threshold over all its supermask layers."""
    for _, m in supermask_layers(model):
        m.k = k
    hook = _GlobalTopK(k)
    model._supermask_global_hook = model.register_forward_pre_hook(hook)
    return model


BACKENDS = ("torch", "cpu", "triton")


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Which implementation the supermask ops run, for the --backend flag. The device of the tensors
    picks the kernels (C kernels on the CPU, Triton on CUDA); this only forces one, process-wide
    (``supermask.ops.use_path``): "torch" the reference path (plain torch, the ground truth);
    "cpu" the default, raising CPUKernelsUnavailable when the C kernels do not build; "triton" the
    Triton kernels, on CPU tensors too when Triton's interpreter is on (TRITON_INTERPRET=1).
    Returns model unchanged. Raises ValueError for another name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu":
        from . import cpu_kernels  # noqa: PLC0415

        if not cpu_kernels.available():
            raise cpu_kernels.CPUKernelsUnavailable(cpu_kernels.why_unavailable())
    ops.use_path({"torch": "reference", "cpu": "auto", "triton": "triton"}[backend])
    return model
