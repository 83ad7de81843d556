"""Fused masked weight for convolutions (and anything else that wants W * mask materialized).

``_masked_weight_kernel`` reads W and S once and writes where(|S| >= v, W, 0) once;
``_ste_grad_kernel`` is its backward, grad * W * sign(S), also in one pass. Both take up to 4-D
tensors of any strides: when every operand is contiguous they walk flat offsets (vectorized,
coalesced); otherwise the flat index is unravelled against the shape and each operand's strides.
The output is contiguous.

When ``threshold.split`` is True the surviving entries equal to v are the first ones in flat order:
``masked_weight_kernel`` takes them as a tie limit (a flat index, a device tensor: see
threshold.tie_limit); ``masked_weight_fused`` (a host Threshold) uses the reference
``supermask.mask.masked_weight`` for that (rare) call, so results are always exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from supermask.mask import Threshold
from supermask.mask import masked_weight as _reference_masked_weight

from . import _common

# (BLOCK, num_warps); memory-bound, so one config per size class is plenty.
ELEMENTWISE_CONFIGS = [(1024, 4), (4096, 8)]
_INTERPRET_BLOCK = 1024


@triton.jit
def _strided_offsets(idx, d1, d2, d3, st0, st1, st2, st3):
    i3 = idx % d3
    r = idx // d3
    i2 = r % d2
    r = r // d2
    i1 = r % d1
    i0 = r // d1
    return i0 * st0 + i1 * st1 + i2 * st2 + i3 * st3


@triton.jit
def sign_of(s):
    """sign(s) as fp32, sign(0) = 0: the straight-through factor of every gradient kernel."""
    return tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))


@triton.jit
def keep_of(a, v, idx, lim_ptr, HAS_LIMIT: tl.constexpr):
    """The mask of magnitudes a (fp32) at threshold v: a > v, or a == v at a flat index idx below
    *lim_ptr (the tie limit, read from device memory); without HAS_LIMIT every a == v is kept."""
    if HAS_LIMIT:
        lim = tl.load(lim_ptr)
        return (a > v) | ((a == v) & (idx < lim))
    return a >= v


@triton.jit
def _masked_weight_kernel(w_ptr, s_ptr, v_ptr, lim_ptr, out_ptr, n, d1, d2, d3,
                          sw0, sw1, sw2, sw3, ss0, ss1, ss2, ss3,
                          CONTIGUOUS: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    """out (contiguous) = w * keep, keep = |s| > v or (|s| == v and flat index < *lim)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n
    if CONTIGUOUS:
        w_off = idx
        s_off = idx
    else:
        w_off = _strided_offsets(idx, d1, d2, d3, sw0, sw1, sw2, sw3)
        s_off = _strided_offsets(idx, d1, d2, d3, ss0, ss1, ss2, ss3)
    v = tl.load(v_ptr).to(tl.float32)
    w = tl.load(w_ptr + w_off, mask=inb, other=0.0)
    s = tl.load(s_ptr + s_off, mask=inb, other=0.0)
    keep = keep_of(tl.abs(s).to(tl.float32), v, idx, lim_ptr, HAS_LIMIT)
    # the reference's weight * mask (an inf or NaN weight dropped gives NaN); exact in fp32
    out = (w.to(tl.float32) * keep.to(tl.float32)).to(w.dtype)
    tl.store(out_ptr + idx, out, mask=inb)


@triton.jit
def _ste_grad_kernel(g_ptr, w_ptr, s_ptr, out_ptr, n, d1, d2, d3,
                     sg0, sg1, sg2, sg3, sw0, sw1, sw2, sw3, ss0, ss1, ss2, ss3,
                     CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
    """out (contiguous, scores' dtype) = g * w * sign(s)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n
    if CONTIGUOUS:
        g_off = idx
        w_off = idx
        s_off = idx
    else:
        g_off = _strided_offsets(idx, d1, d2, d3, sg0, sg1, sg2, sg3)
        w_off = _strided_offsets(idx, d1, d2, d3, sw0, sw1, sw2, sw3)
        s_off = _strided_offsets(idx, d1, d2, d3, ss0, ss1, ss2, ss3)
    g = tl.load(g_ptr + g_off, mask=inb, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + w_off, mask=inb, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + s_off, mask=inb, other=0.0)
    tl.store(out_ptr + idx, (g * w * sign_of(s)).to(out_ptr.dtype.element_ty), mask=inb)


def _shape4(t: torch.Tensor):
    if t.dim() > 4:
        raise ValueError(f"at most 4-D tensors, got {t.dim()}-D")
    pad = 4 - t.dim()
    return [1] * pad + list(t.shape), [0] * pad + list(t.stride())


def _launch(kernel, n, args, contiguous, device, **constexprs):
    if _common.interpreting():
        block, warps = _INTERPRET_BLOCK, 1
    else:
        block, warps = ELEMENTWISE_CONFIGS[1] if n >= (1 << 20) else ELEMENTWISE_CONFIGS[0]
    kernel[(triton.cdiv(n, block),)](*args, CONTIGUOUS=contiguous, BLOCK=block, num_warps=warps, **constexprs)


def masked_weight_kernel(weight: torch.Tensor, scores: torch.Tensor, value: torch.Tensor,
                         limit: torch.Tensor | None = None) -> torch.Tensor:
    """where(keep, weight, 0) in one pass (no autograd): keep = |scores| >= value, or with a tie
    limit (0-dim int64 on the device, see threshold.tie_limit) |scores| > value or |scores| == value
    at a flat index below limit. value and limit are read from device memory (no host sync)."""
    if weight.shape != scores.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
    _common.check_device(weight, scores, value)
    out = _common.empty(weight.shape, weight.dtype, weight.device)
    n = weight.numel()
    if n == 0:
        return out
    shape, sw = _shape4(weight)
    _, ss = _shape4(scores)
    v = value.detach().to(device=weight.device, dtype=torch.float32).reshape(1)
    lim = v if limit is None else limit.reshape(1)
    contiguous = weight.is_contiguous() and scores.is_contiguous()
    _launch(_masked_weight_kernel, n, (weight, scores, v, lim, out, n, shape[1], shape[2], shape[3], *sw, *ss),
            contiguous, weight.device, HAS_LIMIT=limit is not None)
    return out


def ste_grad_kernel(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """grad * weight * sign(scores) in one pass, in scores' dtype (no autograd)."""
    if not grad.shape == weight.shape == scores.shape:
        raise ValueError("grad, weight and scores must have one shape")
    _common.check_device(grad, weight, scores)
    out = _common.empty(scores.shape, scores.dtype, scores.device)
    n = scores.numel()
    if n == 0:
        return out
    shape, sg = _shape4(grad)
    _, sw = _shape4(weight)
    _, ss = _shape4(scores)
    contiguous = grad.is_contiguous() and weight.is_contiguous() and scores.is_contiguous()
    _launch(_ste_grad_kernel, n, (grad, weight, scores, out, n, shape[1], shape[2], shape[3], *sg, *sw, *ss),
            contiguous, scores.device)
    return out


class MaskedWeightFused(torch.autograd.Function):
    """Same contract as ``supermask.mask.MaskedWeight`` (weight * mask forward, straight-through
    backward to the scores, no grad for the weight), one fused kernel each way."""

    @staticmethod
    def forward(ctx, weight, scores, threshold: Threshold):
        """weight ⊙ [|scores| >= threshold.value], contiguous, in weight's dtype, for weight and
        scores of one shape (up to 4-D, any strides). Every entry equal to the value is kept, so it
        serves only thresholds with split False (``masked_weight_fused`` sends the others to the
        reference). Saves weight and scores, no copies. Raises ValueError for a shape mismatch or
        more than 4 dimensions, and check_device's errors."""
        ctx.save_for_backward(weight, scores)
        return masked_weight_kernel(weight.detach(), scores.detach(), threshold.value)

    @staticmethod
    def backward(ctx, grad_out):
        """(None, grad_out ⊙ weight ⊙ sign(scores) in scores' dtype (when asked for), None): edge-popup's
        straight-through estimator (Ramanujan et al. 2020), the frozen weight and the threshold get
        no gradient."""
        weight, scores = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = ste_grad_kernel(grad_out, weight.detach(), scores.detach())
        return None, grad_scores, None


def masked_weight_fused(weight: torch.Tensor, scores: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """weight * mask as an autograd Function; exact for every Threshold (split -> reference)."""
    if threshold.split:
        return _reference_masked_weight(weight, scores, threshold)
    return MaskedWeightFused.apply(weight, scores, threshold)
