"""Supermask masking of any weight tensor through ``torch.nn.utils.parametrize``.

``mask_parameter(module, "weight", ...)`` makes every read of ``module.weight`` return
``weight * mask`` (edge-popup, Ramanujan et al. 2020: the mask keeps the top-k fraction of |scores|,
gradient straight through to the scores), whoever reads it: the module's own forward, a parent
that passes ``self.qkv.weight`` to a functional attention (torchvision's Swin), or
``nn.MultiheadAttention`` reading ``in_proj_weight`` and ``out_proj.weight``. It is the safe path
of ``supermask.convert``; the fused ``SupermaskLinear`` / ``SupermaskConv2d`` serve layers whose
weight only their own forward reads.

The mask comes from the project's one mask definition (``supermask.mask`` through
``SupermaskMixin``): per-layer top-k, global top-k (``shared_threshold``), sampled masks, and
the C kernels, Triton kernels and reference path (``supermask.ops``) work as in the fast layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .init import init_scores, init_weight, layer_generator
from .layers import SupermaskMixin


class SupermaskParametrization(SupermaskMixin, nn.Module):
    """The parametrization ``original -> original * mask(scores)`` of one weight tensor.

    Holds ``scores`` (a Parameter of the weight's shape and dtype, the only trained tensor) and
    the mask settings of ``SupermaskMixin`` (k, shared_threshold, mask_kind). ``weight``
    is the frozen original tensor (``owner.parametrizations[tensor_name].original``), so
    ``mask()``, ``effective_weight()`` and ``threshold()`` behave as on a fast supermask layer.

    One instance may parametrize several tensors that are the same Parameter (tied weights):
    they then share one set of scores.

    ``transposed=True`` is for a 2-D weight stored (in_features, out_features), as Hugging Face
    ``transformers.pytorch_utils.Conv1D`` (GPT-2) stores it: weight and scores are drawn for the
    (out, in) shape of the nn.Linear it stands for (fan_in = weight.shape[0]) and transposed, so it
    gets exactly the numbers an nn.Linear of that name and seed would, transposed.
    """

    def __init__(self, owner: nn.Module, tensor_name: str, k: float = 0.5, init: str = "signed_constant",
                 scale_fan: bool = False, seed: int | None = None, name: str = "", transposed: bool = False):
        nn.Module.__init__(self)
        self.transposed = transposed
        # A plain attribute, not a submodule: the owner holds this module (a cycle in the module tree
        # would recurse forever in state_dict). deepcopy maps it to the copied owner through its memo.
        object.__setattr__(self, "_owner", owner)
        self.tensor_name = tensor_name
        self._setup_supermask(k, init, scale_fan, seed, name)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen original tensor (unmasked), any shape."""
        owner, name = self._owner, self.tensor_name
        if parametrize.is_parametrized(owner, name):
            return owner.parametrizations[name].original
        return owner._parameters[name]

    @torch.no_grad()
    def reinitialize(self, init: str = "signed_constant", scale_fan: bool = False,
                     seed: int | None = None, name: str = ""):
        """Draw weight and scores again (as SupermaskMixin.reinitialize; transposed: see the class)."""
        if not getattr(self, "transposed", False):
            return super().reinitialize(init, scale_fan, seed, name)
        if self.weight.dim() != 2:
            raise ValueError(f"transposed=True needs a 2-D weight, got shape {tuple(self.weight.shape)}")
        if seed is None:
            gw = gs = torch.default_generator
        else:
            gw, gs = layer_generator(seed, name, "weight"), layer_generator(seed, name, "scores")
        shape = tuple(self.weight.shape)[::-1]  # (out, in): the nn.Linear's
        self.weight.copy_(init_weight(shape, init, gw, self.k, scale_fan).T)
        self.scores.copy_(init_scores(shape, gs).T)
        return None

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        """What reading the parametrized tensor returns: original * mask, of original's shape and
        dtype (``effective_weight()``; gradient straight through to the scores, none to original).
        Raises ValueError when the scores hold NaN (supermask.mask.NAN_MESSAGE)."""
        # `original` is self.weight; the mixin reads it itself (its fast paths key on the layer).
        return self.effective_weight()

    def extra_repr(self) -> str:
        """The masked tensor's shape and the mask: ``(768, 768), k=0.5`` (top-k, k the fraction kept)
        or ``(768, 768), mask=sampled, eval=expected``."""
        mask = f"k={self.k}" if self.mask_kind == "topk" else f"mask=sampled, eval={self.sampled_eval}"
        return f"{tuple(self.weight.shape)}, {mask}"


def mask_parameter(modules: list[tuple[nn.Module, str]], k: float = 0.5, init: str = "signed_constant",
                   scale_fan: bool = False, seed: int | None = None, name: str = "",
                   transposed: bool = False) -> SupermaskParametrization:
    """Mask the tensor ``getattr(module, tensor_name)`` of every (module, tensor_name) pair; all pairs
    must hold the same Parameter (one pair unless the weight is tied). The weight is redrawn with
    ``init`` (deterministic per ``seed`` and ``name``, see supermask.init) and frozen; one
    SupermaskParametrization (one scores tensor) serves every pair and is returned. transposed: the
    weight is stored (in, out) like transformers' Conv1D (see SupermaskParametrization). Raises
    ValueError when the pairs do not hold one Parameter, or for transposed with a weight not 2-D."""
    owner, tensor_name = modules[0]
    param = getattr(owner, tensor_name)
    if any(m._parameters.get(t) is not param for m, t in modules):
        raise ValueError("mask_parameter: the (module, name) pairs do not hold one Parameter")
    p = SupermaskParametrization(owner, tensor_name, k, init, scale_fan, seed, name, transposed)
    for m, t in modules:
        # unsafe: skip parametrize's trial forward (the shape and dtype are those of the weight).
        parametrize.register_parametrization(m, t, p, unsafe=True)
    return p
