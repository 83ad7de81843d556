"""Benchmark the supermask Triton kernels against the reference path and dense cuBLAS.

    python benchmarks/bench_kernels.py [--dtype fp16|bf16|fp32] [--batch 128]

On CUDA: times (triton.testing.do_bench, median ms) for the fc layers at width 2.5 (784x750,
750x250), a conv layer as a GEMM and 4096x4096:
  * fused:     supermask.kernels.masked_linear (mask applied in registers),
  * reference: mask_from_threshold + W * mask + cuBLAS (F.linear) -- the torch backend,
  * dense:     cuBLAS without any mask (the limit),
forward and forward+backward; TFLOP/s, GB/s (compulsory traffic) and ratios. The threshold kernel
(radix select) against torch.topk / torch.kthvalue / torch.sort, and the fused masked weight (conv)
against the reference. Results go to benchmarks/results/kernels_<gpu>.json and .md.

Without CUDA: runs the same kernels in Triton's interpreter at small sizes, checks them against the
reference and says that no timing was taken (nothing is written).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by supermask.kernels)

import torch.nn.functional as F  # noqa: E402

import supermask.kernels as K  # noqa: E402
from supermask import mask as ref  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def gemm_cases(batch):
    # (name, M (rows of X), N (out features), K (in features))
    return [("fc1 784x750 (w2.5)", batch, 750, 784), ("fc2 750x250 (w2.5)", batch, 250, 750),
            ("conv 128->256 3x3 @16x16 as GEMM", batch * 16 * 16, 256, 128 * 9),
            ("4096x4096", 4096, 4096, 4096)]


def _layer(M, N, Kf, dtype, device, k=0.5, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(M, Kf, generator=g).to(dtype).to(device)
    w = (torch.randn(N, Kf, generator=g) / Kf ** 0.5).to(dtype).to(device)
    s = torch.randn(N, Kf, generator=g).to(dtype).to(device)
    thr = ref.topk_threshold(s.abs(), ref.num_kept(s.numel(), k))
    return x, w, s, thr


def reference_linear(x, w, s, thr):
    return F.linear(x, ref.masked_weight(w, s, thr))


def bench_cuda(args):
    import triton  # noqa: PLC0415 (only on CUDA: without a GPU the benchmark runs in the interpreter)
    import triton.testing  # noqa: PLC0415

    dtype = DT[args.dtype]
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    out = dict(device=name, dtype=args.dtype, fp32_precision=K.get_fp32_precision(), torch=torch.__version__,
               triton=triton.__version__, gemm=[], threshold=[], masked_weight=[])
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)  # noqa: E731

    for label, M, N, Kf in gemm_cases(args.batch):
        x, w, s, thr = _layer(M, N, Kf, dtype, dev)
        x.requires_grad_()
        s.requires_grad_()
        gy = torch.randn(M, N, device=dev, dtype=dtype)
        flops = 2.0 * M * N * Kf
        nbytes = (M * Kf + 2 * N * Kf + M * N) * x.element_size()  # X, W, S read once, Y written once
        row = dict(case=label, M=M, N=N, K=Kf)
        fns = {
            "fused": lambda: K.masked_linear(x, w, s, thr),
            "reference": lambda: reference_linear(x, w, s, thr),
            "dense": lambda: F.linear(x, w),
        }
        for key, fn in fns.items():
            with torch.no_grad():
                ms = bench(fn)
            row[f"{key}_fwd_ms"] = ms
            row[f"{key}_fwd_tflops"] = flops / ms * 1e-9
            row[f"{key}_fwd_gbs"] = nbytes / ms * 1e-6
            if key == "dense":
                w.requires_grad_()
                fb = lambda: torch.autograd.grad(F.linear(x, w), (x, w), gy)  # noqa: E731
            else:
                fb = lambda fn=fn: torch.autograd.grad(fn(), (x, s), gy)  # noqa: E731
            ms = bench(fb)
            w.requires_grad_(False)
            row[f"{key}_fwdbwd_ms"] = ms
            row[f"{key}_fwdbwd_tflops"] = 3 * flops / ms * 1e-9
        row["fused_vs_reference_fwd"] = row["reference_fwd_ms"] / row["fused_fwd_ms"]
        row["fused_vs_dense_fwd"] = row["dense_fwd_ms"] / row["fused_fwd_ms"]
        row["fused_vs_reference_fwdbwd"] = row["reference_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
        row["fused_vs_dense_fwdbwd"] = row["dense_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
        out["gemm"].append(row)
        print(f"{label:36s} fwd fused {row['fused_fwd_tflops']:7.1f} TFLOP/s ({row['fused_fwd_gbs']:7.1f} GB/s) "
              f"ref {row['reference_fwd_tflops']:7.1f} dense {row['dense_fwd_tflops']:7.1f} | "
              f"x{row['fused_vs_reference_fwd']:.2f} vs ref, {row['fused_vs_dense_fwd']:.2f} of dense | "
              f"fwd+bwd x{row['fused_vs_reference_fwdbwd']:.2f} vs ref, {row['fused_vs_dense_fwdbwd']:.2f} of dense")

    for n in (784 * 750, 128 * 9 * 256, 4096 * 4096):
        s = torch.randn(n, device=dev, dtype=dtype)
        kk = n // 2
        mags = s.abs()
        row = dict(n=n, n_keep=kk,
                   radix_ms=bench(lambda: K.topk_threshold(s, kk)),
                   reference_ms=bench(lambda: ref.topk_threshold(mags, kk)),
                   topk_ms=bench(lambda: torch.topk(mags, kk, sorted=False)),
                   kthvalue_ms=bench(lambda: torch.kthvalue(mags.float(), n - kk + 1)),
                   sort_ms=bench(lambda: torch.sort(mags, descending=True)))
        row["radix_gbs"] = n * s.element_size() * (4 if dtype == torch.float32 else 3) / row["radix_ms"] * 1e-6
        out["threshold"].append(row)
        print(f"threshold n={n:9d}: radix {row['radix_ms']:.3f} ms, reference {row['reference_ms']:.3f}, "
              f"topk {row['topk_ms']:.3f}, kthvalue {row['kthvalue_ms']:.3f}, sort {row['sort_ms']:.3f}")

    for shape in ((64, 3, 3, 3), (256, 128, 3, 3), (512, 512, 3, 3)):
        w = torch.randn(shape, device=dev, dtype=dtype)
        s = torch.randn(shape, device=dev, dtype=dtype)
        thr = ref.topk_threshold(s.abs(), ref.num_kept(s.numel(), 0.5))
        row = dict(shape=shape, fused_ms=bench(lambda: K.masked_weight_fused(w, s, thr)),
                   reference_ms=bench(lambda: ref.masked_weight(w, s, thr)))
        row["fused_gbs"] = 3 * w.numel() * w.element_size() / row["fused_ms"] * 1e-6
        out["masked_weight"].append(row)
        print(f"masked weight {shape}: fused {row['fused_ms']:.4f} ms ({row['fused_gbs']:.0f} GB/s), "
              f"reference {row['reference_ms']:.4f} ms")

    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
    path = RESULTS / f"kernels_{tag}_{args.dtype}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"saved {path}")


def check_interpreter(args):
    """No GPU: correctness at small sizes in the interpreter; no timing."""
    torch.manual_seed(0)
    dtype = DT[args.dtype]
    t0 = time.time()
    worst = 0.0
    for label, M, N, Kf in [("fc-like", 16, 30, 40), ("ties", 9, 13, 21), ("odd", 5, 33, 47)]:
        x, w, s, thr = _layer(M, N, Kf, dtype, "cpu")
        if label == "ties":
            s = (torch.randint(-2, 3, s.shape).float() * 0.5).to(dtype)
            thr = ref.topk_threshold(s.abs(), s.numel() // 3)
        x.requires_grad_()
        s.requires_grad_()
        gy = torch.randn(M, N).to(dtype)
        with K.poisoned_outputs():
            y = K.masked_linear(x, w, s, thr)
            gx, gs = torch.autograd.grad(y, (x, s), gy)
        xr, sr = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
        mask = ref.mask_from_threshold(s.detach().abs(), thr)
        yr = F.linear(xr, w.double() * mask)
        gxr = torch.autograd.grad(yr, xr, gy.double())[0]
        gsr = (gy.double().t() @ xr.detach()) * w.double() * torch.sign(sr.detach())
        for a, b in ((y, yr), (gx, gxr), (gs, gsr)):
            worst = max(worst, ((a.double() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1)).item())
        t = K.topk_threshold(s, s.numel() // 3)
        r = ref.topk_threshold(s.detach().abs(), s.numel() // 3)
        assert torch.equal(t.value, r.value) and t.ties == r.ties and t.split == r.split, (t, r)
        print(f"  {label:8s} M={M} N={N} K={Kf}: masked_linear fwd/bwd and topk_threshold agree with the reference "
              f"(split={thr.split})")
    w = torch.randn(8, 3, 3, 3).to(dtype)
    s = torch.randn(8, 3, 3, 3).to(dtype)
    thr = ref.topk_threshold(s.abs(), 100)
    assert torch.equal(K.masked_weight_fused(w, s, thr), ref.masked_weight(w, s, thr))
    print("  masked_weight_fused agrees with the reference")
    limit = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    print(f"  worst relative error {worst:.2e} (limit {limit:.0e} for {args.dtype})")
    if worst > limit:
        print("FAILED: error above the limit")
        return 1
    print(f"No CUDA device: ran the kernels in Triton's interpreter ({time.time() - t0:.1f} s) and checked "
          "them against the reference. NO TIMING WAS TAKEN; nothing was written to benchmarks/results/.")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=sorted(DT), default="fp16")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        bench_cuda(args)
        return 0
    return check_interpreter(args)


if __name__ == "__main__":
    sys.exit(main())
