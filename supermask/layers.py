"""Supermask layers: a frozen random weight, a learned score per weight, no bias.

Forward uses ``weight * mask`` where the mask keeps the top-k fraction of |scores|
(``supermask.mask``); backward sends the gradient straight through to the scores.

The top-k layers call the ``supermask`` custom ops (``supermask.ops``) with their ``path`` attribute
("auto": the device of the tensors picks the implementation, C kernels on the CPU, Triton on CUDA,
plain torch otherwise; "reference"; "triton"; set per model by ``supermask.set_backend``), so the layers
compile with ``torch.compile(fullgraph=True)``, run under autocast and export with ``torch.export``.
Each layer owns an id into the ops' warm-start state registry (``ops.StateHandle``); copies get
their own.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .init import init_scores, init_weight, layer_generator
from .mask import Threshold, mask_from_threshold, num_kept, num_kept_hn, sampled_masked_weight

MASK_KINDS = ("topk", "sampled")


class SupermaskMixin:
    """Shared by SupermaskLinear and SupermaskConv2d (both keep nn's attribute names)."""

    def _setup_supermask(self, k: float, init: str, scale_fan: bool, seed: int | None, name: str):
        num_kept(self.weight.numel(), k)  # validates k
        self.k = float(k)
        self.kept_count = "round"  # num_kept; "hn": hidden-networks' num_kept_hn (desc.build_model, --hn-compat)
        self._state = ops.StateHandle()  # warm-start selection state, kept by supermask.ops
        # Which implementation the ops run for this layer (supermask.ops.PATHS): "auto" (the device's
        # kernels), "reference" (plain torch) or "triton"; set per model by supermask.set_backend.
        self.path = "auto"
        # Set by a model-level hook for global top-k; None means per-layer top-k.
        self.shared_threshold: Threshold | None = None
        # "topk" (edge-popup) or "sampled" (Bernoulli(sigmoid(score)) masks, Zhou et al. 2019), which
        # evaluates with the expected mask or the thresholded one (sampled_eval).
        self.mask_kind = "topk"
        self.sampled_eval = "expected"
        self.weight.requires_grad_(False)
        self.scores = nn.Parameter(torch.empty_like(self.weight))
        self.reinitialize(init, scale_fan, seed, name)

    @torch.no_grad()
    def reinitialize(self, init: str = "signed_constant", scale_fan: bool = False,
                     seed: int | None = None, name: str = ""):
        """Draw weight and scores again; with a seed the draw is deterministic (see init.py)."""
        if seed is None:
            gw = gs = torch.default_generator
        else:
            gw, gs = layer_generator(seed, name, "weight"), layer_generator(seed, name, "scores")
        self.weight.copy_(init_weight(self.weight.shape, init, gw, self.k, scale_fan))
        self.scores.copy_(init_scores(self.scores.shape, gs))

    def threshold(self) -> Threshold:
        """The layer's Threshold: the shared one (global top-k) or its own top-k (one host sync)."""
        if self.shared_threshold is not None:
            return self.shared_threshold
        return ops.topk_threshold(self.scores.detach(), self._n_keep(), self._path())

    def _n_keep(self) -> int:
        return (num_kept_hn if self.kept_count == "hn" else num_kept)(self.scores.numel(), self.k)

    def _path(self) -> str:
        return getattr(self, "path", "auto")  # (layers pickled before the attribute existed)

    def _state_id(self) -> int:
        # torch.export: no warm-start state (the exported program stands alone; exact either way)
        return -1 if torch.compiler.is_exporting() else self._state.id

    def mask(self) -> torch.Tensor:
        """The boolean mask currently in use (sampled masks: where sigmoid(score) > 0.5)."""
        if self.mask_kind == "sampled":
            return self.scores.detach() > 0
        return mask_from_threshold(self.scores.detach().abs(), self.threshold())

    def _masked_weight(self) -> torch.Tensor:
        if self.mask_kind == "sampled":
            return sampled_masked_weight(self.weight, self.scores, self.training, self.sampled_eval)
        if self.shared_threshold is not None:
            return ops.masked_weight_at(self.weight, self.scores, self.shared_threshold, self._path())
        return ops.masked_weight(self.weight, self.scores, self._n_keep(), self._state_id(), self._path())

    def _inference(self) -> bool:
        """Eval mode without autograd, outside compile: F.linear on the masked weight (no backward to
        prepare for, so the fused op's saved state is not needed)."""
        return not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())

    def effective_weight(self) -> torch.Tensor:
        """weight * mask, recomputed on every call. (No eval-mode cache: a cache keyed on the
        scores' version counter misses writes through ``scores.data``, which bypass it, and would
        keep the old mask; recomputing costs one warm-started selection and one multiply.)"""
        return self._masked_weight()

    def extra_repr(self) -> str:
        """nn's own description of the layer followed by its mask: ``k=0.5`` (top-k, k the fraction
        kept) or ``mask=sampled, eval=expected`` (sampled masks and their evaluation mode)."""
        mask = f"k={self.k}" if self.mask_kind == "topk" else f"mask=sampled, eval={self.sampled_eval}"
        return super().extra_repr() + ", " + mask


class SupermaskLinear(SupermaskMixin, nn.Linear):
    """nn.Linear without bias whose weight is frozen and masked: y = x @ (weight * mask)^T.

    Edge-popup (Ramanujan et al. 2020, "What's Hidden in a Randomly Weighted Neural Network?";
    allenai/hidden-networks' SubnetConv and simple_mnist_example's SupermaskLinear): ``weight``
    (out_features, in_features) is drawn once with ``init`` (one of supermask.init.INITS; with
    ``scale_fan`` its fan is k * fan_in) and never trained (requires_grad False); ``scores`` (same
    shape and dtype) are the only trained tensor, drawn with Kaiming uniform (a=sqrt(5)); the mask
    keeps the ``num_kept(n, k)`` entries of largest |score| (k: the fraction kept, in (0, 1]; ties
    to the lower flat index, see supermask.mask). With a ``seed`` both draws are deterministic per
    (seed, ``name``) (supermask.init.layer_generator), else they use torch's global RNG.
    device/dtype as nn.Linear's. Raises ValueError for k outside (0, 1] or an unknown init.
    """

    def __init__(self, in_features: int, out_features: int, k: float = 0.5,
                 init: str = "signed_constant", scale_fan: bool = False, seed: int | None = None,
                 name: str = "", device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias=False, device=device, dtype=dtype)
        self._setup_supermask(k, init, scale_fan, seed, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (..., out_features) = x (..., in_features) @ (weight * mask)^T, in the weight's dtype
        (x's must match, as for nn.Linear), or the autocast dtype under torch.autocast (the mask still
        chosen from the scores in their own dtype). Per-layer top-k in training, with autograd on or
        under torch.compile: the fused ``supermask::masked_linear`` op (straight-through gradient to
        the scores, none to the weight); global top-k, sampled masks and eval without autograd:
        F.linear on ``effective_weight()``. Raises ValueError when the scores hold NaN
        (supermask.mask.NAN_MESSAGE); x's last dimension not in_features: ValueError from the op,
        RuntimeError from F.linear."""
        if self.mask_kind == "topk" and self.shared_threshold is None and not self._inference():
            return ops.masked_linear(x, self.weight, self.scores, self._n_keep(), self._state_id(), self._path())
        return F.linear(x, self.effective_weight())


class SupermaskConv2d(SupermaskMixin, nn.Conv2d):
    """nn.Conv2d without bias whose weight is frozen and masked: conv2d(x, weight * mask).

    Edge-popup (Ramanujan et al. 2020, "What's Hidden in a Randomly Weighted Neural Network?";
    allenai/hidden-networks' utils/conv_type.py SubnetConv): ``weight`` (out_channels,
    in_channels / groups, kh, kw) is drawn once with ``init`` (supermask.init.INITS; fan_in =
    in_channels / groups * kh * kw, times k with ``scale_fan``) and frozen; ``scores`` of its
    shape and dtype are trained; the mask keeps the ``num_kept(n, k)`` entries of largest |score|
    over the whole weight (k: the fraction kept, in (0, 1]). stride, padding, dilation, groups,
    padding_mode, device and dtype as nn.Conv2d's; seed and name as SupermaskLinear's. Raises
    ValueError for k outside (0, 1] or an unknown init, and nn.Conv2d's errors for its arguments.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, padding_mode: str = "zeros", k: float = 0.5,
                 init: str = "signed_constant", scale_fan: bool = False, seed: int | None = None,
                 name: str = "", device=None, dtype=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias=False, padding_mode=padding_mode, device=device, dtype=dtype)
        self._setup_supermask(k, init, scale_fan, seed, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv2d(x, weight * mask) for x (N, in_channels, H, W) or (in_channels, H, W), in the
        weight's dtype (x's must match; the autocast dtype under torch.autocast): the masked weight
        from ``effective_weight()`` (straight-through gradient to the scores), then nn.Conv2d's own
        convolution. Raises ValueError when the scores hold NaN
        (supermask.mask.NAN_MESSAGE) and RuntimeError (torch's) for input of the wrong channels."""
        weight = self.effective_weight()
        if torch.compiler.is_compiling() and self._strided_pointwise():
            # torch 2.14's inductor (CPU) gets the weight gradient of a 1x1 convolution with stride > 1
            # wrong (relative error ~0.5 on plain F.conv2d; ResNet's downsample layers). Without
            # padding such a convolution reads x[..., ::sh, ::sw]: the same sums at stride 1, which
            # inductor gets right. Eager keeps the strided call (cuDNN/oneDNN do it without a copy).
            sh, sw = self.stride
            return F.conv2d(x[..., ::sh, ::sw], weight, None, 1, 0, 1, self.groups)
        return self._conv_forward(x, weight, None)

    def _strided_pointwise(self) -> bool:
        return (tuple(self.kernel_size) == (1, 1) and self.padding in ((0, 0), "valid")
                and tuple(self.stride) != (1, 1))


class NonAffineBatchNorm(nn.BatchNorm2d):
    """BatchNorm with no learned scale or shift (edge-popup learns nothing but scores).
    Accepts (N, C), (N, C, L) and (N, C, H, W) inputs."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine=False,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)

    def _check_input_dim(self, input):
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input (got {input.dim()}D input)")


def supermask_layers(model: nn.Module) -> list[tuple[str, SupermaskMixin]]:
    """(name, layer) for every supermask layer of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SupermaskMixin)]
