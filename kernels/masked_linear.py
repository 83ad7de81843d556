"""Fused masked linear layer: Y = X @ (W * mask)^T without ever writing W * mask.

Two kernels, both blocked GEMMs in the style of Triton's matmul tutorial (grouped program order
for L2 reuse, fp32 accumulator, tl.dot on tensor cores):

* ``_masked_matmul_kernel``: C = (W ⊙ [|S| >= v]) @ B. Each K-step loads a tile of W and the
  matching tile of S, zeroes the dropped weights in registers and feeds the tile to tl.dot. The
  masked operand is the *left* one on purpose: Hopper's wgmma may take its A operand from
  registers, while B must come from shared memory. Used for the forward (C = Y^T, B = X^T) and for
  dX (C = dX^T, B = dY^T, W read transposed), purely through strides, so transposed or otherwise
  strided W, S, X and dY cost no copy.
* ``_matmul_ste_kernel``: C = (A @ B) ⊙ W ⊙ sign(S). The straight-through gradient of the scores,
  dS = (dY^T @ X) * W * sign(S), with the product fused into the epilogue: neither the masked
  weight nor dW is ever written.

The mask |s| >= v is the reference mask whenever ``threshold.split`` is False (every entry equal
to v is kept). When it is True, which entries equal to v survive depends on how many equal entries
precede them in flat order, a prefix count over the whole tensor that one tile cannot know; the
forward and dX then use a masked weight built by the reference ``mask_from_threshold`` (one
extra W-sized buffer, for that call only) with the in-register mask switched off. dS does not
depend on the mask at all, so it is always fused.

fp32 operands follow torch.get_float32_matmul_precision() (full fp32 by default, TF32 with "high"), unless
``set_fp32_precision`` asks for one; fp16/bf16 accumulate in fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from supermask.mask import Threshold, mask_from_threshold

from . import _common
from .masked_weight import sign_of


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# Ampere (A100: 164 KB shared memory per block) / Hopper (H100: 227 KB) configurations.
# Unmeasured (no GPU lent yet): 256-wide tiles left out of the dS kernel (its epilogue loads W and S
# tiles beside a 128 x 256 fp32 accumulator: predicted to spill); BLOCK_K 64 added for Hopper.
MATMUL_CONFIGS = [
    _cfg(128, 256, 32, 8, 3),
    _cfg(256, 128, 32, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 64, 4, 3),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(32, 64, 32, 2, 5),
]
STE_CONFIGS = [c for c in MATMUL_CONFIGS if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
# SUPERMASK_AUTOTUNE=0: this one config, no autotuning (tests and benchmarks/gpu_check use it).
FIXED_CONFIG = _cfg(128, 128, 32, 4, 3)


def autotune_enabled() -> bool:
    """False when SUPERMASK_AUTOTUNE=0 (one fixed config: FIXED_CONFIG), read at each launch."""
    return os.environ.get("SUPERMASK_AUTOTUNE", "1") != "0"


def size_bucket(n: int) -> int:
    """The autotune key of a batch-like dimension: the next power of two (at least 16), so a new
    batch size (e.g. the short last batch of an epoch) reuses its bucket's tuning."""
    return max(16, 1 << max(0, n - 1).bit_length())


# few, larger programs: the interpreter pays per op
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def smem_estimate(cfg_kwargs, num_stages, a_bytes, b_bytes, extra_bytes=0) -> int:
    """Shared memory the software pipeline needs: num_stages copies of the A, B (and mask) tiles."""
    bm, bn, bk = cfg_kwargs["BLOCK_M"], cfg_kwargs["BLOCK_N"], cfg_kwargs["BLOCK_K"]
    return num_stages * (bm * bk * (a_bytes + extra_bytes) + bk * bn * b_bytes)


def _prune_masked(configs, named_args, **kwargs):
    w, s, b = named_args["w_ptr"], named_args["s_ptr"], named_args["b_ptr"]
    extra = s.element_size() if kwargs.get("APPLY_MASK", True) else 0
    limit = _common.max_shared_memory(w.device)
    ok = [c for c in configs if smem_estimate(c.kwargs, c.num_stages, w.element_size(),
                                              b.element_size(), extra) <= limit]
    return ok or configs[-1:]


def _prune_ste(configs, named_args, **kwargs):
    a, b = named_args["a_ptr"], named_args["b_ptr"]
    limit = _common.max_shared_memory(a.device)
    ok = [c for c in configs if smem_estimate(c.kwargs, c.num_stages, a.element_size(),
                                              b.element_size()) <= limit]
    return ok or configs[-1:]


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-blocks share their B column-blocks while they sit in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """This program's tile: its row, column and k offsets (int64: products with strides may pass
    2**31), its rows and columns clamped into range for the loads (no `% M` wrap: a tile past the
    edge re-reads the last row or column, valid memory whose results the store mask discards, so
    the k loop's loads need no mask) and its row and column masks."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_m, M - 1)
    cols = tl.minimum(offs_n, N - 1)
    return offs_m, offs_n, offs_k, rows, cols, offs_m < M, offs_n < N


@triton.jit
def _dot(x, y, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + x @ y; with UPCAST in full fp32 (the interpreter's bf16 dot is wrong, see _common)."""
    if UPCAST:
        acc = tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, y, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _masked_tile(w_ptrs, s_ptrs, ok, v, lr, lc, rows, ks, FLAT_T: tl.constexpr,
                 APPLY_MASK: tl.constexpr, HAS_LIMIT: tl.constexpr, UPCAST: tl.constexpr):
    """A tile of W, its dropped weights zeroed (ok: the load mask). The tie limit
    as (row, column) of the flat order, lr and lc: an entry equal to v is kept when its (major,
    minor) index, (rows, ks), or (ks, rows) with FLAT_T, comes before (lr, lc): compares of the
    tile's 1-D indices, no index tile."""
    w = tl.load(w_ptrs, mask=ok, other=0.0)
    if APPLY_MASK:
        s = tl.load(s_ptrs, mask=ok, other=0.0)
        a = tl.abs(s).to(tl.float32)
        if HAS_LIMIT:
            if FLAT_T:
                before = (ks[None, :] < lr) | ((ks[None, :] == lr) & (rows[:, None] < lc))
            else:
                before = (rows[:, None] < lr) | ((rows[:, None] == lr) & (ks[None, :] < lc))
            keep = (a > v) | ((a == v) & before)
        else:
            keep = a >= v
        # dropped: w * 0 as the reference's weight * mask (an inf or NaN weight gives NaN, not 0)
        if UPCAST:  # (the interpreter's bf16 multiply is wrong, see _common)
            w = (w.to(tl.float32) * keep.to(tl.float32)).to(w.dtype)
        else:
            w = tl.where(keep, w, w * 0)
    return w


@triton.jit
def _masked_matmul_kernel(
    w_ptr, s_ptr, v_ptr, lim_ptr, b_ptr, c_ptr, M, N, K,
    stride_wm, stride_wk, stride_sm, stride_sk, stride_bk, stride_bn, stride_cm, stride_cn, flat_len, N_BUCKET,
    APPLY_MASK: tl.constexpr, HAS_LIMIT: tl.constexpr, FLAT_T: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = (W ⊙ mask)[M, K] @ B[K, N]; mask = |S| >= v (v = *v_ptr), or with HAS_LIMIT
    |S| > v or |S| == v at a flat index below *lim_ptr, the flat index of W[m, k] being m * flat_len + k
    (FLAT_T: k * flat_len + m, W read transposed). The K tail is
    peeled off: the main loop's loads are masked by rows and columns only."""
    # MN-major operands (W read transposed for dX) lose vectorisation with clamped rows: masked loads
    offs_m, offs_n, offs_k, _, _, m_in, n_in = _tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_k[None, :] * stride_wk
    s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_k[None, :] * stride_sk
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    v = 0.0
    if APPLY_MASK:
        v = tl.load(v_ptr).to(tl.float32)
    lr = 0
    lc = 0
    if HAS_LIMIT:  # the tie limit as (row, column) of the flat order, once per program
        lim = tl.load(lim_ptr)
        lr = lim // flat_len
        lc = lim % flat_len
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // BLOCK_K):
        w = _masked_tile(w_ptrs, s_ptrs, m_in[:, None], v, lr, lc, offs_m, kb * BLOCK_K + offs_k,
                         FLAT_T, APPLY_MASK, HAS_LIMIT, UPCAST)
        acc = _dot(w, tl.load(b_ptrs, mask=n_in[None, :], other=0.0), acc, UPCAST, INPUT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        s_ptrs += BLOCK_K * stride_sk
        b_ptrs += BLOCK_K * stride_bk
    if K % BLOCK_K != 0:  # the K tail
        k_in = offs_k < K % BLOCK_K
        w = _masked_tile(w_ptrs, s_ptrs, m_in[:, None] & k_in[None, :], v, lr, lc, offs_m,
                         (K // BLOCK_K) * BLOCK_K + offs_k, FLAT_T, APPLY_MASK, HAS_LIMIT, UPCAST)
        b = tl.load(b_ptrs, mask=k_in[:, None] & n_in[None, :], other=0.0)
        acc = _dot(w, b, acc, UPCAST, INPUT_PRECISION)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _matmul_ste_kernel(
    a_ptr, b_ptr, w_ptr, s_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_wm, stride_wn, stride_sm, stride_sn,
    stride_cm, stride_cn, K_BUCKET,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = (A[M, K] @ B[K, N]) ⊙ W[M, N] ⊙ sign(S[M, N]); the K tail peeled off."""
    offs_m, offs_n, offs_k, rows, cols, m_in, n_in = _tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        acc = _dot(a, b, acc, UPCAST, INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if K % BLOCK_K != 0:  # the K tail
        k_in = offs_k < K % BLOCK_K
        a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None], other=0.0)
        acc = _dot(a, b, acc, UPCAST, INPUT_PRECISION)
    # Epilogue: the straight-through product, in fp32, one rounding at the store (int64 offsets).
    out = m_in[:, None] & n_in[None, :]
    w = tl.load(w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn, mask=out, other=0.0)
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=out, other=0.0)
    c = acc * w.to(tl.float32) * sign_of(s)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             c.to(c_ptr.dtype.element_ty), mask=out)


# Keyed on the batch dimension's bucket (N of the masked matmul, K of dS), not the batch size.
_masked_matmul_tuned = triton.autotune(
    configs=MATMUL_CONFIGS, key=["M", "K", "N_BUCKET", "APPLY_MASK", "HAS_LIMIT", "FLAT_T", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_masked})(_masked_matmul_kernel)
_matmul_ste_tuned = triton.autotune(
    configs=STE_CONFIGS, key=["M", "N", "K_BUCKET", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_ste})(_matmul_ste_kernel)


def _launch(kernel, tuned, M, N, args, **constexprs):
    """kernel on its grid: the interpreter's config, FIXED_CONFIG (SUPERMASK_AUTOTUNE=0) or the
    autotuned one (keyed on the batch bucket, an argument the kernels do not read)."""
    if _common.interpreting() or not autotune_enabled():
        cfg = INTERPRET_CONFIG if _common.interpreting() else FIXED_CONFIG.kwargs
        extra = {"num_warps": 1} if _common.interpreting() else {"num_warps": FIXED_CONFIG.num_warps,
                                                                 "num_stages": FIXED_CONFIG.num_stages}
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        kernel[grid](*args, **constexprs, **cfg, **extra)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        tuned[grid](*args, **constexprs)


def masked_matmul(w: torch.Tensor, s: torch.Tensor | None, value: torch.Tensor | None,
                  b: torch.Tensor, out: torch.Tensor | None = None, limit: torch.Tensor | None = None,
                  transposed: bool = False) -> torch.Tensor:
    """C = (w ⊙ [|s| >= value]) @ b for 2-D w (M, K), s like w, b (K, N); any strides. s=None:
    plain w @ b. Returns C (M, N) (or writes the given out, which may be a transposed view).
    limit (0-dim int64 on the device, see threshold.tie_limit): the mask is |s| > value or |s| ==
    value at a flat index below limit, the flat index of w[m, k] being w's row-major index, or with
    transposed that of w.t() (w is a transposed view of the weight, as for dX). value and limit are
    read from device memory (no host sync)."""
    M, K = w.shape
    K2, N = b.shape
    if K2 != K:
        raise ValueError(f"shape mismatch: {tuple(w.shape)} @ {tuple(b.shape)}")
    if w.dtype != b.dtype:
        raise TypeError(f"dtype mismatch: {w.dtype} and {b.dtype}")
    apply = s is not None
    if apply and s.shape != w.shape:
        raise ValueError(f"scores shape {tuple(s.shape)} != weight shape {tuple(w.shape)}")
    _common.check_device(w, b, *((s, value) if apply else ()))
    if out is None:
        out = _common.empty((M, N), w.dtype, w.device)
    elif _common._POISON:
        out.fill_(float("nan"))
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    if apply:
        v = value.detach().to(device=w.device, dtype=torch.float32).reshape(1)
    else:
        s, v = w, w  # unused (APPLY_MASK=False)
    has_limit = apply and limit is not None
    flat_len = M if transposed else K
    args = (w, s, v, limit.reshape(1) if has_limit else v, b, out, M, N, K, w.stride(0), w.stride(1),
            s.stride(0), s.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), flat_len, size_bucket(N))
    _launch(_masked_matmul_kernel, _masked_matmul_tuned, M, N, args, APPLY_MASK=apply, HAS_LIMIT=has_limit,
            FLAT_T=transposed,
            INPUT_PRECISION=_common.dot_precision(w.dtype), UPCAST=_common.upcast_dot(w.dtype))
    return out


def matmul_ste(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """C = (a @ b) ⊙ w ⊙ sign(s) for a (M, K), b (K, N), w and s (M, N); any strides."""
    M, K = a.shape
    K2, N = b.shape
    if K2 != K or w.shape != (M, N) or s.shape != (M, N):
        raise ValueError(f"shape mismatch: {tuple(a.shape)} @ {tuple(b.shape)} vs {tuple(w.shape)}, {tuple(s.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"dtype mismatch: {a.dtype} and {b.dtype}")
    _common.check_device(a, b, w, s)
    out = _common.empty((M, N), out_dtype or s.dtype, a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    args = (a, b, w, s, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            w.stride(0), w.stride(1), s.stride(0), s.stride(1), out.stride(0), out.stride(1), size_bucket(K))
    _launch(_matmul_ste_kernel, _matmul_ste_tuned, M, N, args,
            INPUT_PRECISION=_common.dot_precision(a.dtype), UPCAST=_common.upcast_dot(a.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# Per-shape choice between the fused masked matmul and "masked weight once (one elementwise pass,
# masked_weight_kernel) + cuBLAS (torch.mm)". UNMEASURED until a GPU is lent: the default below is
# a prediction (the fused GEMM at ~50-65% of cuBLAS on large problems, where the W * mask pass is
# amortised over many batch rows; small batches save the pass and its W-sized write).
# benchmarks/gpu_check measures both and may record its answer in LINEAR_CHOICE (keyed by
# linear_choice_key: the shape, dtype and, for fp32, the matmul precisions, as TF32 on or off changes
# which one wins); SUPERMASK_LINEAR=fused|cublas forces one.
# ---------------------------------------------------------------------------------------------
LINEAR_CHOICE: dict[tuple, str] = {}
CUBLAS_MIN_BATCH = 1024  # predicted: from this batch bucket ...
CUBLAS_MIN_WEIGHT = 1 << 22  # ... and weight size (entries) on, masked weight + cuBLAS


def linear_choice_key(batch: int, n_out: int, n_in: int, dtype: torch.dtype) -> tuple:
    """LINEAR_CHOICE's key: (size_bucket(batch), n_out, n_in, dtype, precision). precision, for fp32
    only (None for fp16/bf16): (the fused kernels' tl.dot precision, _common.get_fp32_precision();
    torch.get_float32_matmul_precision(), which decides whether cuBLAS uses TF32), e.g. ("tf32", "high")."""
    precision = None
    if dtype == torch.float32:
        precision = (_common.get_fp32_precision(), torch.get_float32_matmul_precision())
    return (size_bucket(batch), n_out, n_in, dtype, precision)


def linear_choice(batch: int, n_out: int, n_in: int, dtype: torch.dtype) -> str:
    """"fused" or "cublas" for a masked linear of this shape (see LINEAR_CHOICE)."""
    forced = os.environ.get("SUPERMASK_LINEAR")
    if forced in ("fused", "cublas"):
        return forced
    key = linear_choice_key(batch, n_out, n_in, dtype)
    if key in LINEAR_CHOICE:
        return LINEAR_CHOICE[key]
    return "cublas" if key[0] >= CUBLAS_MIN_BATCH and n_out * n_in >= CUBLAS_MIN_WEIGHT else "fused"


def _masked_once(weight, scores, value, limit):
    from .masked_weight import masked_weight_kernel  # noqa: PLC0415
    return masked_weight_kernel(weight, scores, value, limit)


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                          value: torch.Tensor, limit: torch.Tensor | None = None) -> torch.Tensor:
    """Y = x @ (weight ⊙ mask)^T (no autograd; the supermask::masked_linear op's Triton
    implementation). x (..., K), weight and scores (N, K), weight in x's dtype; mask = |scores| >=
    value, or with a tie limit as in masked_matmul (value, limit: device tensors, no host sync)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    if linear_choice(x2.shape[0], N, K, x.dtype) == "cublas":
        return torch.mm(x2, _masked_once(weight, scores, value, limit).t()).reshape(*x.shape[:-1], N)
    y = _common.empty((x2.shape[0], N), x.dtype, x.device)
    masked_matmul(weight, scores, value, x2.t(), out=y.t(), limit=limit)
    return y.reshape(*x.shape[:-1], N)


def masked_linear_backward(gy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                           value: torch.Tensor, need_x: bool = True, need_scores: bool = True,
                           limit: torch.Tensor | None = None):
    """(dX, dS) of masked_linear_forward for 2-D gy2 (M, N) and x2 (M, K); None for one not asked for.
    dX = dY @ (W ⊙ mask), dS = (dY^T @ X) ⊙ W ⊙ sign(S) (the product fused into the GEMM epilogue).
    limit: the forward's tie limit (see masked_matmul)."""
    N, K = weight.shape
    gx = gs = None
    if need_x and linear_choice(gy2.shape[0], N, K, gy2.dtype) == "cublas":
        gx = torch.mm(gy2, _masked_once(weight, scores, value, limit))
    elif need_x:
        gx = _common.empty((gy2.shape[0], K), gy2.dtype, gy2.device)
        masked_matmul(weight.t(), scores.t(), value, gy2.t(), out=gx.t(), limit=limit, transposed=True)
    if need_scores:
        gs = matmul_ste(gy2.t(), x2, weight, scores, out_dtype=scores.dtype)
    return gx, gs


class MaskedLinear(torch.autograd.Function):
    """y = x @ (weight * mask)^T; dx = dy @ (weight * mask); d scores = (dy^T @ x) * weight *
    sign(scores) (edge-popup's straight-through estimator); the frozen weight gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, scores, threshold: Threshold):
        """y (..., N) = x (..., K) @ (weight ⊙ mask)^T, in x's dtype (fp32/fp16/bf16, weight's too),
        mask = |scores| >= threshold.value (scores (N, K); with threshold.split, ties broken in flat
        order through the reference ``mask_from_threshold``: one masked-weight buffer for the call).
        Saves x, weight, scores and the masked weight (split) or the threshold value for backward.
        Raises ValueError when x's last dimension is not K or scores' shape is not weight's; the
        kernels raise TypeError for mismatched dtypes and check_device's errors for devices."""
        value, _, split = threshold
        N, K = weight.shape
        if x.shape[-1] != K:
            raise ValueError(f"x has {x.shape[-1]} features, weight expects {K}")
        if scores.shape != weight.shape:
            raise ValueError(f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
        x2 = x.reshape(-1, K)
        if split:
            # Ties broken by flat index: a prefix count the tiles cannot see (module docstring).
            keep = mask_from_threshold(scores.detach().abs(), threshold)
            w_eff = torch.where(keep, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))
            s_use, v_use = None, None
        else:
            w_eff, s_use, v_use = weight.detach(), scores.detach(), value
        y = _common.empty((x2.shape[0], N), x.dtype, x.device)
        # Y^T (N, M) = Wm (N, K) @ X^T (K, M): the masked operand on the left (see docstring).
        masked_matmul(w_eff, s_use, v_use, x2.detach().t(), out=y.t())
        ctx.save_for_backward(x, weight, scores, w_eff, v_use if v_use is not None else w_eff)
        ctx.split = split
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, gy):
        """Gradients for (x, weight, scores, threshold) from gy (..., N): dx = gy @ (weight ⊙ mask)
        in x's shape and dtype, d scores = (gy^T @ x) ⊙ weight ⊙ sign(scores) in scores' dtype (the
        straight-through estimator of Ramanujan et al. 2020, as hidden-networks' GetSubnet, whose
        backward passes the gradient through the mask unchanged), each only when asked for; None for
        the frozen weight and the threshold."""
        x, weight, scores, w_eff, v = ctx.saved_tensors
        N, K = weight.shape
        gy2 = gy.reshape(-1, N)
        gx = gs = None
        if ctx.needs_input_grad[0]:
            gx = _common.empty((gy2.shape[0], K), x.dtype, x.device)
            # dX^T (K, M) = Wm^T (K, N) @ dY^T (N, M)
            if ctx.split:
                masked_matmul(w_eff.t(), None, None, gy2.t(), out=gx.t())
            else:
                masked_matmul(weight.detach().t(), scores.detach().t(), v, gy2.t(), out=gx.t())
            gx = gx.reshape(x.shape)
        if ctx.needs_input_grad[2]:
            # dS (N, K) = (dY^T (N, M) @ X (M, K)) * W * sign(S)
            gs = matmul_ste(gy2.t(), x.detach().reshape(-1, K), weight.detach(), scores.detach(),
                            out_dtype=scores.dtype)
        return gx, None, gs, None


def masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                  threshold: Threshold) -> torch.Tensor:
    """F.linear(x, masked_weight(weight, scores, threshold)) in fused Triton kernels."""
    return MaskedLinear.apply(x, weight, scores, threshold)
