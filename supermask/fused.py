"""The reference path's per-step passes over the scores, each fused into one loop.

A supermask step reads every score a few times: to count the scores in a band around the last
threshold, to build the masked weight, and for the straight-through gradient. Written as eager
torch ops each of these is three to five passes over weight-sized tensors (abs, compares, bool
reductions, multiplies), which on a CPU cost more than the layer's matmul saves. ``torch.compile``
turns each function below into a single C++/OpenMP loop (Triton on CUDA), so a step costs about
what dense training costs.

The functions are plain torch and give bit-identical results compiled or not: compilation only
changes speed. It is used for layers of at least ``MIN_NUMEL`` weights, when a compiler works here
(a failure falls back to eager with one warning), and can be turned off with SUPERMASK_COMPILE=0.
The first compilation takes ~30 s on a fresh machine; torch caches it on disk for later processes.
"""
from __future__ import annotations

import os
import warnings

import torch

MIN_NUMEL = 1 << 17  # smaller layers: eager is cheap enough, and compiling is not worth it
GROUP = 16  # rows of the (GROUP, n / GROUP) view whose column counts locate band entries


def band_counts(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """For s viewed as (GROUP, m): how many |s| > hi, how many |s| >= lo, and per column how many
    lie in [lo, hi] (which columns hold the band)."""
    a = s.abs()
    above = a > hi
    at_least = a >= lo
    cols = (at_least & ~above).sum(0, dtype=torch.int32)
    return above.sum(), at_least.sum(), cols


def masked_above_band(weight: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """band_counts, and in the same pass the weight where |s| > hi (the entries certainly kept
    when the threshold lies in [lo, hi]; the caller then sets the band entries it keeps)."""
    c_hi, c_lo, cols = band_counts(s, lo, hi)
    return torch.where(s.abs() > hi, weight, torch.zeros((), dtype=weight.dtype)), c_hi, c_lo, cols


def masked(weight: torch.Tensor, scores: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight where |score| >= value, else 0."""
    return torch.where(scores.abs() >= value, weight, torch.zeros((), dtype=weight.dtype))


def ste_grad(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Straight-through gradient of the scores: grad * weight * sign(scores) (sign(0) = 0)."""
    return grad * weight * torch.sign(scores)


_EAGER = {"band_counts": band_counts, "masked_above_band": masked_above_band, "masked": masked,
          "ste_grad": ste_grad}
_compiled: dict = {}
_broken = False


def _wanted(t: torch.Tensor) -> bool:
    return (not _broken and t.numel() >= MIN_NUMEL and os.environ.get("SUPERMASK_COMPILE", "1") != "0"
            and t.device.type in ("cpu", "cuda"))


def call(name: str, *args):
    """Run one of the functions above, compiled when worthwhile and possible."""
    global _broken
    fn = _EAGER[name]
    if not _wanted(args[0]):
        return fn(*args)
    compiled = _compiled.get(name)
    if compiled is None:
        # dynamic=None: specialised on the first shape (fastest code), shape-generic after a change
        compiled = _compiled[name] = torch.compile(fn, fullgraph=True)
    try:
        return compiled(*args)
    except Exception as e:  # noqa: BLE001 (no compiler, unsupported platform: stay correct, go eager)
        _broken = True
        warnings.warn(f"supermask: torch.compile unavailable ({type(e).__name__}); using eager passes "
                      "(slower; set SUPERMASK_COMPILE=0 to silence)", stacklevel=2)
        return fn(*args)
