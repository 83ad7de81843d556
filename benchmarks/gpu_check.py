"""The GPU part of benchmarks/gpu_check.sh: torch.library.opcheck of the supermask ops on CUDA, the
kernel benchmarks and one compiled training epoch, written to benchmarks/results/gpu_<gpu>.md.

    python benchmarks/gpu_check.py [--quick] [--out-dir DIR]

Sections (each says SKIPPED, and why, when it cannot run):
  opcheck    torch.library.opcheck of every supermask op on CUDA tensors (fp32, bf16)
  linear     fused masked linear (supermask::masked_linear, Triton) forward+backward vs dense cuBLAS
             F.linear and vs the reference path (weight * mask, then F.linear), 4096 x 4096 weight,
             batch 4096, fp32 and bf16 (bf16: under torch.autocast, as training runs)
  threshold  the radix-select threshold (supermask::topk_threshold) vs torch.topk(sorted=False),
             torch.sort and torch.kthvalue, n = 1e6 and 1e7, k = n / 2
  epoch      one epoch (Fashion-MNIST shaped data, batch 128) of fc (width 2.5) and conv4 training,
             torch.compile of the supermask model vs torch.compile of the dense one

Timings: torch.utils.benchmark.Timer (blocked_autorange, CUDA synchronized), medians. Without CUDA
(this script is also run by gpu_check.sh on a CPU machine, to show it works) every section runs
its code once on tiny CPU inputs (the Triton kernels in the interpreter) and no timing is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by supermask.kernels)

import torch.nn.functional as F  # noqa: E402
import torch.utils.benchmark as tb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import supermask  # noqa: E402
from supermask import models, ops  # noqa: E402
from supermask.mask import num_kept  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEV = torch.device("cuda" if CUDA else "cpu")
# Without CUDA the kernel code paths still run: the Triton kernels on CPU tensors, interpreted.
FUSED_PATH = "auto" if CUDA else "triton"
lines: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    lines.append(text)


def skipped(what: str, why: str) -> None:
    say(f"SKIPPED {what}: {why}")


def median_ms(fn, min_run_time=1.0) -> float:
    """Median milliseconds of fn() (torch.utils.benchmark synchronizes CUDA around the runs)."""
    fn()
    if CUDA:
        torch.cuda.synchronize()
    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def triton_ok() -> str | None:
    try:
        import supermask.kernels  # noqa: F401, PLC0415
    except ImportError as e:
        return f"Triton not importable ({e})"
    return None


# ---------------------------------------------------------------------------------------------
def section_opcheck(quick: bool) -> None:
    say("\n## opcheck (torch.library.opcheck of every supermask op)\n")
    if not CUDA:
        skipped("opcheck on CUDA", "no CUDA device: opcheck ran on CPU tensors with the Triton kernels "
                "interpreted instead")
    why = triton_ok()
    if why:
        say(f"note: {why}; the CUDA ops run the reference implementation")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=DEV).manual_seed(0)
        w = torch.randn(96, 160, device=DEV, dtype=dtype, generator=g)
        s = torch.randn(96, 160, device=DEV, dtype=dtype, generator=g).requires_grad_()
        x = torch.randn(8, 160, device=DEV, dtype=dtype, generator=g, requires_grad=True)
        n_keep = num_kept(s.numel(), 0.3)
        v = s.detach().abs().flatten().float().kthvalue(s.numel() - n_keep + 1).values.to(dtype)
        cases = {
            "masked_weight": (w, s, n_keep, ops.new_state()),
            "masked_linear": (x, w, s, n_keep, ops.new_state()),
            "ste_grad": (torch.randn_like(w), w, s.detach(), n_keep, -1),
            "masked_linear_backward": (torch.randn(8, 96, device=DEV, dtype=dtype), x.detach(), w, s.detach(),
                                       n_keep, -1, True, True),
            "topk_threshold": (s.detach(), n_keep),
            "masked_weight_at": (w, s, v, -1),
        }
        for name, args in cases.items():
            try:
                with ops.use_path(FUSED_PATH):
                    torch.library.opcheck(getattr(torch.ops.supermask, name).default, args)
                say(f"- {name} {dtype}: passed")
            except Exception as e:  # noqa: BLE001 (report every op)
                say(f"- {name} {dtype}: FAILED {type(e).__name__}: {str(e)[:300]}")


# ---------------------------------------------------------------------------------------------
def section_linear(quick: bool) -> None:
    say("\n## Fused masked linear, forward + backward (weight N x K, batch M)\n")
    size = 4096 if CUDA else 64
    if not CUDA:
        skipped("timing", "no CUDA device: the code below ran once at 64 x 64 on the CPU, untimed")
    say("| dtype | M x N x K | dense cuBLAS F.linear (ms) | reference path (ms) | fused op (ms) "
        "| fused / dense | fused / reference |")
    say("|---|---|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=DEV).manual_seed(1)
        w = torch.randn(size, size, device=DEV, generator=g)
        s = torch.randn(size, size, device=DEV, generator=g).requires_grad_()
        x = torch.randn(size, size, device=DEV, generator=g).requires_grad_()
        wd = w.clone().requires_grad_()
        gy = torch.randn(size, size, device=DEV, generator=g)
        n_keep = num_kept(s.numel(), 0.5)
        sid = ops.new_state()
        auto = torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

        def dense():
            with auto:
                F.linear(x, wd).backward(gy)

        def fused(path=FUSED_PATH):
            with auto, ops.use_path(path):
                ops.masked_linear(x, w, s, n_keep, sid).backward(gy)

        def reference():
            fused("reference")

        if CUDA:
            t = {name: median_ms(fn) for name, fn in (("dense", dense), ("reference", reference), ("fused", fused))}
            say(f"| {str(dtype)[6:]} | {size}^3 | {t['dense']:.3f} | {t['reference']:.3f} | {t['fused']:.3f} "
                f"| {t['fused'] / t['dense']:.2f}x | {t['fused'] / t['reference']:.2f}x |")
        else:
            for fn in (dense, reference, fused):
                fn()
            say(f"| {str(dtype)[6:]} | {size}^3 | ran | ran | ran | n/a | n/a |")


# ---------------------------------------------------------------------------------------------
def section_threshold(quick: bool) -> None:
    say("\n## Top-k threshold (k = n / 2)\n")
    sizes = (10**6, 10**7) if CUDA else (10**4,)
    if not CUDA:
        skipped("timing", "no CUDA device: ran once at n = 1e4 on the CPU, untimed")
    say("| n | supermask::topk_threshold (ms) | torch.topk sorted=False (ms) | torch.sort (ms) "
        "| torch.kthvalue (ms) | topk / ours | sort / ours | kthvalue / ours |")
    say("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        x = torch.randn(n, device=DEV, generator=torch.Generator(device=DEV).manual_seed(2))
        k = n // 2
        def ours():
            with ops.use_path(FUSED_PATH):
                torch.ops.supermask.topk_threshold(x, k)

        fns = {"ours": ours,
               "topk": lambda: torch.topk(x.abs(), k, sorted=False),
               "sort": lambda: torch.sort(x.abs(), descending=True),
               "kthvalue": lambda: torch.kthvalue(x.abs(), n - k + 1)}
        if CUDA:
            t = {name: median_ms(fn, 0.5) for name, fn in fns.items()}
            say(f"| {n:.0e} | {t['ours']:.3f} | {t['topk']:.3f} | {t['sort']:.3f} | {t['kthvalue']:.3f} "
                f"| {t['topk'] / t['ours']:.1f}x | {t['sort'] / t['ours']:.1f}x | {t['kthvalue'] / t['ours']:.1f}x |")
        else:
            for fn in fns.values():
                fn()
            say(f"| {n:.0e} | ran | ran | ran | ran | n/a | n/a | n/a |")


# ---------------------------------------------------------------------------------------------
def _epoch(model, x, y, batch):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for i in range(0, x.shape[0], batch):
        loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if CUDA:
        torch.cuda.synchronize()


def section_epoch(quick: bool) -> None:
    say("\n## One training epoch, torch.compile (supermask vs dense)\n")
    n = 60000 if CUDA and not quick else 512
    if not CUDA:
        skipped("timing", f"no CUDA device: one epoch of {n} images ran on the CPU, untimed")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 28, 28, generator=g).to(DEV)
    y = torch.randint(0, 10, (n,), generator=g).to(DEV)
    say("| model | dense compiled epoch (s) | supermask compiled epoch (s) | ratio | compile + warm-up (s) |")
    say("|---|---:|---:|---:|---:|")
    for name, width in (("fc", 2.5), ("conv4", 1.0)):
        torch.manual_seed(0)
        dense = models.build(name, (1, 28, 28), 10, width).to(DEV)
        sm = supermask.convert(models.build(name, (1, 28, 28), 10, width), k=0.5).to(DEV)
        row = {}
        for label, model in (("dense", dense), ("supermask", sm)):
            cm = torch.compile(model)
            t0 = time.perf_counter()
            _epoch(cm, x[:1024], y[:1024], 128)  # compiles (forward and backward) and warms up
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            _epoch(cm, x, y, 128)
            row[label] = (time.perf_counter() - t0, warm)
        if CUDA:
            say(f"| {name} x{width} | {row['dense'][0]:.2f} | {row['supermask'][0]:.2f} "
                f"| {row['supermask'][0] / row['dense'][0]:.2f}x | {row['dense'][1]:.0f} / {row['supermask'][1]:.0f} |")
        else:
            say(f"| {name} x{width} | ran | ran | n/a | {row['dense'][1]:.0f} / {row['supermask'][1]:.0f} |")


SECTIONS = {"opcheck": section_opcheck, "linear": section_linear, "threshold": section_threshold,
            "epoch": section_epoch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="epoch section: 512 images instead of 60,000")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    gpu = torch.cuda.get_device_name() if CUDA else "none"
    say(f"# GPU check: {gpu}")
    say(f"torch {torch.__version__}, python {platform.python_version()}, CUDA {torch.version.cuda}, "
        f"triton: {triton_ok() or 'ok'}; command: python benchmarks/gpu_check.py {' '.join(argv or sys.argv[1:])}")
    failed = []
    for name in args.sections.split(","):
        try:
            SECTIONS[name](args.quick)
        except Exception as e:  # noqa: BLE001 (one failing section must not hide the others)
            failed.append(name)
            say(f"\nFAILED section {name}: {type(e).__name__}: {str(e)[:500]}")
    tag = "".join(c if c.isalnum() else "_" for c in gpu) if CUDA else "dryrun_no_gpu"
    out = Path(args.out_dir) / f"gpu_{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
