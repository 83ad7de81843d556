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

from . import fused
from .select import KTH_DIRECT_MAX, kth_largest, select_counts


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
    above = int(torch.count_nonzero(magnitudes > value))
    equal = int(torch.count_nonzero(magnitudes == value))
    ties = n_keep - above
    return Threshold(value, ties, ties != equal)


def _threshold_from_counts(value: torch.Tensor, above: int, equal: int, n_keep: int) -> Threshold:
    ties = n_keep - above
    return Threshold(value, ties, ties != equal)


def topk_threshold(magnitudes: torch.Tensor, n_keep: int) -> Threshold:
    """Threshold keeping the n_keep largest entries of magnitudes (any shape, flattened)."""
    sel = select_counts(magnitudes, n_keep)  # the counts above/equal come with the selection
    return _threshold_from_counts(sel.value, sel.above, sel.equal, n_keep)


def mask_from_threshold(magnitudes: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Boolean mask of magnitudes' shape for a Threshold."""
    if not threshold.split:
        return magnitudes >= threshold.value
    equal = magnitudes == threshold.value
    # Deterministic tie-break: the first `ties` equal entries in flat order survive.
    first_ties = equal.reshape(-1).cumsum(0).reshape(magnitudes.shape) <= threshold.ties
    return (magnitudes > threshold.value) | (equal & first_ties)


# Warm start. Between two training steps the threshold moves little (a few hundred ranks), so a
# step counts, in one fused pass (supermask.fused.band_counts), the scores above a narrow band
# [lo, hi] around the last threshold and at or above lo. The counts prove whether the new
# threshold lies in the band; the band's few entries are then gathered (the per-column counts of
# the (GROUP, n / GROUP) view say which columns hold them) and the exact selection runs on them
# alone. A band that misses is moved and widened once, then the cold selection runs. Every answer
# is exact; the band only decides the speed.
WARM_MIN = KTH_DIRECT_MAX  # smaller layers use the cold selection (cheap there)
_BAND_TARGET = 1024  # entries the band aims to hold


class TopKWarmStart:
    """Per-layer state of ``warm_topk_threshold`` (plain floats, outside any state_dict)."""

    __slots__ = ("key", "value", "half", "warm", "widened", "cold")

    def __init__(self):
        self.key = None
        self.value = self.half = 0.0  # last threshold; band half-width for the next step
        self.warm = self.widened = self.cold = 0  # statistics: how each step was answered


class WarmTopK(NamedTuple):
    """A mask request for masked_weight: select the top n_keep warm-started from state, and build
    the masked weight in the same pass over the scores."""
    n_keep: int
    state: TopKWarmStart


def _band(s_flat: torch.Tensor, n_keep: int, lo: float, hi: float, w_flat: torch.Tensor | None):
    """Count |s| above a band [lo, hi] and gather the band. Returns (count above hi, band values,
    band flat indices, weight where |s| > hi or None); band is None when the n_keep-th largest |s|
    is not in the band. With w_flat the masked weight of the entries above the band comes out of
    the same pass."""
    n = s_flat.numel()
    n0 = n - n % fused.GROUP
    lo_t, hi_t = (torch.tensor(v, dtype=s_flat.dtype, device=s_flat.device) for v in (lo, hi))
    main = s_flat[:n0].view(fused.GROUP, -1)
    out = None
    if w_flat is None:
        c_hi, c_lo, cols = fused.call("band_counts", main, lo_t, hi_t)
    else:
        out, c_hi, c_lo, cols = fused.call("masked_above_band", w_flat[:n0].view(fused.GROUP, -1), main, lo_t, hi_t)
    tail = s_flat[n0:].abs()
    c_hi, c_lo = int(c_hi) + int((tail > hi_t).sum()), int(c_lo) + int((tail >= lo_t).sum())
    if not c_hi < n_keep <= c_lo:
        return c_hi, None, None, None
    cidx = torch.nonzero(cols).squeeze(1)
    block = main.index_select(1, cidx).abs()
    in_block, in_tail = (block >= lo_t) & (block <= hi_t), (tail >= lo_t) & (tail <= hi_t)
    index = torch.cat([(torch.arange(fused.GROUP, device=s_flat.device).unsqueeze(1) * (n0 // fused.GROUP)
                        + cidx)[in_block], torch.arange(n0, n, device=s_flat.device)[in_tail]])
    if out is not None and n0 < n:
        out = torch.cat([out.view(-1), torch.where(tail > hi_t, w_flat[n0:], torch.zeros_like(tail))])
    return c_hi, torch.cat([block[in_block], tail[in_tail]]), index, out


def _warm_select(scores: torch.Tensor, n_keep: int, state: TopKWarmStart, weight: torch.Tensor | None = None):
    """(Threshold, masked weight or None): the exact top-n_keep of |scores|, warm-started from
    state; with weight, also weight * mask built in the same pass (None when ties must be split)."""
    s = scores.detach()
    n = s.numel()
    if n <= WARM_MIN or not s.dtype.is_floating_point or not s.is_contiguous() or (
            weight is not None and (weight.shape != s.shape or not weight.is_contiguous())):
        return topk_threshold(s.abs(), n_keep), None
    key = (n, n_keep, s.dtype, s.device)
    s_flat = s.view(-1)
    w_flat = None if weight is None else weight.reshape(-1)
    if state.key == key:
        lo, hi = state.value - state.half, state.value + state.half
        for attempt in range(2):
            c_hi, band, index, out = _band(s_flat, n_keep, max(lo, 0.0), hi, w_flat)
            if band is not None:
                sel = select_counts(band, n_keep - c_hi)
                v = float(sel.value)
                # next band: about _BAND_TARGET entries, and at least 4x this step's move
                density = band.numel() / max(hi - lo, 1e-30)
                state.half = max(_BAND_TARGET / (2 * density), 4 * abs(v - state.value), 1e-12)
                state.value = v
                state.warm += attempt == 0
                state.widened += attempt == 1
                threshold = _threshold_from_counts(sel.value, c_hi + sel.above, sel.equal, n_keep)
                if out is None or threshold.split:
                    return threshold, None
                kept = index[band >= sel.value]  # the band entries the mask keeps
                out.view(-1)[kept] = w_flat[kept]
                return threshold, out.view(s.shape)
            width = 8 * (hi - lo)  # missed: move towards the side the counts point to, wider
            lo, hi = (hi, hi + width) if c_hi >= n_keep else (lo - width, lo)
    # Cold: exact selection from scratch, and a first band half-width from nearby order statistics.
    state.cold += 1
    magnitudes = s_flat.abs()
    sel = select_counts(magnitudes, n_keep)
    q = min(n_keep - 1, n - n_keep, _BAND_TARGET // 2)
    spread = (float(kth_largest(magnitudes, n_keep - q)) - float(kth_largest(magnitudes, n_keep + q))) if q else 0.0
    state.key, state.value, state.half = key, float(sel.value), max(spread / 2, 1e-12)
    return _threshold_from_counts(sel.value, sel.above, sel.equal, n_keep), None


def warm_topk_threshold(scores: torch.Tensor, n_keep: int, state: TopKWarmStart) -> Threshold:
    """``topk_threshold(scores.abs(), n_keep)`` (the very same Threshold), warm-started from state."""
    return _warm_select(scores, n_keep, state)[0]


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
    sel = select_counts(flat, n_keep)
    value = sel.value
    ties_left = n_keep - sel.above
    out = []
    for m in magnitudes:
        v = value.to(m.dtype)
        equal = int(torch.count_nonzero(m == v))
        ties = min(ties_left, equal)
        ties_left -= ties
        out.append(Threshold(v, ties, ties != equal))
    return out


class MaskedWeight(torch.autograd.Function):
    """weight * mask forward; straight-through backward to the scores.

    d loss / d scores = (d loss / d masked weight) * weight * sign(scores), for every entry, kept or
    not: the mask is treated as the identity (edge-popup's straight-through estimator through |s|).
    The frozen weight gets no gradient. Both directions are one fused pass (supermask.fused) when
    the mask needs no tie-break; weight and scores are saved as they are (no copies).
    """

    @staticmethod
    def forward(ctx, weight, scores, threshold: Threshold | WarmTopK):
        ctx.save_for_backward(weight, scores)
        if isinstance(threshold, WarmTopK):
            threshold, out = _warm_select(scores, threshold.n_keep, threshold.state, weight)
            if out is not None:
                return out
        if not threshold.split and scores.shape == weight.shape:
            return fused.call("masked", weight, scores, threshold.value.to(scores.dtype))
        mask = mask_from_threshold(scores.detach().abs(), threshold)
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad_out):
        weight, scores = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = fused.call("ste_grad", grad_out, weight, scores).to(scores.dtype)
        return None, grad_scores, None


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: Threshold | WarmTopK) -> torch.Tensor:
    """weight * mask with the straight-through gradient to the scores. The mask is given by a
    Threshold, or by a WarmTopK request (selection and masking in one pass over the scores)."""
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
