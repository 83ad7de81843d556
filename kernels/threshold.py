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
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from supermask.mask import Threshold, num_kept, refuse_nan

from . import _common

# (BLOCK, num_warps) for the histogram kernel; the AOT script compiles every one of them.
HISTOGRAM_CONFIGS = [(1024, 4), (2048, 4), (4096, 8)]
_INTERPRET_BLOCK = 1024


@triton.jit
def _radix_histogram_kernel(x_ptr, n, state_ptr, hist_ptr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """hist[d] += #{i : byte SHIFT/8 of bits(|x_i|) == d and higher bytes == prefix}."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    prefix = tl.load(state_ptr)
    bins = tl.arange(0, 256)
    hist = tl.zeros([256], dtype=tl.int32)
    # Grid-stride loop: a few programs per SM each keep a private histogram in registers and
    # flush it with one 256-wide atomic add, instead of one atomic per block of input.
    # int64 offsets: near 2**31 scores an int32 `start + BLOCK` would wrap
    for start in range(pid.to(tl.int64) * BLOCK, n, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < n
        x = tl.load(x_ptr + offs, mask=inb, other=0.0)
        bits = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)  # sign bit cleared: >= 0
        sel = inb
        if SHIFT < 24:
            HIGH: tl.constexpr = -(1 << (SHIFT + 8))  # int32 mask of the bytes above this one
            sel = sel & ((bits & HIGH) == prefix)
        digit = (bits >> SHIFT) & 255
        hist += tl.histogram(digit, 256, mask=sel)
    tl.atomic_add(hist_ptr + bins, hist, sem="relaxed")


@triton.jit
def _radix_scan_kernel(state_ptr, hist_ptr, n_hist, SHIFT: tl.constexpr):
    """state = [prefix, k_rem, equal_total, equal_0, ..., equal_{n_hist-1}] (int32)."""
    bins = tl.arange(0, 256)
    h = tl.zeros([256], dtype=tl.int32)
    for i in range(n_hist):
        h += tl.load(hist_ptr + i * 256 + bins)
    prefix = tl.load(state_ptr)
    k = tl.load(state_ptr + 1)
    ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # entries with digit >= bin
    d = tl.max(tl.where(ge >= k, bins, -1), axis=0)  # highest bin still holding the k-th largest
    gt = tl.sum(tl.where(bins > d, h, 0), axis=0)
    eq = tl.sum(tl.where(bins == d, h, 0), axis=0)
    tl.store(state_ptr, prefix | (d << SHIFT))
    tl.store(state_ptr + 1, k - gt)
    tl.store(state_ptr + 2, eq)
    for i in range(n_hist):
        hi = tl.load(hist_ptr + i * 256 + bins)
        tl.store(state_ptr + 3 + i, tl.sum(tl.where(bins == d, hi, 0), axis=0))


_SHIFTS = {torch.float32: (24, 16, 8, 0), torch.float16: (24, 16, 8), torch.bfloat16: (24, 16)}


def _dense_flat(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of x's elements in memory order when x is dense (e.g. transposed): the histogram
    does not care about order, so no copy is needed. Falls back to a copy otherwise."""
    if x.is_contiguous():
        return x.reshape(-1)
    order = sorted(range(x.dim()), key=lambda d: x.stride(d), reverse=True)
    p = x.permute(order)
    return p.reshape(-1) if p.is_contiguous() else x.reshape(-1)


def _histogram_launch(flat: torch.Tensor, state: torch.Tensor, hist: torch.Tensor, shift: int):
    n = flat.numel()
    if _common.interpreting():
        block, warps, grid = _INTERPRET_BLOCK, 1, min(triton.cdiv(n, _INTERPRET_BLOCK), 2)
    else:
        block, warps = HISTOGRAM_CONFIGS[-1] if n >= (1 << 20) else HISTOGRAM_CONFIGS[0]
        grid = max(1, min(triton.cdiv(n, block), 4 * _common.num_sms(flat.device)))
    _radix_histogram_kernel[(grid,)](flat, n, state, hist, SHIFT=shift, BLOCK=block, num_warps=warps)


def _radix_select(flats: Sequence[torch.Tensor], n_keep: int, shifts) -> torch.Tensor:
    """Runs the passes; returns the int32 state tensor (on the device)."""
    dev = flats[0].device
    state = torch.zeros(3 + len(flats), dtype=torch.int32, device=dev)
    state[1] = n_keep
    hist = torch.zeros((len(shifts), len(flats), 256), dtype=torch.int32, device=dev)
    for p, shift in enumerate(shifts):
        for i, f in enumerate(flats):
            _histogram_launch(f, state, hist[p, i], shift)
        _radix_scan_kernel[(1,)](state, hist[p], len(flats), SHIFT=shift, num_warps=1 if _common.interpreting() else 4)
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
