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

import ctypes
import math
from typing import NamedTuple, Sequence

import torch

from .select import _GROUP, KTH_DIRECT_MAX, _scratch, kth_largest, select_counts


def num_kept(n: int, k: float) -> int:
    """How many of n weights a mask at fraction k keeps: round(k * n), at least 1, at most n."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return min(n, max(1, int(math.floor(k * n + 0.5))))


def num_kept_hn(n: int, k: float) -> int:
    """hidden-networks' count (utils/conv_type.py GetSubnet: j = int((1 - k) * n) dropped): n - int((1 - k) * n),
    which float truncation makes one more than round(k * n) for many (n, k). Always in [1, n] for k in (0, 1]."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return n - int((1 - k) * n)


class Threshold(NamedTuple):
    """A mask's description (see the module docstring): keep every entry with |s| > ``value``,
    plus, when ``split``, the first ``ties`` entries in flat order with |s| == ``value`` (every one
    of them when not split). Made by ``topk_threshold``, ``warm_topk_threshold`` and
    ``global_thresholds``; read by ``mask_from_threshold``, ``masked_weight`` and the kernels."""

    value: torch.Tensor  # 0-dim, in the magnitudes' dtype and device
    # How many entries equal to value are kept, lowest flat index first. Only read when split is
    # True; when it is False every entry equal to value is kept, and a warm-started threshold
    # proven by one count (see _candidate_threshold) does not count them: it reports 1.
    ties: int
    split: bool  # True when some entries equal to value are dropped (ties need a prefix count)


# The NaN policy of every path (reference, C kernels, Triton): NaN scores are refused. A top-k of
# |scores| with NaN has no order that all paths share (torch.kthvalue sorts NaN last, compares drop
# it, the radix select counts it above inf) and no answer that keeps exactly n_keep entries when
# too few are numbers, so the selections refuse them (supermask.ops: the same message; on the
# Triton path a device-side assert, as it must not read the device from the host).
NAN_MESSAGE = "scores contain NaN: a top-k mask of NaN scores is undefined (refused on every path)"


def has_nan(x: torch.Tensor) -> bool:
    """Whether x holds a NaN (a host read). float32/float64 contiguous: x . x, one BLAS pass (NaN
    iff some entry is NaN: the squares are >= 0, so inf cannot cancel into NaN), measured 12x
    faster than isnan().any() on a 784 x 300 layer (AMD EPYC, 1 thread); else isnan().any()."""
    if x.dtype in (torch.float32, torch.float64) and x.is_contiguous() and x.numel() > 0:
        flat = x.view(-1)
        return bool(torch.dot(flat, flat).isnan())
    return x.is_floating_point() and bool(torch.isnan(x).any())


def refuse_nan(scores: torch.Tensor) -> None:
    """Raises ValueError(NAN_MESSAGE) when scores hold a NaN (one pass and a host read)."""
    if has_nan(scores):
        raise ValueError(NAN_MESSAGE)


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


# ---------------------------------------------------------------------------------------------
# Warm start. Between two training steps the threshold moves little (typically by a few hundred
# ranks). Most steps are answered by the layer's candidates (below); the others count, with two
# compare passes over |s|, the entries above a narrow value band
# [lo, hi] around the previous threshold and at or above lo. The counts prove whether the new
# threshold lies in the band; the band's few entries are then gathered (per-column counts of the
# (16, n/16) view pick the columns holding them) and the exact selection runs on them alone.
# The pass for `> hi` runs in place in the buffer of |s|. A band that misses is widened (once),
# then the exact cold selection runs. Every answer is exact; the band only decides the speed.
# ---------------------------------------------------------------------------------------------
WARM_MIN = KTH_DIRECT_MAX  # smaller layers: one kthvalue, proven by a count (cheap there)
_WARM_DTYPES = (torch.float32, torch.float64)
# The warm-start policy, one for every path (reference, C kernels; each device supplies only its
# pass): the band around the last threshold aims to hold band_target(n) entries (~0.2% of the
# layer, 128 to 1024) and also covers _BAND_SHIFT times the last move (band_bounds); a band that
# proved the threshold updates value, move and density (accept_band); a cold start estimates the
# density from the selections _DENSITY_RANKS ranks either side (start_cold).
_BAND_TARGET_MIN, _BAND_TARGET_MAX = 128, 1024
_BAND_SHIFT = 4.0
_DENSITY_RANKS = 64


class TopKWarmStart:
    """Per-layer warm-start state for ``warm_topk_threshold``: the last threshold, the density of
    magnitudes around it and its last move (plain floats), the candidates (see below), and counts
    of how steps were answered; outside any state_dict. (The supermask ops keep one per layer,
    with what their kernels reuse between steps: ``supermask.ops.LayerState``.)"""

    __slots__ = ("key", "value", "density", "shift", "guessed", "warm", "widened", "cold", "fused",
                 "cand", "cand_above", "__weakref__")

    def __init__(self):
        self.key = None
        self.cand: torch.Tensor | None = None  # flat indices of the candidates (see below)
        self.cand_above = 0  # entries above the candidates' band when it was drawn
        self.value = 0.0
        self.density = 0.0  # entries per unit of magnitude near the threshold
        self.shift = 0.0  # |last threshold move|
        # statistics: how each step was answered (candidates, band, widened band, cold; fused: in
        # the CPU kernels' one pass)
        self.guessed = self.warm = self.widened = self.cold = self.fused = 0

    def reset(self):
        """Forget the last threshold and the candidates: the next ``warm_topk_threshold`` starts
        cold (value, density and the step counts stay, but are not used without a key)."""
        self.key = self.cand = None

    def __getstate__(self):
        return {k: getattr(self, k) for k in ("key", "value", "density", "shift", "guessed", "warm", "widened",
                                              "cold", "fused")}

    def __setstate__(self, state):
        self.__init__()
        for k, v in state.items():
            setattr(self, k, v)


def band_target(n: int) -> int:
    """Entries the band around the last threshold aims to hold, for a layer of n entries."""
    return min(_BAND_TARGET_MAX, max(_BAND_TARGET_MIN, n >> 9))


def density_ranks(n: int, n_keep: int) -> int:
    """q: a cold start measures the density between the (n_keep - q)-th and (n_keep + q)-th largest."""
    return min(n_keep - 1, n - n_keep, _DENSITY_RANKS)


# The policy's arithmetic, in the subset of Python that Triton compiles too (scalars, + - * /, max,
# if; constants as arguments): the host paths call these functions, and kernels/threshold.py
# compiles these very functions (triton.jit) into the Triton path's warm-start kernels, which run
# them on the device in fp32. One policy, not a copy per device.
def band_half_width(target, density, shift, shift_factor):
    """Half width of the band around the last threshold: room for `target` entries at `density`
    entries per unit of magnitude, and at least shift_factor times the last move `shift`."""
    return max(target / (2 * density), shift_factor * shift)


def band_moved(value, density, v, n_band, width):
    """(density, shift) once a band `width` wide holding n_band entries proved the threshold v (the
    last one: value): the density as a running mean (unchanged when width <= 0), shift = |v - value|."""
    shift = max(v - value, value - v)
    if width > 0:
        density = 0.5 * density + 0.5 * max(n_band, 1.0) / width
    return density, shift


def cold_density(q, width):
    """The density after a cold selection: 2q entries lie between the selections q ranks either side
    of the threshold, `width` apart (0 when width is 0: no estimate)."""
    density = width * 0.0
    if width > 0:
        density = 2 * q / width
    return density


def band_edges(value, half):
    """(lo, hi): the band of half width `half` around the last threshold `value`, never below 0."""
    return max(value - half, 0.0), value + half


def band_bounds(state: "TopKWarmStart", n: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """(lo, hi, half): the band [lo, hi] around state.value (in dtype's rounding) and its half width."""
    half = band_half_width(band_target(n), state.density, state.shift, _BAND_SHIFT)
    lo, hi = band_edges(state.value, half)
    return _as_dtype(lo, dtype), _as_dtype(hi, dtype), half


def accept_band(state: "TopKWarmStart", v: float, n_band: float | None = None, lo: float = 0.0,
                hi: float = 0.0) -> None:
    """The threshold v was proven: record its move and value; with the band [lo, hi] that held n_band
    entries, also the density of magnitudes around it (a running mean)."""
    width = hi - lo if n_band is not None else 0.0
    state.density, state.shift = band_moved(state.value, state.density, v, n_band or 0.0, width)
    state.value = v


def start_cold(state: "TopKWarmStart", key, v: float, n: int, n_keep: int, kth) -> None:
    """Warm-start state after a cold selection of v: kth(r) is the r-th largest magnitude (the
    device's own selection), asked twice for the density of magnitudes around v."""
    state.cold += 1
    q = density_ranks(n, n_keep)
    width = kth(n_keep - q) - kth(n_keep + q) if q >= 1 else 0.0
    state.density = cold_density(q, width)
    state.key, state.value, state.shift = key, v, 0.0


def _as_dtype(x: float, dtype: torch.dtype) -> float:
    """x rounded to dtype (so a Python-scalar compare uses exactly this bound). float32 through
    ctypes: the same round-to-nearest as torch's conversion, without making a tensor per call."""
    if dtype == torch.float64:
        return x
    if dtype == torch.float32:
        return ctypes.c_float(x).value
    return float(torch.tensor(x, dtype=dtype))


def _warm_key(s: torch.Tensor, n_keep: int) -> tuple:
    """What a layer's warm-start state (value, density) is valid for."""
    return (s.numel(), n_keep, s.dtype, s.device)


def _band_pass(m: torch.Tensor, s_flat: torch.Tensor, n_keep: int, lo: float, hi: float):
    """Counts and band of |s| for [lo, hi]; on success m holds (|s| > hi) as 0/1.

    Returns (c_hi, c_lo, band_values, band_index) or (c_hi, c_lo, None, None) when the band does not
    contain the n_keep-th largest (m then no longer holds |s|)."""
    n = m.numel()
    g = _GROUP
    n0 = n - n % g
    scratch = _scratch(n, m.device)
    torch.ge(m, lo, out=scratch)
    cols_lo = scratch[:n0].view(g, -1).sum(0)
    tail_lo = scratch[n0:].clone()
    torch.gt(m, hi, out=m)
    cols_hi = m[:n0].view(g, -1).sum(0)
    tail_hi = m[n0:]
    c_lo = int(cols_lo.sum().item()) + (int(tail_lo.sum().item()) if n0 < n else 0)
    c_hi = int(cols_hi.sum().item()) + (int(tail_hi.sum().item()) if n0 < n else 0)
    if not c_hi < n_keep <= c_lo:
        return c_hi, c_lo, None, None
    cidx = torch.nonzero(cols_lo.sub_(cols_hi)).squeeze(1)
    block = s_flat[:n0].view(g, -1).index_select(1, cidx).abs_()
    keep = (block >= lo) & (block <= hi)
    band = block[keep]
    index = (torch.arange(g, device=m.device).unsqueeze(1) * (n0 // g) + cidx)[keep]
    if n0 < n:
        tkeep = (tail_lo - tail_hi).bool()
        band = torch.cat([band, s_flat[n0:][tkeep].abs()])
        index = torch.cat([index, torch.arange(n0, n, device=m.device)[tkeep]])
    if band.numel() != c_lo - c_hi:  # cannot happen without NaN
        return c_hi, c_lo, None, None
    return c_hi, c_lo, band, index


# ---------------------------------------------------------------------------------------------
# Candidates. Most steps need no band pass at all: a layer keeps the flat indices of the entries
# whose |s| lay in a wide band around the threshold when the band was drawn (_CAND_FRACTION of
# the layer), and how many lay above it. A step gathers those few entries, takes the guess
# v = the (n_keep - above)-th largest of them, and builds the 0/1 mask |s| >= v in the one compare
# pass any step needs. Its sum proves the guess: n_keep entries at or above v, v itself an entry,
# so v is exactly the n_keep-th largest and no entry equal to v is dropped. Entries that left the
# candidates' band since it was drawn only matter if they cross v, and then the count is off by
# their net number: one more guess, that many ranks over, counts them with those above the
# candidates. If that count fails too (or ties make it), the band path answers and new
# candidates are drawn around the new threshold.
# ---------------------------------------------------------------------------------------------
_CAND_FRACTION = 0.06  # of the layer's entries; wider bands stay valid for more steps
_CAND_MARGIN = 32  # the guess must lie this many ranks inside the candidates


def _candidate_threshold(s_flat: torch.Tensor, m: torch.Tensor, n_keep: int,
                         state: TopKWarmStart) -> Threshold | None:
    """The exact threshold from the candidates, with m (|s| on entry) turned into its 0/1 mask;
    None when the candidates cannot prove it (m may then hold a mask: the caller recomputes |s|)."""
    cand = state.cand
    r = n_keep - state.cand_above
    if not _CAND_MARGIN <= r <= cand.numel() - _CAND_MARGIN:
        return None
    a = s_flat.index_select(0, cand).abs_()
    # The r-th largest of the candidates, itself warm-started: a narrow band around the last value
    # (Python-float bounds: torch rounds them to a's dtype the same way in every compare).
    v0 = state.value
    half = band_half_width(band_target(s_flat.numel()), state.density, state.shift, _BAND_SHIFT)
    lo, hi = band_edges(v0, half)  # lo clamped at 0: the same compares, magnitudes are >= 0
    # float 0/1 compares into scratch buffers and a nonzero: bool masks are far slower on CPU
    inside = torch.ge(a, lo, out=_scratch(a.numel(), a.device, slot=3))
    over = torch.gt(a, hi, out=_scratch(a.numel(), a.device, slot=4))
    n_over = int(over.sum())
    band = a.index_select(0, torch.nonzero(inside.sub_(over)).squeeze(1))

    def guess(rank):  # the rank-th largest candidate (exact; it is only a guess for the layer)
        in_band = rank - n_over
        if 1 <= in_band <= band.numel():
            return torch.kthvalue(band, band.numel() - in_band + 1).values
        return kth_largest(a, rank)

    v = guess(r)
    torch.ge(m, v, out=m)
    # (exact: float32 0/1 sums below 2**24 entries, larger fp32 layers never come here; fp64 sums)
    crossed = int(m.sum()) - n_keep
    if crossed:
        # Entries outside the candidates crossed the threshold (net count `crossed`, or ties).
        # Count them with those above the candidates and guess once more, that many ranks over.
        r -= crossed
        if not _CAND_MARGIN <= r <= cand.numel() - _CAND_MARGIN:
            return None
        v = guess(r)
        torch.ge(torch.abs(s_flat, out=m), v, out=m)
        if int(m.sum()) != n_keep:
            return None
        state.cand_above += crossed
    accept_band(state, float(v))
    return Threshold(v, 1, False)  # not split: every entry equal to v is kept (ties not counted)


def _draw_candidates(s_flat: torch.Tensor, n_keep: int, state: TopKWarmStart) -> None:
    """New candidates around state.value: the entries with |s| in a band holding about
    _CAND_FRACTION of the layer, and the count above it. Two compare passes and a nonzero."""
    state.cand = None
    n = s_flat.numel()
    if state.density <= 0:
        return
    half = _CAND_FRACTION * n / (2 * state.density)
    v = state.value
    lo, hi = (_as_dtype(edge, s_flat.dtype) for edge in band_edges(v, half))
    a = torch.abs(s_flat, out=_scratch(n, s_flat.device, s_flat.dtype, slot=1))
    above = torch.gt(a, hi, out=_scratch(n, s_flat.device, slot=2))
    c_above = above.sum(dtype=torch.float64)
    torch.ge(a, lo, out=a).sub_(above)  # 1 inside [lo, hi]
    cand = torch.nonzero(a).squeeze(1)
    c_above = int(c_above)
    if _CAND_MARGIN <= n_keep - c_above <= cand.numel() - _CAND_MARGIN:
        state.cand, state.cand_above = cand, c_above


def warm_topk_threshold(scores: torch.Tensor, n_keep: int, state: TopKWarmStart) -> Threshold:
    """``topk_threshold(scores.abs(), n_keep)``, warm-started from state: the same value and split,
    the same ties when split (when not split every entry equal to value is kept; see Threshold)."""
    s = scores.detach()
    n = s.numel()
    if s.dtype not in _WARM_DTYPES or not s.is_contiguous() or (s.dtype == torch.float32 and n >= 1 << 24):
        return topk_threshold(s.abs(), n_keep)
    if n <= WARM_MIN:  # small: one kthvalue, proven by the count of the mask it gives (no ties split)
        m = s.abs()
        v = torch.kthvalue(m.view(-1), n - n_keep + 1).values
        if int(torch.ge(m, v, out=torch.empty_like(m)).sum()) == n_keep:
            return Threshold(v, 1, False)
        return topk_threshold(m, n_keep)
    key = _warm_key(s, n_keep)
    s_flat = s.view(-1)
    m = s.abs()
    flat = m.view(-1)
    if state.key == key and state.cand is not None:
        th = _candidate_threshold(s_flat, flat, n_keep, state)
        if th is not None:
            state.guessed += 1
            return th
        torch.abs(s_flat, out=flat)  # the failed guess left its mask in m
    if state.key == key and state.density > 0:
        lo, hi, half = band_bounds(state, n, s.dtype)
        for attempt in range(2):
            if attempt:
                torch.abs(s_flat, out=flat)
            c_hi, c_lo, band, index = _band_pass(flat, s_flat, n_keep, lo, hi)
            if band is not None:
                break
            # Missed: widen towards the side the counts point to (by 8x the half width).
            if c_hi >= n_keep:
                lo, hi = hi, _as_dtype(hi + 8 * half, s.dtype)
            else:
                lo, hi = _as_dtype(max(lo - 8 * half, 0.0), s.dtype), lo
        if band is not None:
            if attempt:
                state.widened += 1
            else:
                state.warm += 1
            sel = select_counts(band, n_keep - c_hi)
            accept_band(state, float(sel.value), band.numel(), lo, hi)
            th = _threshold_from_counts(sel.value, c_hi + sel.above, sel.equal, n_keep)
            _draw_candidates(s_flat, n_keep, state)
            return th
        torch.abs(s_flat, out=flat)
    # Cold: exact selection from scratch, then a density estimate for the next step's band.
    sel = select_counts(flat, n_keep)
    start_cold(state, key, float(sel.value), n, n_keep, lambda r: float(select_counts(flat, r).value))
    th = _threshold_from_counts(sel.value, sel.above, sel.equal, n_keep)
    _draw_candidates(s_flat, n_keep, state)
    return th


def topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """The reference mask: keep num_kept(n, k) entries of largest |score| (exactly that many).
    Empty scores give an empty mask; scores on the meta device a meta bool tensor of their shape
    (shape propagation, as nn layers allow). Raises ValueError for k outside (0, 1] or NaN scores
    (NAN_MESSAGE)."""
    num_kept(1, k)  # validates k whatever the size
    if scores.numel() == 0 or scores.is_meta:
        return torch.empty_like(scores, dtype=torch.bool)
    refuse_nan(scores)
    magnitudes = scores.detach().abs()
    return mask_from_threshold(magnitudes, topk_threshold(magnitudes, num_kept(scores.numel(), k)))


def global_thresholds(scores: Sequence[torch.Tensor], k: float) -> list[Threshold]:
    """One threshold shared by several layers: keep num_kept(total, k) weights of all of them.

    Ties at the shared value are handed out in layer order, then flat order within a layer,
    i.e. as if all scores were concatenated. Raises ValueError for NaN scores (NAN_MESSAGE).
    """
    for s in scores:
        refuse_nan(s)
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


def _masked(weight: torch.Tensor, scores: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """weight * mask in as few passes as eager torch allows (no bool tensor, no torch.where: on
    CPU a compare with float output and an in-place multiply are the fastest kernels)."""
    value = threshold.value
    if (not threshold.split and scores.dtype == weight.dtype and value.dtype == scores.dtype
            and scores.shape == weight.shape and weight.dtype.is_floating_point):
        m = scores.abs()
        torch.ge(m, value, out=m)  # 0/1 in |s|'s buffer
        return m.mul_(weight)
    mask = mask_from_threshold(scores.detach().abs(), threshold)
    return weight * mask


class MaskedWeight(torch.autograd.Function):
    """weight * mask forward; straight-through backward to the scores.

    d loss / d scores = (d loss / d masked weight) * weight * sign(scores), for every entry, kept or
    not: the mask is treated as the identity (edge-popup's straight-through estimator through |s|).
    The frozen weight gets no gradient.

    Saved for backward: weight and scores themselves (no copies); the only weight-sized tensor a
    call allocates is the masked weight it returns (built in the buffer of |scores|).
    """

    @staticmethod
    def forward(ctx, weight, scores, threshold: Threshold):
        """weight * mask_from_threshold(|scores|, threshold), in weight's dtype, for weight and
        scores of one shape (any; any dtypes torch multiplies). Saves weight and scores."""
        ctx.save_for_backward(weight, scores)
        return _masked(weight, scores, threshold)

    @staticmethod
    def backward(ctx, grad_out):
        """(None, grad_out * weight * sign(scores) in scores' dtype (when asked for), None); sign(0)
        = 0. As hidden-networks' GetSubnet backward (the gradient straight through the mask) applied
        through their |scores|."""
        weight, scores = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[1]:
            if (grad_out.dtype == weight.dtype == scores.dtype and scores.is_contiguous()
                    and grad_out.shape == scores.shape):
                # g * w * sign(s) (sign(0) = 0): sign into a reused scratch buffer, so the
                # returned gradient is the only weight-sized allocation.
                sign = torch.sign(scores, out=_scratch(scores.numel(), scores.device, scores.dtype)
                                  .view(scores.shape))
                grad_scores = torch.mul(grad_out, weight).mul_(sign)
            else:
                grad_scores = (grad_out * weight * torch.sign(scores)).to(scores.dtype)
        return None, grad_scores, None


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """weight * mask for a given Threshold (per-layer or global top-k), differentiable in the
    scores only (``MaskedWeight``: edge-popup's straight-through estimator, Ramanujan et al. 2020;
    the frozen weight gets no gradient). weight and scores: one shape, any; the result is in
    weight's dtype. The reference every fused path is tested against."""
    return MaskedWeight.apply(weight, scores, threshold)


# --- Sampled supermasks (Zhou et al. 2019, "Deconstructing lottery tickets") ----------------------
SAMPLED_EVAL = ("expected", "threshold")


class SampledMaskedWeight(torch.autograd.Function):
    """weight * m with m ~ Bernoulli(sigmoid(scores)); straight through the sampling, so
    d loss / d scores = (d loss / d masked weight) * weight * sigmoid'(scores)."""

    @staticmethod
    def forward(ctx, weight, scores):
        """weight * m, m ~ Bernoulli(sigmoid(scores)) drawn from torch's global RNG, one fresh draw
        per call; weight and scores of one shape. Saves weight and sigmoid(scores)."""
        p = torch.sigmoid(scores)
        ctx.save_for_backward(weight, p)
        return weight * torch.bernoulli(p)

    @staticmethod
    def backward(ctx, grad_out):
        """(None, grad_out * weight * p * (1 - p)), p = sigmoid(scores): straight through the
        Bernoulli draw (Zhou et al. 2019); the frozen weight gets no gradient."""
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
