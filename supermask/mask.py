"""The one mask function: which weights a supermask keeps.

Definition (every fast path in this project is tested against it): a layer with n scores at
fraction k keeps exactly ``num_kept(n, k)`` weights, those with the largest |score|; among equal
|score| the lower flat index wins. That is what a stable descending sort would pick.

A mask is described by a ``Threshold``: keep every entry with |s| > value, plus the first
``ties`` entries (in flat order) with |s| == value. Finding ``value`` is a k-th largest
selection (``supermask.select``), never a full sort. The same description serves global top-k
(one value shared by all layers, ties handed out in layer order) and the Triton kernels.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .select import kth_largest


def num_kept(n: int, k: float) -> int:
    """How many of n weights a mask at fraction k keeps: round(k * n), at least 1, at most n."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return min(n, max(1, int(math.floor(k * n + 0.5))))


class Threshold(NamedTuple):
    value: torch.Tensor  # 0-dim, in the magnitudes' dtype and device
    ties: int  # how many entries equal to value are kept, lowest flat index first
    split: bool  # True when some entries equal to value are dropped (ties need a prefix count)


def _threshold_from_value(magnitudes: torch.Tensor, value: torch.Tensor, n_keep: int) -> Threshold:
    above = int((magnitudes > value).sum())
    equal = int((magnitudes == value).sum())
    ties = n_keep - above
    return Threshold(value, ties, ties != equal)


def topk_threshold(magnitudes: torch.Tensor, n_keep: int) -> Threshold:
    """Threshold keeping the n_keep largest entries of magnitudes (any shape, flattened)."""
    flat = magnitudes.reshape(-1)
    return _threshold_from_value(flat, kth_largest(flat, n_keep), n_keep)


def mask_from_threshold(magnitudes: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Boolean mask of magnitudes' shape for a Threshold."""
    if not threshold.split:
        return magnitudes >= threshold.value
    equal = magnitudes == threshold.value
    # Deterministic tie-break: the first `ties` equal entries in flat order survive.
    first_ties = equal.reshape(-1).cumsum(0).reshape(magnitudes.shape) <= threshold.ties
    return (magnitudes > threshold.value) | (equal & first_ties)


def topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """The reference mask: keep num_kept(n, k) entries of largest |score|."""
    magnitudes = scores.detach().abs()
    return mask_from_threshold(magnitudes, topk_threshold(magnitudes, num_kept(scores.numel(), k)))


def global_thresholds(scores: Sequence[torch.Tensor], k: float) -> list[Threshold]:
    """One threshold shared by several layers: keep num_kept(total, k) weights of all of them.

    Ties at the shared value are handed out in layer order, then flat order within a layer,
    i.e. as if all scores were concatenated.
    """
    magnitudes = [s.detach().abs().reshape(-1) for s in scores]
    flat = torch.cat([m.to(torch.float32) if m.dtype != magnitudes[0].dtype else m for m in magnitudes])
    n_keep = num_kept(flat.numel(), k)
    value = kth_largest(flat, n_keep)
    ties_left = n_keep - int((flat > value).sum())
    out = []
    for m in magnitudes:
        v = value.to(m.dtype)
        equal = int((m == v).sum())
        ties = min(ties_left, equal)
        ties_left -= ties
        out.append(Threshold(v, ties, ties != equal))
    return out


class MaskedWeight(torch.autograd.Function):
    """weight * mask forward; straight-through backward to the scores.

    d loss / d scores = (d loss / d masked weight) * weight * sign(scores), for every entry, kept or
    not: the mask is treated as the identity (edge-popup's straight-through estimator through |s|).
    The frozen weight gets no gradient.
    """

    @staticmethod
    def forward(ctx, weight, scores, threshold: Threshold):
        ctx.save_for_backward(weight, scores)
        mask = mask_from_threshold(scores.detach().abs(), threshold)
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad_out):
        weight, scores = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = grad_out * weight * torch.sign(scores)
        return None, grad_scores, None


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    return MaskedWeight.apply(weight, scores, threshold)


# --- Sampled supermasks (Zhou et al. 2019, "Deconstructing lottery tickets") ----------------------
SAMPLED_EVAL = ("expected", "threshold")


class SampledMaskedWeight(torch.autograd.Function):
    """weight * m with m ~ Bernoulli(sigmoid(scores)); straight through the sampling, so
    d loss / d scores = (d loss / d masked weight) * weight * sigmoid'(scores)."""

    @staticmethod
    def forward(ctx, weight, scores):
        p = torch.sigmoid(scores)
        ctx.save_for_backward(weight, p)
        return weight * torch.bernoulli(p)

    @staticmethod
    def backward(ctx, grad_out):
        weight, p = ctx.saved_tensors
        return None, grad_out * weight * p * (1 - p)


def sampled_masked_weight(weight: torch.Tensor, scores: torch.Tensor, training: bool,
                          eval_mode: str = "expected") -> torch.Tensor:
    """Training: a fresh Bernoulli(sigmoid(score)) mask per call. Evaluation: the expected mask
    (weight * sigmoid(score)) or the thresholded one (keep where sigmoid(score) > 0.5)."""
    if training:
        return SampledMaskedWeight.apply(weight, scores)
    if eval_mode == "expected":
        return weight * torch.sigmoid(scores)
    return torch.where(scores > 0, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
