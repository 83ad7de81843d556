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

Masks over kept (pretrained) weights (``keeps_weight``, ``convert(weights="keep")``): the weight is
not redrawn, only scores are drawn. The threshold style (``use_threshold``; Mallya et al. 2018,
"Piggyback"; Zhao et al. 2020, "Masking as an efficient alternative to finetuning") is one more
selection policy beside top-k: the ``Threshold`` is a fixed value instead of the k-th largest
|score|, and the mask and its straight-through gradient are those of ``supermask.ops.masked_weight_at``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from . import ops
from .init import init_scores, init_weight, layer_generator
from .layers import SupermaskMixin
from .mask import Threshold


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

    ``keeps_weight=True`` keeps the tensor's values (pretrained weights, frozen): only the scores are
    drawn (edge-popup's init, per seed and name); ``init`` and ``scale_fan`` are then unused.
    ``mask_kind == "threshold"`` (set by ``use_threshold``): the mask keeps every entry with
    |score| >= ``threshold_value`` (a 0-dim buffer in the scores' dtype, saved in the state_dict).
    """

    def __init__(self, owner: nn.Module, tensor_name: str, k: float = 0.5, init: str = "signed_constant",
                 scale_fan: bool = False, seed: int | None = None, name: str = "", transposed: bool = False,
                 keeps_weight: bool = False):
        nn.Module.__init__(self)
        self.transposed = transposed
        self.keeps_weight = keeps_weight
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
        """Draw weight and scores again (as SupermaskMixin.reinitialize; transposed: see the class);
        with keeps_weight, the scores only (the weight keeps its values)."""
        transposed = getattr(self, "transposed", False)
        if not transposed and not getattr(self, "keeps_weight", False):
            return super().reinitialize(init, scale_fan, seed, name)
        if transposed and self.weight.dim() != 2:
            raise ValueError(f"transposed=True needs a 2-D weight, got shape {tuple(self.weight.shape)}")
        if seed is None:
            gw = gs = torch.default_generator
        else:
            gw, gs = layer_generator(seed, name, "weight"), layer_generator(seed, name, "scores")
        shape = tuple(self.weight.shape)[::-1] if transposed else tuple(self.weight.shape)  # the nn.Linear's
        if not self.keeps_weight:  # (only transposed weights come here: the others went to the mixin)
            self.weight.copy_(init_weight(shape, init, gw, self.k, scale_fan).T)
        scores = init_scores(shape, gs)
        self.scores.copy_(scores.T if transposed else scores)
        return None

    def use_threshold(self, value: float) -> None:
        """Switch to the threshold style: the mask keeps every entry with |score| >= value (a fixed
        threshold, Piggyback's tau; 5e-3 in Mallya et al. 2018), gradient straight through to the
        scores as for top-k (d loss / d scores = (d loss / d masked weight) * weight * sign(scores);
        with positive scores, Piggyback's update of its real-valued mask). value: a finite float > 0."""
        self.mask_kind = "threshold"
        value = torch.tensor(float(value), dtype=self.scores.dtype, device=self.scores.device)
        if "threshold_value" in self._buffers:
            self.threshold_value = value
        else:
            self.register_buffer("threshold_value", value)

    def threshold(self) -> Threshold:
        """The mask's Threshold: the fixed one in the threshold style (every entry at the value kept),
        else SupermaskMixin's (top-k or the shared one)."""
        if self.mask_kind == "threshold":
            return Threshold(self.threshold_value, 0, False)
        return super().threshold()

    def _masked_weight(self) -> torch.Tensor:
        if self.mask_kind == "threshold":
            return ops.masked_weight_at(self.weight, self.scores, self.threshold(), self._path())
        return super()._masked_weight()

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        """What reading the parametrized tensor returns: original * mask, of original's shape and
        dtype (``effective_weight()``; gradient straight through to the scores, none to original).
        Raises ValueError when the scores hold NaN (supermask.mask.NAN_MESSAGE)."""
        # `original` is self.weight; the mixin reads it itself (its fast paths key on the layer).
        return self.effective_weight()

    def extra_repr(self) -> str:
        """The masked tensor's shape and the mask: ``(768, 768), k=0.5`` (top-k, k the fraction kept),
        ``mask=sampled, eval=expected`` or ``mask=threshold, threshold=0.005``; ``, weight kept`` when the
        layer keeps its pretrained weight."""
        if self.mask_kind == "threshold":
            mask = f"mask=threshold, threshold={float(self.threshold_value):g}"
        else:
            mask = f"k={self.k}" if self.mask_kind == "topk" else f"mask=sampled, eval={self.sampled_eval}"
        return f"{tuple(self.weight.shape)}, {mask}" + (", weight kept" if getattr(self, "keeps_weight", False) else "")


def mask_parameter(modules: list[tuple[nn.Module, str]], k: float = 0.5, init: str = "signed_constant",
                   scale_fan: bool = False, seed: int | None = None, name: str = "",
                   transposed: bool = False, keeps_weight: bool = False) -> SupermaskParametrization:
    """Mask the tensor ``getattr(module, tensor_name)`` of every (module, tensor_name) pair; all pairs
    must hold the same Parameter (one pair unless the weight is tied). The weight is redrawn with
    ``init`` (deterministic per ``seed`` and ``name``, see supermask.init) and frozen; one
    SupermaskParametrization (one scores tensor) serves every pair and is returned. transposed: the
    weight is stored (in, out) like transformers' Conv1D (see SupermaskParametrization). keeps_weight:
    the weight keeps its values (frozen, not redrawn); only the scores are drawn. Raises
    ValueError when the pairs do not hold one Parameter, or for transposed with a weight not 2-D."""
    owner, tensor_name = modules[0]
    param = getattr(owner, tensor_name)
    if any(m._parameters.get(t) is not param for m, t in modules):
        raise ValueError("mask_parameter: the (module, name) pairs do not hold one Parameter")
    p = SupermaskParametrization(owner, tensor_name, k, init, scale_fan, seed, name, transposed, keeps_weight)
    for m, t in modules:
        # unsafe: skip parametrize's trial forward (the shape and dtype are those of the weight).
        parametrize.register_parametrization(m, t, p, unsafe=True)
    return p


@torch.no_grad()
def remove_masks(model: nn.Module) -> nn.Module:
    """Merge every supermask parametrization of model into its tensor, in place: the tensor becomes
    a plain frozen Parameter holding weight * mask (the eval-mode effective weight), the
    parametrization and its scores go. Tied tensors stay one Parameter. Used by
    ``supermask.baking.bake`` (``export --bake``). Returns model."""
    merged: list[tuple[nn.Module, str, torch.Tensor]] = []
    was = model.training
    model.eval()
    for m in model.modules():
        if not parametrize.is_parametrized(m):
            continue
        for tensor_name, plist in m.parametrizations.items():
            if any(isinstance(p, SupermaskParametrization) for p in plist):
                merged.append((m, tensor_name, getattr(m, tensor_name).detach().clone()))
    model.train(was)
    for m, tensor_name, _ in merged:
        _own_class(m)
        parametrize.remove_parametrizations(m, tensor_name, leave_parametrized=False)  # the original Parameter
    for m, tensor_name, value in merged:
        original = getattr(m, tensor_name)
        original.copy_(value)  # (a tied Parameter gets the same value twice)
        original.requires_grad_(False)
    return model


def _own_class(m: nn.Module) -> None:
    """Give a parametrized module its own copy of its Parametrized* class. A deepcopy of a
    parametrized module shares the original's class, and remove_parametrizations deletes the
    tensor's property from that class: without this, baking a copy would break the original."""
    cls = type(m)
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    m.__class__ = type(cls.__name__, cls.__bases__, body)
