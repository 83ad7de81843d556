"""Exact k-th largest selection (the threshold of a top-k mask), without sorting.

``kth_largest(x, k)`` returns exactly what ``torch.kthvalue(x, n - k + 1)`` returns for every input
without NaN, but for large inputs it never runs a quickselect over all of x:

1. draw a small random sample of x with a private ``torch.Generator`` (the global RNG is never
   touched, so training stays reproducible; the sample only decides speed, never the answer);
2. take two order statistics of the sample as a band ``[lo, hi]`` that contains the answer with
   high probability;
3. one compare pass per bound (float 0/1 output, the fastest compare CPU torch has) counts exactly
   how many entries lie above ``hi`` and at or above ``lo``. These counts *prove* whether the answer
   is inside the band. If not, fall back to ``torch.kthvalue`` (rare; exact);
4. the few band entries are gathered in groups of ``_GROUP`` (a per-group count picks the groups,
   so compaction runs over n / 16 numbers instead of n), and the selection recurses on them.

``select_counts`` returns, besides the value, how many entries are strictly above it and how many
equal it, which is what a top-k ``Threshold`` needs; they fall out of the band counts for free.
Plain torch only (no NumPy), so it runs unchanged on any device torch supports.
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch

# At or below this many elements torch.kthvalue is used directly (it is fast on small inputs).
KTH_DIRECT_MAX = 16384
# Group size for band compaction.
_GROUP = 16
# Band half-width in sample standard deviations (each side fails with probability ~2e-4).
_Z = 3.5
# First-round sample size, and the band-sample size of the second round.
_SAMPLE = 4096
_SAMPLE2 = 1024
# A second round runs when the first band would hold more than n / _REFINE_RATIO entries.
_REFINE_RATIO = 200
# float32 sums of 0/1 values are exact below 2**24.
_FLOAT32_EXACT = 1 << 24

_FAST_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_generators: dict[str, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    """A private, fixed-seed generator per device: sampling never touches torch's global RNG."""
    key = str(device)
    g = _generators.get(key)
    if g is None:
        g = torch.Generator(device=device)
        g.manual_seed(0x5EED_70C)
        _generators[key] = g
    return g


class Selection(NamedTuple):
    """The answer of ``select_counts(x, k)``: the k-th largest value of x and how many entries lie
    strictly above it and equal to it (above < k <= above + equal), which a Threshold needs to
    break ties without another pass."""

    value: torch.Tensor  # 0-dim, x's dtype: the k-th largest
    above: int  # entries strictly greater than value
    equal: int  # entries equal to value


def _check(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of x (flattened), 1 <= k <= x.numel(), as a 0-dim tensor of x's dtype."""
    flat = x.reshape(-1)
    n = flat.numel()
    _check(n, k)
    if n <= KTH_DIRECT_MAX or flat.dtype not in _FAST_DTYPES:
        return torch.kthvalue(flat, n - k + 1).values  # small: no counts needed
    return select_counts(flat, k).value


def _direct(flat: torch.Tensor, k: int) -> Selection:
    n = flat.numel()
    v = torch.kthvalue(flat, n - k + 1).values
    above = int(torch.count_nonzero(flat > v))
    equal = int(torch.count_nonzero(flat == v))
    return Selection(v, above, equal)


def select_counts(x: torch.Tensor, k: int) -> Selection:
    """k-th largest of x (flattened) with the number of entries above and equal to it."""
    flat = x.reshape(-1)
    n = flat.numel()
    _check(n, k)
    if n > KTH_DIRECT_MAX and flat.dtype in _FAST_DTYPES:
        res = _select_band(flat, k)
        if res is not None:
            return res
    return _direct(flat, k)


def _order_stat_bounds(sample: torch.Tensor, k: int, n: int):
    """(lo, hi) order statistics of a sample around the quantile of rank k (largest first) of n."""
    s = sample.numel()
    p = k / n
    mu = p * s  # expected rank (largest first) of the answer inside the sample
    sd = math.sqrt(s * p * (1.0 - p)) + 1.0
    r_hi = int(math.floor(mu - _Z * sd - 1))  # rank (largest first) of the upper bound
    r_lo = int(math.ceil(mu + _Z * sd + 1))
    hi = torch.kthvalue(sample, s - r_hi + 1).values if r_hi >= 1 else None
    lo = torch.kthvalue(sample, s - r_lo + 1).values if r_lo <= s else None
    return lo, hi


_local = threading.local()  # per-thread scratch buffers (autograd may run on several threads)
# Scratch buffers up to this many elements are kept between calls (fresh multi-megabyte buffers
# cost page faults on every call); larger ones are allocated per call.
_SCRATCH_KEEP = 1 << 22


def _scratch(n: int, device: torch.device, dtype: torch.dtype = torch.float32, slot: int = 0) -> torch.Tensor:
    """A scratch vector of n elements (contents undefined), reused between calls on this thread;
    different slots are different buffers. Slot 0: one pass at a time (selection counts, the warm
    band pass, the sign in MaskedWeight's backward); 1-2: drawing candidates; 3-4: guessing from
    them (supermask.mask), which may call the selection (slot 0) in between."""
    if n > _SCRATCH_KEEP:
        return torch.empty(n, dtype=dtype, device=device)
    cache = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    key = (str(device), dtype, slot)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(max(n, 1 << 16), dtype=dtype, device=device)
        cache[key] = buf
    return buf[:n]


class _Counter:
    """Exact compare-and-count passes over one flat tensor, reusing one float scratch buffer.

    The main part (the first n0 = n - n % _GROUP entries) is viewed as (_GROUP, n0 / _GROUP); a
    column sum of the float 0/1 indicator gives per-column counts, from which both the total and
    the columns holding band entries follow, at 1/16 of the size."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat
        self.n = flat.numel()
        self.n0 = self.n - self.n % _GROUP
        self.buf = _scratch(self.n, flat.device)

    def count(self, op, bound):
        """(total, column counts, tail indicator) of op(flat, bound)."""
        op(self.flat, bound, out=self.buf)
        cols = self.buf[: self.n0].view(_GROUP, -1).sum(0)
        tail = self.buf[self.n0:].clone()
        total = cols.sum(dtype=torch.float64) if self.n0 >= _FLOAT32_EXACT else cols.sum()
        return int(total.item()) + int(tail.sum().item()), cols, tail

    def bounds(self, lo, hi):
        """Exact (count > hi, count >= lo, column band counts, tail band indicator)."""
        c_hi, c_lo = 0, self.n
        cols = tail = None
        if hi is not None:
            c_hi, cols_hi, tail_hi = self.count(torch.gt, hi)
            cols, tail = cols_hi.neg_().add_(_GROUP), tail_hi.neg_().add_(1.0)  # entries <= hi
        if lo is not None:
            c_lo, cols_lo, tail_lo = self.count(torch.ge, lo)
            if cols is None:
                cols, tail = cols_lo, tail_lo
            else:
                cols, tail = cols.add_(cols_lo).sub_(_GROUP), tail.add_(tail_lo).sub_(1.0)
        return c_hi, c_lo, cols, tail


def _sample(flat: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """About `size` entries of flat, drawn as random runs of _GROUP consecutive entries (one cache
    line each: random single-element gathers cost a cache miss per element). The sample only
    steers the speed; a poor one (e.g. sorted input) just ends in the exact fallback."""
    n0 = flat.numel() - flat.numel() % _GROUP
    rows = max(1, min(n0 // _GROUP, size // _GROUP))
    idx = torch.randint(n0 // _GROUP, (rows,), device=flat.device, generator=gen)
    return flat[:n0].view(-1, _GROUP).index_select(0, idx).reshape(-1)


def _in_band(x: torch.Tensor, lo, hi) -> torch.Tensor:
    if lo is None:
        return x <= hi
    if hi is None:
        return x >= lo
    return (x >= lo) & (x <= hi)


def _select_band(flat: torch.Tensor, k: int) -> Selection | None:
    n = flat.numel()
    gen = _generator(flat.device)
    counter = _Counter(flat)
    sample = _sample(flat, _SAMPLE, gen)
    lo, hi = _order_stat_bounds(sample, k, n)
    c_hi, c_lo, cols, tail = counter.bounds(lo, hi)
    # NaN never compares true, so with NaN present the counts may not add up: fall back.
    if not (c_hi < k <= c_lo):
        return None
    if lo is not None and hi is not None and bool(lo == hi):
        # The band is a single value (heavy ties): that value is the answer.
        return Selection(lo, c_hi, c_lo - c_hi)
    if c_lo - c_hi > n // _REFINE_RATIO:
        # Second round: a sample of the band (rejection sampling), tighter bounds, exact counts.
        frac = (c_lo - c_hi) / n
        draws = min(n, int(_SAMPLE2 / frac) + 1)
        cand = _sample(flat, draws, gen)
        sample2 = cand[_in_band(cand, lo, hi)]
        if sample2.numel() >= 64:
            lo2, hi2 = _order_stat_bounds(sample2, k - c_hi, c_lo - c_hi)
            lo2 = lo if lo2 is None else lo2
            hi2 = hi if hi2 is None else hi2
            r = counter.bounds(lo2, hi2)
            if r[0] < k <= r[1]:
                lo, hi = lo2, hi2
                c_hi, c_lo, cols, tail = r
            else:
                c_hi, c_lo, cols, tail = counter.bounds(lo, hi)
    size = c_lo - c_hi
    if size > n // 2:
        return None  # the band did not narrow things down (e.g. huge ties): use kthvalue
    n0 = counter.n0
    del counter
    # Columns of the (_GROUP, n0 / _GROUP) view that hold band entries, then the entries.
    cidx = torch.nonzero(cols).squeeze(1)
    block = flat[:n0].view(_GROUP, -1).index_select(1, cidx)
    keep = _in_band(block, lo, hi)
    band = block[keep]
    if n0 < n:
        band = torch.cat([band, flat[n0:][tail.bool()]])
    if band.numel() != size:  # cannot happen without NaN; be safe rather than wrong
        return None
    sub = select_counts(band, k - c_hi)
    return Selection(sub.value, c_hi + sub.above, sub.equal)
