"""Correctness stage of the GPU check: the supermask ops on the Triton path with the fixed config
(SUPERMASK_AUTOTUNE=0) against references computed in float64, every case run twice (the two runs
must agree bit for bit), and the tiny launches compute-sanitizer runs.

Reference (the mask's definition, supermask.mask): keep the n_keep largest |s|, ties to the lowest
flat index (a stable sort of -|s|); y = x @ (w * mask)^T, dx = dy @ (w * mask), d scores =
(dy^T @ x) * w * sign(s) (edge-popup's straight-through estimator), all in float64.
Errors are measured against the float64 bound |a| @ |b| of each product (elementwise), so a row's
``err`` is max |got - ref| / bound, compared with the dtype's tolerance TOL.
"""
from __future__ import annotations

import time

import gpu_check_common as C
import torch

from supermask import ops
from supermask.mask import num_kept

# max |got - ref| / (|a| @ |b|): fp32 accumulates in fp32 (IEEE: the fixed config at the default
# "highest" precision); bf16/fp16 outputs are rounded to 8/11 significant bits.
TOL = {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}
# Triton 3.8's interpreter converts bf16 subnormals to fp32 wrongly (tl.load(bf16).to(tl.float32) of
# k * 2^-130, k = 1..7, gives 0, 0, 5.9e-39, 0, 2.9e-39, 5.9e-39, 8.8e-39), so those cases run on CUDA only.
INTERPRETER_BF16 = ("Triton's interpreter converts bf16 subnormals to fp32 wrongly (the GPU's conversion is "
                    "exact); CUDA only")
FC = [(750, 784), (250, 750), (10, 250)]  # fc (LeNet-300-100) x width 2.5: (out, in)


def linear_cases() -> list[tuple[int, int, int, torch.dtype]]:
    """(M = batch, N = out, K = in, dtype): tile edges of FIXED_CONFIG (128), K < 16, M = 1, the
    fc layers at batch 128 and 96, 4096^3 bf16. Without CUDA (the interpreter) a few tiny ones."""
    if not C.CUDA:
        return [(1, 3, 5, torch.float32), (7, 5, 3, torch.bfloat16), (33, 34, 17, torch.float32)]
    edges = [(1, 1, 1), (1, 10, 250), (7, 5, 3), (16, 17, 15), (33, 40, 8), (127, 129, 128), (128, 128, 128),
             (129, 127, 129), (257, 255, 33), (64, 300, 1)]
    fc = [(b, n, k) for b in (128, 96) for n, k in FC]
    cases = [(*shape, dt) for shape in fc + edges for dt in (torch.float32, torch.bfloat16)]
    cases += [(*shape, torch.float16) for shape in edges[:4]]
    return cases + [(4096, 4096, 4096, torch.bfloat16)]


def reference_mask(s: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The mask's definition: the n_keep largest |s|, ties to the lowest flat index (float64)."""
    order = torch.sort(s.detach().abs().double().reshape(-1), descending=True, stable=True).indices
    keep = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
    keep[order[:n_keep]] = True
    return keep.reshape(s.shape)


def _rel_err(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return float("inf")
    err = (got.double() - ref).abs() / bound.clamp_min(1e-300)
    return float(err.max()) if err.numel() else 0.0


def _linear_once(x, w, s, gy, n_keep, choice):
    with C.env(SUPERMASK_LINEAR=choice):
        xg, sg = x.clone().requires_grad_(), s.clone().requires_grad_()
        y = ops.masked_linear(xg, w, sg, n_keep, -1, C.FUSED_PATH)
        y.backward(gy)
        mw = ops.masked_weight(w, s, n_keep, -1, C.FUSED_PATH)
    C.sync()
    return y.detach(), xg.grad, sg.grad, mw


def _linear_ref(x, w, s, gy, n_keep):
    keep = reference_mask(s, n_keep)
    x64, w64, gy64, s64 = x.double(), w.double(), gy.double(), s.double()
    wm = torch.where(keep, w64, 0.0)
    ref = (x64 @ wm.t(), gy64 @ wm, (gy64.t() @ x64) * w64 * torch.sign(s64))
    bound = (x64.abs() @ wm.abs().t(), gy64.abs() @ wm.abs(), (gy64.abs().t() @ x64.abs()) * w64.abs())
    return keep, ref, bound


def check_linear(res: C.Results, M: int, N: int, K: int, dtype: torch.dtype) -> None:
    """One shape: forward, dx, d scores and the masked weight, fused and masked weight + cuBLAS."""
    g = torch.Generator(device=C.DEV).manual_seed(M * 7 + N * 3 + K)
    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=C.DEV).to(dtype)
    x, gy, w, s = rnd(M, K), rnd(M, N), rnd(N, K), rnd(N, K)
    n_keep = num_kept(N * K, 0.5)
    keep, ref, bound = _linear_ref(x, w, s, gy, n_keep)
    for choice in ("fused", "cublas"):
        t0 = time.perf_counter()
        first, second = _linear_once(x, w, s, gy, n_keep, choice), _linear_once(x, w, s, gy, n_keep, choice)
        errs = [_rel_err(a, r, b) for a, r, b in zip(first[:3], ref, bound)]
        mask_ok = torch.equal(first[3], torch.where(keep, w, torch.zeros((), dtype=dtype, device=C.DEV)))
        same = all(torch.equal(a, b) for a, b in zip(first, second))
        ok = mask_ok and same and max(errs) <= TOL[dtype]
        res.row(f"linear {M}x{N}x{K} {str(dtype)[6:]} {choice}", "ok" if ok else "FAIL", M=M, N=N, K=K,
                dtype=str(dtype)[6:], choice=choice, err_y=errs[0], err_dx=errs[1], err_ds=errs[2], tol=TOL[dtype],
                mask_exact=mask_ok, deterministic=same, s=round(time.perf_counter() - t0, 2))


# ---------------------------------------------------------------------------------------------
# Threshold
# ---------------------------------------------------------------------------------------------
def threshold_sizes() -> list[int]:
    if not C.CUDA:
        return [1, 17, 1500]
    return [1, 2, 3, 15, 16, 17, 255, 256, 257, 4097, 100_003, 1_000_000, 16_777_216]


def scores_of(kind: str, n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Scores of one kind: randn; ties (8 distinct magnitudes, signs mixed); pm0 (+0, -0 and a few
    ones); subnormal (fp32: below 2^-126; bf16: its own subnormals, same exponent range)."""
    if kind == "randn":
        return torch.randn(n, generator=g, device=C.DEV).to(dtype)
    r = torch.randint(0, 8, (n,), generator=g, device=C.DEV)
    sign = torch.where(torch.rand(n, generator=g, device=C.DEV) < 0.5, -1.0, 1.0)
    if kind == "ties":
        return (sign * r.float()).to(dtype)
    if kind == "pm0":
        return (sign * (r == 7).float()).to(dtype)  # +-0 mostly, +-1 for an eighth
    if kind == "subnormal":
        tiny = torch.tensor(2.0 ** -130 if dtype != torch.float16 else 2.0 ** -20, device=C.DEV)
        return (sign * r.float() * tiny.float()).to(dtype)
    raise ValueError(kind)


def threshold_ref(s: torch.Tensor, n_keep: int) -> tuple[float, int]:
    """(value, ties) as the op returns them: ties = -1 when every entry equal to value is kept."""
    a = torch.sort(s.abs().double().reshape(-1), descending=True, stable=True).values
    value = a[n_keep - 1]
    kept, total = int((a[:n_keep] == value).sum()), int((a == value).sum())
    return float(value), (-1 if kept == total else kept)


def check_threshold(res: C.Results, n: int, kind: str, dtype: torch.dtype) -> None:
    """n_keep in {1, about half, n}: value and ties equal to the reference, twice the same bits."""
    s = scores_of(kind, n, dtype, torch.Generator(device=C.DEV).manual_seed(n))
    for n_keep in sorted({1, n // 2 + 1, n}):
        t0 = time.perf_counter()
        runs = [torch.ops.supermask.topk_threshold(s, n_keep, C.FUSED_PATH) for _ in range(2)]
        got = [(float(v), int(t)) for v, t in runs]
        want = threshold_ref(s, n_keep)
        ok = got[0] == want and got[0] == got[1]
        res.row(f"threshold n={n} {kind} {str(dtype)[6:]} n_keep={n_keep}", "ok" if ok else "FAIL", n=n,
                kind=kind, dtype=str(dtype)[6:], n_keep=n_keep, value=got[0][0], ties=got[0][1],
                want_value=want[0], want_ties=want[1], deterministic=got[0] == got[1],
                s=round(time.perf_counter() - t0, 2))


def check_nan_refused(res: C.Results) -> None:
    """NaN scores are refused (on CUDA a device-side assert: see stage_nan)."""
    s = torch.randn(1000, device=C.DEV)
    s[123] = float("nan")
    try:
        torch.ops.supermask.topk_threshold(s, 10, C.FUSED_PATH)
        C.sync()
    except (RuntimeError, ValueError) as e:
        res.row("NaN scores refused", error_seen=f"{type(e).__name__}: {str(e)[:120]}")
        return
    res.row("NaN scores refused", "FAIL", error="no error for NaN scores")


def stage_correctness(res: C.Results, args) -> None:
    """The threshold cases, then the linear ones (real fc layers first); the fixed config."""
    with C.env(SUPERMASK_AUTOTUNE="0"):
        if not C.CUDA:
            res.skipped("the CUDA cases (tile edges, fc layers, 4096^3, n up to 16.7M)",
                        C.NO_CUDA + "; a few tiny cases ran in Triton's interpreter instead")
        res.table("topk threshold vs float64 stable sort (each case twice)",
                  ["case", "status", "value", "ties", "want_value", "want_ties", "deterministic", "s"])
        for n in threshold_sizes():
            for kind in ("randn", "ties", "pm0", "subnormal"):
                for dtype in ((torch.float32, torch.bfloat16) if n <= 100_003 else (torch.float32,)):
                    if not C.CUDA and kind == "subnormal" and dtype == torch.bfloat16:
                        res.skipped(f"threshold n={n} subnormal bfloat16", INTERPRETER_BF16)
                        continue
                    C.guarded(res, check_threshold, n, kind, dtype)
        res.table("masked linear vs float64 reference (fixed config, each case twice)",
                  ["case", "status", "err_y", "err_dx", "err_ds", "tol", "mask_exact", "deterministic", "s"])
        for case in linear_cases():
            C.guarded(res, check_linear, *case)


def stage_nan(res: C.Results, args) -> None:
    """NaN scores refused, in a process of its own: on CUDA the refusal is a device-side assert,
    after which the process's CUDA context is lost."""
    res.table("NaN policy", ["case", "status", "error_seen"])
    with C.env(SUPERMASK_AUTOTUNE="0"):
        check_nan_refused(res)


def stage_tiny(res: C.Results, args) -> None:
    """One tiny launch of every kernel (what compute-sanitizer memcheck/racecheck run): masked
    linear forward and backward both ways, masked weight and its backward, the threshold."""
    with C.env(SUPERMASK_AUTOTUNE="0"):
        x, w, s = (torch.randn(5, 19, device=C.DEV), torch.randn(7, 19, device=C.DEV),
                   torch.randn(7, 19, device=C.DEV))
        for choice in ("fused", "cublas"):
            _linear_once(x, w, s, torch.randn(5, 7, device=C.DEV), 40, choice)
        sg = s.clone().requires_grad_()
        ops.masked_weight(w, sg, 40, -1, C.FUSED_PATH).sum().backward()
        sid = ops.new_state()  # a layer's state: the warm-start kernels (a cold step, then the band)
        for _ in range(2):
            ops.masked_weight(w, sg, 40, sid, C.FUSED_PATH).sum().backward()
        torch.ops.supermask.topk_threshold(s, 40, C.FUSED_PATH)
        C.sync()
        res.row("tiny launches", kernels=",".join(sorted(C.kernel_names())))
