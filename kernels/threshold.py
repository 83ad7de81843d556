"""Exact top-k threshold by a radix select over the float bits (no sort).

For |s| >= 0 the IEEE-754 bit pattern read as a (non-negative) int32 orders exactly like the
value, so the k-th largest |s| is found one byte at a time, most significant byte first:

* ``_radix_histogram_kernel`` reads the scores once and builds a 256-bin histogram of the current
  byte, counting only the entries whose higher bytes equal the prefix chosen so far;
* ``_radix_scan_kernel`` (one program) finds the bin holding the k-th largest entry, appends it to
  the prefix and subtracts the entries of higher bins from k.

fp32 needs 4 passes; fp16 (exactly representable in fp32, low 13 bits zero) 3; bf16 2. Everything
stays on the device; ``topk_threshold`` reads (ties, equal) with one host sync at the end to build
the ``Threshold``; ``topk_threshold_device`` (the ops' path) keeps them on the device.
After the last pass the prefix *is* the k-th largest value, ``k_rem`` the number of entries equal
to it that are kept (``ties``) and the last histogram bin the number of equal entries, split per
layer for global top-k (one histogram row per layer), so ``split = ties != equal``.

Warm start (``warm_topk_threshold_device`` with a layer's ``DeviceWarmStart``, what the ops'
Triton path runs every training step): supermask.mask's warm-start policy, the same one as the
reference and C paths (mask.py's policy functions compiled by triton.jit), run entirely on the
device. One pass counts the entries above a band around the last threshold and gathers the band's
few entries; the threshold, its ties and its tie limit are then selected among those. Only when
the counts do not prove the threshold inside the band does the cold radix select above answer
(its launches read a device flag and return at once otherwise). No host sync, and a fixed number
of launches per step: 13 for fp32 scores (fp16 11, bf16 9). Details above DeviceWarmStart.

Public: ``topk_threshold`` (a ``mask.Threshold``, one host sync), ``topk_threshold_device`` (cold,
no host sync), ``warm_topk_threshold_device`` and ``DeviceWarmStart`` (warm, no host sync),
``tie_limit``, ``global_thresholds``. Scores: float32, float16 or bfloat16, fewer than 2**31.
"""
from __future__ import annotations

import builtins
import types
from typing import Sequence

import torch
import triton
import triton.language as tl

from supermask import mask
from supermask.mask import Threshold, num_kept, refuse_nan

from . import _common

# (BLOCK, num_warps) for the histogram kernel; the AOT script compiles every one of them.
HISTOGRAM_CONFIGS = [(1024, 4), (2048, 4), (4096, 8)]
_INTERPRET_BLOCK = 1024


@triton.jit
def _gate_open(gate_ptr, GATED: tl.constexpr):
    """True unless GATED and the device flag at gate_ptr is 0 (the warm start's band proved the
    threshold: the cold select's launches then return at once, with no host round trip)."""
    if GATED:
        return tl.load(gate_ptr) != 0
    else:
        return True


@triton.jit
def _radix_histogram_kernel(x_ptr, n, state_ptr, hist_ptr, gate_ptr, SHIFT: tl.constexpr, BLOCK: tl.constexpr,
                            RANKS: tl.constexpr = 1, GATED: tl.constexpr = False):
    """hist[r, d] += #{i : byte SHIFT/8 of bits(|x_i|) == d and higher bytes == prefix_r}, for the
    RANKS (1 or 3) ranks selected at once (state: prefixes first, see _radix_scan_kernel)."""
    if _gate_open(gate_ptr, GATED):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        prefix0 = tl.load(state_ptr)
        prefix1 = prefix0
        prefix2 = prefix0
        if RANKS > 1:
            prefix1 = tl.load(state_ptr + 1)
            prefix2 = tl.load(state_ptr + 2)
        bins = tl.arange(0, 256)
        h0 = tl.zeros([256], dtype=tl.int32)
        h1 = tl.zeros([256], dtype=tl.int32)
        h2 = tl.zeros([256], dtype=tl.int32)
        # Grid-stride loop: a few programs per SM each keep private histograms in registers and
        # flush them with one 256-wide atomic add each, instead of one atomic per block of input.
        # int64 offsets: near 2**31 scores an int32 `start + BLOCK` would wrap
        for start in range(pid.to(tl.int64) * BLOCK, n, nprog * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n
            x = tl.load(x_ptr + offs, mask=inb, other=0.0)
            bits = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)  # sign bit cleared: >= 0
            digit = (bits >> SHIFT) & 255
            if SHIFT < 24:
                HIGH: tl.constexpr = -(1 << (SHIFT + 8))  # int32 mask of the bytes above this one
                h0 += tl.histogram(digit, 256, mask=inb & ((bits & HIGH) == prefix0))
                if RANKS > 1:
                    h1 += tl.histogram(digit, 256, mask=inb & ((bits & HIGH) == prefix1))
                    h2 += tl.histogram(digit, 256, mask=inb & ((bits & HIGH) == prefix2))
            else:  # first byte: no prefix yet, one histogram serves every rank
                h0 += tl.histogram(digit, 256, mask=inb)
        tl.atomic_add(hist_ptr + bins, h0, sem="relaxed")
        if RANKS > 1:
            if SHIFT >= 24:
                h1 = h0
                h2 = h0
            tl.atomic_add(hist_ptr + 256 + bins, h1, sem="relaxed")
            tl.atomic_add(hist_ptr + 512 + bins, h2, sem="relaxed")


@triton.jit
def _radix_scan_kernel(state_ptr, hist_ptr, n_hist, gate_ptr, SHIFT: tl.constexpr, RANKS: tl.constexpr = 1,
                       GATED: tl.constexpr = False):
    """state = [prefix_0..prefix_{R-1}, k_0..k_{R-1}, equal_total, equal_0, ..., equal_{n_hist-1}]
    (int32; R = RANKS ranks, the equal counts for rank 0); hist: (n_hist, RANKS, 256)."""
    if _gate_open(gate_ptr, GATED):
        bins = tl.arange(0, 256)
        for r in tl.static_range(RANKS):
            h = tl.zeros([256], dtype=tl.int32)
            for i in range(n_hist):
                h += tl.load(hist_ptr + (i * RANKS + r) * 256 + bins)
            prefix = tl.load(state_ptr + r)
            k = tl.load(state_ptr + RANKS + r)
            ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # entries with digit >= bin
            d = tl.max(tl.where(ge >= k, bins, -1), axis=0)  # highest bin still holding the k-th largest
            gt = tl.sum(tl.where(bins > d, h, 0), axis=0)
            tl.store(state_ptr + r, prefix | (d << SHIFT))
            tl.store(state_ptr + RANKS + r, k - gt)
            if r == 0:
                tl.store(state_ptr + 2 * RANKS, tl.sum(tl.where(bins == d, h, 0), axis=0))
                for i in range(n_hist):
                    hi = tl.load(hist_ptr + i * RANKS * 256 + bins)
                    tl.store(state_ptr + 2 * RANKS + 1 + i, tl.sum(tl.where(bins == d, hi, 0), axis=0))


_SHIFTS = {torch.float32: (24, 16, 8, 0), torch.float16: (24, 16, 8), torch.bfloat16: (24, 16)}


def _dense_flat(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of x's elements in memory order when x is dense (e.g. transposed): the histogram
    does not care about order, so no copy is needed. Falls back to a copy otherwise."""
    if x.is_contiguous():
        return x.reshape(-1)
    order = sorted(range(x.dim()), key=lambda d: x.stride(d), reverse=True)
    p = x.permute(order)
    return p.reshape(-1) if p.is_contiguous() else x.reshape(-1)


def _one_program_warps() -> int:
    return 1 if _common.interpreting() else 4


def _pass_config(n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, num_warps, grid) of a grid-stride pass over n scores: a few programs per SM."""
    if _common.interpreting():
        return _INTERPRET_BLOCK, 1, min(triton.cdiv(n, _INTERPRET_BLOCK), 2)
    block, warps = HISTOGRAM_CONFIGS[-1] if n >= (1 << 20) else HISTOGRAM_CONFIGS[0]
    return block, warps, max(1, min(triton.cdiv(n, block), 4 * _common.num_sms(device)))


def _histogram_launch(flat: torch.Tensor, state: torch.Tensor, hist: torch.Tensor, shift: int,
                      ranks: int = 1, gate: torch.Tensor | None = None):
    block, warps, grid = _pass_config(flat.numel(), flat.device)
    _radix_histogram_kernel[(grid,)](flat, flat.numel(), state, hist, state if gate is None else gate, SHIFT=shift,
                                     BLOCK=block, RANKS=ranks, GATED=gate is not None, num_warps=warps)


def _radix_select(flats: Sequence[torch.Tensor], n_keep: int, shifts) -> torch.Tensor:
    """Runs the passes; returns the int32 state tensor (on the device)."""
    dev = flats[0].device
    state = torch.zeros(3 + len(flats), dtype=torch.int32, device=dev)
    state[1] = n_keep
    hist = torch.zeros((len(shifts), len(flats), 1, 256), dtype=torch.int32, device=dev)
    for p, shift in enumerate(shifts):
        for i, f in enumerate(flats):
            _histogram_launch(f, state, hist[p, i], shift)
        _radix_scan_kernel[(1,)](state, hist[p], len(flats), state, SHIFT=shift, num_warps=_one_program_warps())
    return state


def _check(x: torch.Tensor):
    if x.dtype not in _SHIFTS:
        raise TypeError(f"scores must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() >= 2 ** 31:
        raise ValueError("radix select counts in int32: at most 2**31 - 1 scores")


def topk_threshold(scores: torch.Tensor, n_keep: int) -> Threshold:
    """Threshold keeping the n_keep largest |scores| (scores or magnitudes: |.| is taken in the
    kernel). Same (value, ties, split) as ``supermask.mask.topk_threshold(scores.abs(), n_keep)``.
    Raises ValueError for NaN scores (supermask.mask.NAN_MESSAGE; this function reads the device)."""
    _check(scores)
    refuse_nan(scores)
    _common.check_device(scores)
    n = scores.numel()
    if not 1 <= n_keep <= n:
        raise ValueError(f"k must be in [1, {n}], got {n_keep}")
    flat = _dense_flat(scores.detach())
    state = _radix_select([flat], n_keep, _SHIFTS[scores.dtype])
    value = state[0:1].view(torch.float32).reshape(()).to(scores.dtype)
    ties, equal = state[1:3].tolist()  # the one host sync
    return Threshold(value, ties, ties != equal)


def tie_limit(scores: torch.Tensor, value: torch.Tensor, ties) -> torch.Tensor:
    """The tie limit of a threshold, on the device (no host sync): a 0-dim int64 L such that the
    entries equal to value kept are those of flat index < L (n when every equal entry is kept).
    ties: how many equal entries are kept, a Python int or a 0-dim integer tensor."""
    counts = (scores.detach().abs() == value).reshape(-1).cumsum(0)
    if isinstance(ties, torch.Tensor):
        return torch.searchsorted(counts, ties.reshape(1).to(counts.dtype), right=True).reshape(())
    return torch.searchsorted(counts, ties, right=True).reshape(())


def topk_threshold_device(scores: torch.Tensor, n_keep: int):
    """(value, ties, limit), all on scores' device, with no host sync (the Triton path of the ops):
    value the n_keep-th largest |score| (0-dim, scores' dtype), ties how many entries equal to it
    are kept (0-dim int64, -1 when all of them), limit the flat index below which equal entries are
    kept (0-dim int64, see tie_limit). The kernels read value and limit from device memory.
    Raises TypeError/ValueError for an unsupported dtype, size or n_keep (host checks only)."""
    _check(scores)
    _common.check_device(scores)
    n = scores.numel()
    if not 1 <= n_keep <= n:
        raise ValueError(f"k must be in [1, {n}], got {n_keep}")
    state = _radix_select([_dense_flat(scores.detach())], n_keep, _SHIFTS[scores.dtype])
    value = state[0:1].view(torch.float32).reshape(()).to(scores.dtype)
    ties, equal = state[1].to(torch.int64), state[2].to(torch.int64)
    limit = tie_limit(scores, value, ties)
    return value, ties.masked_fill(ties == equal, -1), limit


def global_thresholds(scores: Sequence[torch.Tensor], k: float) -> list[Threshold]:
    """One threshold shared by several layers, as ``supermask.mask.global_thresholds``: keep
    num_kept(total, k) of all |scores|; ties at the shared value go out in layer order."""
    scores = [s.detach() for s in scores]
    if not scores:
        raise ValueError("no scores")
    for s in scores:
        _check(s)
        refuse_nan(s)
    _common.check_device(*scores)
    total = sum(s.numel() for s in scores)
    if total >= 2 ** 31:
        raise ValueError("radix select counts in int32: at most 2**31 - 1 scores")
    n_keep = num_kept(total, k)
    dtypes = {s.dtype for s in scores}
    shifts = max((_SHIFTS[d] for d in dtypes), key=len)
    state = _radix_select([_dense_flat(s) for s in scores], n_keep, shifts)
    value32 = state[0:1].view(torch.float32).reshape(())
    host = state.tolist()
    ties_left = host[1]
    out = []
    for i, s in enumerate(scores):
        v = value32.to(s.dtype)
        if len(dtypes) == 1:
            equal = host[3 + i]
        else:
            # Mixed dtypes: the reference compares each layer against the value rounded to that
            # layer's dtype, which the fp32 histogram cannot know; count it the same way.
            equal = int((s.abs() == v).sum())
        ties = min(ties_left, equal)
        ties_left -= ties
        out.append(Threshold(v, ties, ties != equal))
    return out


# ---------------------------------------------------------------------------------------------
# Warm start on the device (the ops' Triton path). The policy is supermask.mask's, the one of the
# reference and C paths: its very functions (band_half_width, band_edges, band_moved, cold_density)
# compiled by triton.jit, its constants passed in. A step is a fixed sequence of launches, with no
# host sync (the host never learns whether the band held the threshold):
#
#   plan     (1 program)  band [lo, hi] around the last threshold from the layer's device state;
#                         counters, the cold select's state and histograms zeroed; "cold" flag set
#   gather   (grid)       one pass over |s|: the count above hi, and the band's entries (bits and
#                         flat index) appended to a buffer of _BAND_CAP slots
#   select   (1 program)  if the counts prove the threshold inside the band and the band fits the
#                         buffer: the exact threshold among the band's entries (bitwise search on
#                         the float bits), its ties and tie limit (the same search on the indices),
#                         the policy's state update, and the "cold" flag cleared
#   radix    (2 per byte) the cold radix select, for 3 ranks at once (n_keep and n_keep -+ q, the
#                         policy's density ranks): every launch reads the flag and returns at once
#                         when the band held the threshold
#   ties     (grid)       cold and split ties only: the count of entries equal to the threshold per
#                         chunk of the scores
#   finish   (1 program)  cold only: the threshold, its ties and tie limit (the chunk holding the
#                         last kept tie, then the entry), the policy's cold-start state
#
# fp32 scores: 13 launches per step (fp16 11, bf16 9), whichever way the step is answered; a hit
# reads the scores once (the cold select 4 times and once more for split ties).
# ---------------------------------------------------------------------------------------------
def _on_device(fn):
    """mask.py's policy function fn compiled by triton.jit: the same code object (the same source,
    which Triton parses), given globals in which Triton (and its interpreter) finds triton.language."""
    scope = {"tl": tl, "__builtins__": builtins, "__name__": fn.__module__}
    return triton.jit(types.FunctionType(fn.__code__, scope, fn.__name__))


_band_half_width = _on_device(mask.band_half_width)
_band_edges = _on_device(mask.band_edges)
_band_moved = _on_device(mask.band_moved)
_cold_density = _on_device(mask.cold_density)

_BAND_CAP = 4 * mask._BAND_TARGET_MAX  # band entries the select kernel takes (more: the cold select)
_COLD_RANKS = 3  # the threshold's rank and the two density ranks
# ints: [valid, cold, count above hi, band entries, warm steps, cold steps]; floats: [value,
# density, shift, lo, hi] (the policy's state in fp32; lo < 0: no band this step)
_VALID, _COLD, _ABOVE, _IN_BAND, _N_WARM, _N_COLD = (tl.constexpr(i) for i in range(6))
_VALUE, _DENSITY, _SHIFT, _LO, _HI = (tl.constexpr(i) for i in range(5))


@triton.jit
def _warm_plan_kernel(floats_ptr, ints_ptr, radix_ptr, hist_ptr, n_hist_words, n_keep, k_above, k_below, target,
                      BAND_SHIFT: tl.constexpr, HBLOCK: tl.constexpr):
    value = tl.load(floats_ptr + _VALUE)
    density = tl.load(floats_ptr + _DENSITY)
    usable = (tl.load(ints_ptr + _VALID) != 0) & (density > 0)
    half = _band_half_width(target.to(tl.float32), tl.where(usable, density, 1.0), tl.load(floats_ptr + _SHIFT),
                            BAND_SHIFT)
    lo, hi = _band_edges(value, half)
    tl.store(floats_ptr + _LO, tl.where(usable, lo, -1.0))
    tl.store(floats_ptr + _HI, hi)
    tl.store(ints_ptr + _COLD, 1)  # until the select kernel proves the band's answer
    tl.store(ints_ptr + _ABOVE, 0)
    tl.store(ints_ptr + _IN_BAND, 0)
    # the cold select's state: [prefixes (3), ranks (3), equal_total, equal_0]
    slots = tl.arange(0, 8)
    init = tl.where(slots == 3, n_keep, tl.where(slots == 4, k_above, tl.where(slots == 5, k_below, 0)))
    tl.store(radix_ptr + slots, init)
    for start in range(0, n_hist_words, HBLOCK):
        offs = start + tl.arange(0, HBLOCK)
        tl.store(hist_ptr + offs, tl.zeros([HBLOCK], dtype=tl.int32), mask=offs < n_hist_words)


@triton.jit
def _warm_gather_kernel(x_ptr, n, floats_ptr, ints_ptr, band_bits_ptr, band_index_ptr, CAP: tl.constexpr,
                        BLOCK: tl.constexpr):
    lo = tl.load(floats_ptr + _LO)
    if lo >= 0:
        hi = tl.load(floats_ptr + _HI)
        pid = tl.program_id(0)
        above = pid * 0
        # grid-stride, int64 offsets (see _radix_histogram_kernel)
        for start in range(pid.to(tl.int64) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n
            a = tl.abs(tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32))
            above += tl.sum((inb & (a > hi)).to(tl.int32), axis=0)
            inside = (inb & (a >= lo) & (a <= hi)).to(tl.int32)
            count = tl.sum(inside, axis=0)
            if count > 0:  # one atomic per block that holds band entries: slots for them
                slot = tl.atomic_add(ints_ptr + _IN_BAND, count, sem="relaxed") + tl.cumsum(inside, axis=0) - 1
                keep = (inside != 0) & (slot < CAP)
                tl.store(band_bits_ptr + slot, a.to(tl.int32, bitcast=True), mask=keep)
                tl.store(band_index_ptr + slot, offs.to(tl.int32), mask=keep)
        tl.atomic_add(ints_ptr + _ABOVE, above, sem="relaxed")


@triton.jit
def _largest_with_count(keys, r):
    """The largest t in [0, 2**31) with #{keys >= t} >= r (keys: int32, -1 for empty slots): the
    r-th largest key. A bitwise descent, 31 counts."""
    ans = r * 0
    for b in range(30, -1, -1):  # a loop, not unrolled: 31 steps of one count each
        cand = ans | (1 << b)
        ans = tl.where(tl.sum((keys >= cand).to(tl.int32), axis=0) >= r, cand, ans)
    return ans


@triton.jit
def _nth_smallest(keys, r):
    """The r-th smallest key (int32 in [0, 2**31 - 1), 2**31 - 1 for slots left out): the largest t
    with fewer than r keys below it. The same descent."""
    ans = r * 0
    for b in range(30, -1, -1):  # a loop, not unrolled: 31 steps of one count each
        cand = ans | (1 << b)
        ans = tl.where(tl.sum((keys < cand).to(tl.int32), axis=0) < r, cand, ans)
    return ans


@triton.jit
def _store_threshold(value_ptr, ties_ptr, limit_ptr, vbits, ties, equal, limit):
    """value (in the output's dtype), ties (-1: every equal entry kept), limit: int64."""
    tl.store(value_ptr, vbits.to(tl.float32, bitcast=True).to(value_ptr.dtype.element_ty))
    tl.store(ties_ptr, tl.where(ties == equal, -1, ties).to(tl.int64))
    tl.store(limit_ptr, limit.to(tl.int64))


@triton.jit
def _warm_select_kernel(floats_ptr, ints_ptr, band_bits_ptr, band_index_ptr, value_ptr, ties_ptr, limit_ptr,
                        n, n_keep, CAP: tl.constexpr):
    lo = tl.load(floats_ptr + _LO)
    hi = tl.load(floats_ptr + _HI)
    n_band = tl.load(ints_ptr + _IN_BAND)
    r = n_keep - tl.load(ints_ptr + _ABOVE)  # the threshold's rank inside the band
    if (lo >= 0) & (r >= 1) & (r <= n_band) & (n_band <= CAP):
        slots = tl.arange(0, CAP)
        inb = slots < n_band
        bits = tl.load(band_bits_ptr + slots, mask=inb, other=-1)
        vbits = _largest_with_count(bits, r)
        equal_mask = bits == vbits  # every entry equal to the threshold lies in the band
        ties = r - tl.sum((bits > vbits).to(tl.int32), axis=0)
        equal = tl.sum(equal_mask.to(tl.int32), axis=0)
        # tie limit: 1 + the flat index of the ties-th equal entry, i.e. the largest t with fewer
        # than `ties` equal entries below it (the same descent on the indices)
        index = tl.where(equal_mask, tl.load(band_index_ptr + slots, mask=inb, other=0), (1 << 31) - 1)
        last = _nth_smallest(index, ties)
        _store_threshold(value_ptr, ties_ptr, limit_ptr, vbits, ties, equal, tl.where(ties == equal, n, last + 1))
        v = vbits.to(tl.float32, bitcast=True)
        density, shift = _band_moved(tl.load(floats_ptr + _VALUE), tl.load(floats_ptr + _DENSITY), v,
                                     n_band.to(tl.float32), hi - lo)
        tl.store(floats_ptr + _VALUE, v)
        tl.store(floats_ptr + _DENSITY, density)
        tl.store(floats_ptr + _SHIFT, shift)
        tl.store(ints_ptr + _COLD, 0)
        tl.store(ints_ptr + _N_WARM, tl.load(ints_ptr + _N_WARM) + 1)


@triton.jit
def _cold_and_split(ints_ptr, radix_ptr, RANKS: tl.constexpr):
    """The step fell back to the cold select and the threshold's ties are split (some dropped)."""
    return (tl.load(ints_ptr + _COLD) != 0) & (tl.load(radix_ptr + RANKS) != tl.load(radix_ptr + 2 * RANKS))


@triton.jit
def _tie_count_kernel(x_ptr, n, ints_ptr, radix_ptr, counts_ptr, chunk, RANKS: tl.constexpr, BLOCK: tl.constexpr):
    """counts[p] = entries equal to the cold threshold in chunk p ([p * chunk, (p + 1) * chunk))."""
    if _cold_and_split(ints_ptr, radix_ptr, RANKS):
        vbits = tl.load(radix_ptr)
        pid = tl.program_id(0)
        begin = pid.to(tl.int64) * chunk
        end = tl.minimum(begin + chunk, n)
        count = pid * 0
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            bits = tl.abs(tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)).to(tl.int32, bitcast=True)
            count += tl.sum(((offs < end) & (bits == vbits)).to(tl.int32), axis=0)
        tl.store(counts_ptr + pid, count)


@triton.jit
def _cold_tie_limit(x_ptr, n, vbits, ties, counts_ptr, n_chunks, chunk, MAX_CHUNKS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """1 + the flat index of the ties-th entry equal to the threshold: the chunk that holds it (from
    the per-chunk counts), then the entry within that chunk."""
    chunks = tl.arange(0, MAX_CHUNKS)
    counts = tl.load(counts_ptr + chunks, mask=chunks < n_chunks, other=0)
    j = tl.min(tl.where(tl.cumsum(counts, axis=0) >= ties, chunks, MAX_CHUNKS), axis=0)
    need = ties - tl.sum(tl.where(chunks < j, counts, 0), axis=0)
    begin = j.to(tl.int64) * chunk
    end = tl.minimum(begin + chunk, n)
    limit = begin * 0 - 1
    seen = need * 0
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        bits = tl.abs(tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)).to(tl.int32, bitcast=True)
        equal = ((offs < end) & (bits == vbits)).to(tl.int32)
        at = tl.min(tl.where((equal != 0) & (seen + tl.cumsum(equal, axis=0) == need), offs, n), axis=0)
        limit = tl.where((limit < 0) & (at < n), at + 1, limit)
        seen += tl.sum(equal, axis=0)
    return limit


@triton.jit
def _cold_finish_kernel(x_ptr, n, q, floats_ptr, ints_ptr, radix_ptr, counts_ptr, n_chunks, chunk, value_ptr,
                        ties_ptr, limit_ptr, RANKS: tl.constexpr, MAX_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    if tl.load(ints_ptr + _COLD) != 0:
        vbits = tl.load(radix_ptr)
        ties = tl.load(radix_ptr + RANKS)
        equal = tl.load(radix_ptr + 2 * RANKS)
        limit = n.to(tl.int64)
        if ties != equal:
            limit = _cold_tie_limit(x_ptr, n, vbits, ties, counts_ptr, n_chunks, chunk, MAX_CHUNKS, BLOCK)
        _store_threshold(value_ptr, ties_ptr, limit_ptr, vbits, ties, equal, limit)
        # the policy's cold start: the density between the selections q ranks either side
        above_bits, below_bits = tl.load(radix_ptr + 1), tl.load(radix_ptr + 2)
        width = above_bits.to(tl.float32, bitcast=True) - below_bits.to(tl.float32, bitcast=True)
        tl.store(floats_ptr + _VALUE, vbits.to(tl.float32, bitcast=True))
        tl.store(floats_ptr + _DENSITY, _cold_density(q, width))
        tl.store(floats_ptr + _SHIFT, 0.0)
        tl.store(ints_ptr + _VALID, 1)
        tl.store(ints_ptr + _N_COLD, tl.load(ints_ptr + _N_COLD) + 1)


class DeviceWarmStart:
    """A layer's warm-start state for ``warm_topk_threshold_device``, all in device memory: the
    policy's state (last threshold, density, shift; fp32), the step's counters and band buffer
    (_BAND_CAP entries), the cold select's state and histograms. Valid for one key (numel, n_keep,
    dtype, device); a new key starts cold. Kept by the ops in their per-layer state
    (``supermask.ops.LayerState.device_warm``); outside any state_dict."""

    __slots__ = ("key", "floats", "ints", "band_bits", "band_index", "radix", "hist", "counts")

    def __init__(self):
        self.key = None

    def _start(self, key, device: torch.device, passes: int, max_chunks: int) -> None:
        self.key = key
        self.floats = torch.zeros(8, dtype=torch.float32, device=device)
        self.ints = torch.zeros(8, dtype=torch.int32, device=device)
        self.band_bits = torch.empty(_BAND_CAP, dtype=torch.int32, device=device)
        self.band_index = torch.empty(_BAND_CAP, dtype=torch.int32, device=device)
        self.radix = torch.zeros(8, dtype=torch.int32, device=device)
        self.hist = torch.zeros((passes, 1, _COLD_RANKS, 256), dtype=torch.int32, device=device)
        self.counts = torch.zeros(max_chunks, dtype=torch.int32, device=device)

    def steps(self) -> tuple[int, int]:
        """(warm, cold): how many steps the band answered and how many the cold select (a host read:
        for tests and diagnostics, never called by the ops)."""
        if self.key is None:
            return 0, 0
        ints = self.ints.tolist()
        return ints[_N_WARM.value], ints[_N_COLD.value]


def warm_topk_threshold_device(scores: torch.Tensor, n_keep: int, warm: DeviceWarmStart):
    """``topk_threshold_device(scores, n_keep)`` warm-started from ``warm`` (updated on the device):
    the same (value, ties, limit) device tensors, exact whichever way the step is answered, in a
    fixed sequence of launches with no host sync (see the comment above DeviceWarmStart).
    Non-contiguous scores take the cold select (the band records flat indices in memory order).
    Raises TypeError/ValueError as topk_threshold_device (host checks only)."""
    _check(scores)
    _common.check_device(scores)
    n = scores.numel()
    if not 1 <= n_keep <= n:
        raise ValueError(f"k must be in [1, {n}], got {n_keep}")
    if not scores.is_contiguous():
        return topk_threshold_device(scores, n_keep)
    dev, shifts = scores.device, _SHIFTS[scores.dtype]
    flat = scores.detach().reshape(-1)
    block, warps, grid = _pass_config(n, dev)
    max_chunks = triton.next_power_of_2(grid)
    key = (n, n_keep, scores.dtype, dev)
    if warm.key != key:
        warm._start(key, dev, len(shifts), max_chunks)
    value = torch.empty((), dtype=scores.dtype, device=dev)
    ties = torch.empty((), dtype=torch.int64, device=dev)
    limit = torch.empty((), dtype=torch.int64, device=dev)
    q = mask.density_ranks(n, n_keep)
    one = _one_program_warps()
    _warm_plan_kernel[(1,)](warm.floats, warm.ints, warm.radix, warm.hist, warm.hist.numel(), n_keep, n_keep - q,
                            n_keep + q, mask.band_target(n), BAND_SHIFT=mask._BAND_SHIFT, HBLOCK=1024, num_warps=one)
    _warm_gather_kernel[(grid,)](flat, n, warm.floats, warm.ints, warm.band_bits, warm.band_index, CAP=_BAND_CAP,
                                 BLOCK=block, num_warps=warps)
    _warm_select_kernel[(1,)](warm.floats, warm.ints, warm.band_bits, warm.band_index, value, ties, limit, n, n_keep,
                              CAP=_BAND_CAP, num_warps=one if _common.interpreting() else 8)
    gate = warm.ints[_COLD.value:]
    for p, shift in enumerate(shifts):
        _histogram_launch(flat, warm.radix, warm.hist[p], shift, ranks=_COLD_RANKS, gate=gate)
        _radix_scan_kernel[(1,)](warm.radix, warm.hist[p], 1, gate, SHIFT=shift, RANKS=_COLD_RANKS, GATED=True,
                                 num_warps=one)
    chunk = triton.cdiv(n, grid)
    _tie_count_kernel[(grid,)](flat, n, warm.ints, warm.radix, warm.counts, chunk, RANKS=_COLD_RANKS, BLOCK=block,
                               num_warps=warps)
    _cold_finish_kernel[(1,)](flat, n, q, warm.floats, warm.ints, warm.radix, warm.counts, grid, chunk, value, ties,
                              limit, RANKS=_COLD_RANKS, MAX_CHUNKS=max_chunks, BLOCK=block, num_warps=one)
    return value, ties, limit
