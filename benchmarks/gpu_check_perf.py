"""Timing stages of the GPU check (CUDA only; each says SKIPPED without CUDA, or with
GPU_CHECK_CPU_DRYRUN=1 runs its code once on tiny CPU inputs, rows marked DRYRUN, no timings).

Like with like: every variant moves the scores (s += 1e-4 * noise, in place) before its call, so no
warm-start cache hit is timed; cuBLAS and the Triton kernels run at the same fp32 precision (TF32
off: torch.set_float32_matmul_precision("highest"), which the kernels follow; on: "high"); the
variants are interleaved call by call and timed with CUDA events (medians). Before timing, each
"fused" variant must launch supermask's Triton kernels and each baseline none (gpu_check_common.
require_triton): else the row is REFUSED, never timed.
"""
from __future__ import annotations

import time

import gpu_check_common as C
import torch
import torch.nn.functional as F

from supermask import ops
from supermask.mask import num_kept

try:
    from supermask.kernels.masked_linear import linear_choice_key
except ImportError:  # reported by the preflight
    def linear_choice_key(M: int, N: int, K: int, dtype) -> tuple:
        return (max(16, 1 << max(0, M - 1).bit_length()), N, K, dtype)

FC = [(750, 784), (250, 750), (10, 250)]  # fc x width 2.5: (out, in)


def _skip_or_dry(res: C.Results, what: str) -> bool:
    """True when the stage should stop here: no CUDA and no dry run (SKIPPED row written)."""
    if C.CUDA or C.dry_run():
        return False
    res.skipped(what, C.NO_CUDA)
    return True


def _precision(tf32: bool | None) -> None:
    if tf32 is not None:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


# ---------------------------------------------------------------------------------------------
# kernels: masked linear forward + backward
# ---------------------------------------------------------------------------------------------
def linear_shapes() -> list[tuple[int, int, int, torch.dtype, bool | None, bool]]:
    """(M, N, K, dtype, tf32, autotune), most telling first (the stage skips what its time limit
    leaves no room for). First every shape at the fixed config (SUPERMASK_AUTOTUNE=0: one compile
    per specialisation, so the whole table fits), then autotuned as users run it (each new
    specialisation compiles and benchmarks every config: a few rows at most)."""
    if not C.CUDA:
        return [(8, 16, 24, torch.float32, False, False)]
    fc128 = [(128, n, k) for n, k in FC]
    rows = []
    for dtype, tf32 in ((torch.bfloat16, None), (torch.float32, False), (torch.float32, True)):
        rows += [(4096, 4096, 4096, dtype, tf32, False)] + [(*s, dtype, tf32, False) for s in fc128]
    rows += [(96, n, k, torch.float32, False, False) for n, k in FC]  # the short last batch (same bucket)
    rows += [(4096, 4096, 4096, torch.bfloat16, None, True)] + [(*s, torch.bfloat16, None, True) for s in fc128]
    return rows + [(*s, torch.float32, False, True) for s in fc128]


def _linear_variants(M, N, K, dtype):
    """The four fwd+bwd callables on one problem, each moving its scores first."""
    g = torch.Generator(device=C.DEV).manual_seed(M + N + K)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=C.DEV).to(dtype)
    x, w, gy = rnd(M, K).requires_grad_(), rnd(N, K), rnd(M, N)
    s, wd, noise = rnd(N, K).requires_grad_(), w.clone().requires_grad_(), rnd(N, K) * 1e-4
    n_keep, sid = num_kept(N * K, 0.5), ops.new_state()

    def move():
        with torch.no_grad():
            s.add_(noise)
        x.grad = s.grad = wd.grad = None

    def dense():
        move()
        F.linear(x, wd).backward(gy)

    def reference():  # the definition in plain torch: topk mask, w * mask, F.linear, STE by hand
        move()
        sd = s.detach()
        keep = torch.zeros(N * K, device=C.DEV, dtype=dtype).scatter_(
            0, torch.topk(sd.abs().reshape(-1), n_keep, sorted=False).indices, 1).view(N, K)
        wm = (w * keep).requires_grad_()
        F.linear(x, wm).backward(gy)
        s.grad = wm.grad * w * torch.sign(sd)

    def op(choice):
        def call():
            move()
            with C.env(SUPERMASK_LINEAR=choice):
                ops.masked_linear(x, w, s, n_keep, sid, C.FUSED_PATH).backward(gy)
        return call
    return {"dense": dense, "reference": reference, "fused": op("fused"), "cublas": op("cublas")}


def time_linear(res: C.Results, M, N, K, dtype, tf32, autotune) -> None:
    """One row: ms of each variant, ratios, and the suggested choice fused / cublas."""
    with C.env(SUPERMASK_AUTOTUNE="1" if autotune else "0"):
        _time_linear(res, M, N, K, dtype, tf32, autotune)


def _time_linear(res: C.Results, M, N, K, dtype, tf32, autotune) -> None:
    _precision(tf32)
    fns = _linear_variants(M, N, K, dtype)
    prec = "bf16" if dtype == torch.bfloat16 else ("fp32 tf32 on" if tf32 else "fp32 tf32 off")
    case = f"{M}x{N}x{K} {prec} {'autotuned' if autotune else 'fixed config'}"
    for f in fns.values():  # compiles and autotunes outside the profiler
        f()
    for name in ("fused", "cublas"):
        C.require_triton(fns[name], f"{case} {name}")
    for name in ("dense", "reference"):
        C.require_no_triton(fns[name], f"{case} {name}")
    if not C.CUDA:
        for f in fns.values():
            f()
        res.row(case, "DRYRUN", note="ran once on the CPU, interpreted; no timing")
        return
    t = C.time_interleaved(fns, reps=10 if M * N * K >= 1 << 30 else 50)
    suggest = "fused" if t["fused"] <= t["cublas"] else "cublas"
    res.row(case, dense_ms=t["dense"], reference_ms=t["reference"], fused_ms=t["fused"], cublas_ms=t["cublas"],
            fused_vs_dense=t["fused"] / t["dense"], fused_vs_reference=t["fused"] / t["reference"],
            fused_vs_cublas=t["fused"] / t["cublas"], suggest=suggest,
            key=repr(linear_choice_key(M, N, K, dtype)), autotune=autotune)


def stage_kernels(res: C.Results, args) -> None:
    """Masked linear fwd+bwd timings (fixed config, then autotuned) and the suggested choice."""
    if _skip_or_dry(res, "masked linear timings (CUDA events vs cuBLAS, TF32 off/on)"):
        return
    res.table("masked linear forward + backward, median ms (CUDA events, interleaved)",
              ["case", "status", "dense_ms", "reference_ms", "fused_ms", "cublas_ms", "fused_vs_dense",
               "fused_vs_reference", "fused_vs_cublas", "suggest"])
    try:
        for shape in linear_shapes():
            C.guarded(res, time_linear, *shape, margin=30 if shape[-1] else 6)
    finally:
        torch.set_float32_matmul_precision("highest")


# ---------------------------------------------------------------------------------------------
# threshold
# ---------------------------------------------------------------------------------------------
def time_threshold(res: C.Results, n: int) -> None:
    """supermask::topk_threshold vs torch.topk(sorted=False), sort, kthvalue at k = n / 2."""
    g = torch.Generator(device=C.DEV).manual_seed(n)
    s, noise = torch.randn(n, generator=g, device=C.DEV), torch.randn(n, generator=g, device=C.DEV) * 1e-4
    k = n // 2

    def moved(f):
        def call():
            s.add_(noise)
            f()
        return call
    fns = {"ours": moved(lambda: torch.ops.supermask.topk_threshold(s, k, C.FUSED_PATH)),
           "topk": moved(lambda: torch.topk(s.abs(), k, sorted=False)),
           "sort": moved(lambda: torch.sort(s.abs(), descending=True)),
           "kthvalue": moved(lambda: torch.kthvalue(s.abs(), n - k + 1))}
    C.require_triton(fns["ours"], f"threshold n={n}")
    if not C.CUDA:
        for f in fns.values():
            f()
        res.row(f"n={n}", "DRYRUN", note="ran once on the CPU, interpreted; no timing")
        return
    t = C.time_interleaved(fns, reps=20)
    res.row(f"n={n}", n=n, ours_ms=t["ours"], topk_ms=t["topk"], sort_ms=t["sort"], kthvalue_ms=t["kthvalue"],
            topk_vs_ours=t["topk"] / t["ours"], sort_vs_ours=t["sort"] / t["ours"],
            kthvalue_vs_ours=t["kthvalue"] / t["ours"])


def stage_threshold(res: C.Results, args) -> None:
    if _skip_or_dry(res, "threshold timings (1e6, 1e7, 16.7M)"):
        return
    res.table("top-k threshold, k = n / 2, median ms (>1 in *_vs_ours: ours faster)",
              ["case", "status", "ours_ms", "topk_ms", "sort_ms", "kthvalue_ms", "topk_vs_ours", "sort_vs_ours",
               "kthvalue_vs_ours"])
    for n in ((10**6, 10**7, 4096 * 4096) if C.CUDA else (10**4,)):
        C.guarded(res, time_threshold, n)


# ---------------------------------------------------------------------------------------------
# train: fc and conv4 steps
# ---------------------------------------------------------------------------------------------
def _trainer(name, width, kind, compiled):
    """A step function step(batch) of one model: SGD with momentum, cross-entropy, random data."""
    import supermask  # noqa: PLC0415
    from supermask import models  # noqa: PLC0415
    torch.manual_seed(0)
    model = models.build(name, (1, 28, 28), 10, width)
    if kind == "supermask":
        model = supermask.convert(model, k=0.5)
    model = model.to(C.DEV)
    if not C.CUDA:
        supermask.set_backend(model, "triton") if kind == "supermask" else None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    fwd = torch.compile(model) if compiled else model
    data = {b: (torch.randn(b, 1, 28, 28, device=C.DEV), torch.randint(0, 10, (b,), device=C.DEV)) for b in (128, 96)}

    def step(b=128):
        x, y = data[b]
        loss = F.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_train(res: C.Results, name, width, kind, compiled, steps) -> None:
    """Warm both batch sizes (128 and the epoch's short last batch, 96), then `steps` timed steps
    (every 100th the short one); the profiler's launches / syncs / copies per 128-step."""
    case = f"{name} x{width} {'compile' if compiled else 'eager'} {kind}"
    t0 = time.perf_counter()
    step = _trainer(name, width, kind, compiled)
    for b in (128, 128, 96, 96, 128):
        step(b)
    C.sync()
    warm = time.perf_counter() - t0
    if kind == "supermask":
        C.require_triton(step, case)
    counts = C.step_counts(step, steps=3)
    if not C.CUDA:
        res.row(case, "DRYRUN", warm_s=round(warm, 1), **counts)
        return
    C.sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(96 if i % 100 == 99 else 128)
    C.sync()
    ms = (time.perf_counter() - t0) / steps * 1e3
    res.row(case, model=name, mode="compile" if compiled else "eager", kind=kind, ms_per_step=ms,
            warm_s=round(warm, 1), **counts)


def stage_train(res: C.Results, args) -> None:
    """fc (width 2.5) and conv4, eager then compiled, dense then supermask, and the ratios."""
    if _skip_or_dry(res, "training steps (fc, conv4; eager, torch.compile)"):
        return
    res.table("training step, 200 timed steps after both batch sizes are warm; counts per step",
              ["case", "status", "ms_per_step", "launches", "syncs", "item_reads", "d2h_copies", "warm_s"])
    plan = [("fc", 2.5), ("conv4", 1.0)] if C.CUDA else [("fc", 0.1)]
    modes = (False, True) if C.CUDA else (False,)
    for name, width in plan:
        for compiled in modes:
            for kind in ("dense", "supermask"):
                C.guarded(res, time_train, name, width, kind, compiled, 200 if C.CUDA else 1,
                          margin=25 if compiled else 8)
            _ratio(res, name, width, compiled)


def _ratio(res: C.Results, name, width, compiled) -> None:
    mode = "compile" if compiled else "eager"
    got = {r["kind"]: r["ms_per_step"] for r in C.read_rows(res.dir)
           if r["stage"] == "train" and r.get("model") == name and r.get("mode") == mode and r["status"] == "ok"}
    if len(got) == 2:
        res.row(f"{name} x{width} {mode} supermask / dense", ms_per_step=got["supermask"] / got["dense"])
