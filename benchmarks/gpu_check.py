"""One stage of the one-call GPU check; benchmarks/gpu_check.sh runs them all, each in its own
process under its own time limit, and is the way to run the check:

    bash benchmarks/gpu_check.sh --out DIR
    python3 benchmarks/gpu_check.py --stage STAGE --out DIR [--backend NAME]   (one stage)

Stages (see benchmarks/README.md for how to read what they write under DIR):
  env          versions, GPU name, SMs, clocks (nvidia-smi, when on PATH) -> rows + DIR/env.txt
  preflight    refuses (exit 3, one line on stderr) unless the supermask layers' forward and backward
               really launch the Triton kernels of supermask.kernels (torch.profiler on CUDA; the
               interpreted kernels' frames on the CPU), and checks that timing the reference as
               "fused" is refused
  correctness  fixed config (SUPERMASK_AUTOTUNE=0) vs float64 references at edge shapes, twice each
  nan          NaN scores refused (its own process: on CUDA a device assert ends the CUDA context)
  tiny         one tiny launch of every kernel (what compute-sanitizer runs)
  kernels      masked linear fwd+bwd: fused vs masked weight + cuBLAS vs dense cuBLAS vs reference,
               TF32 off and on, fixed config then autotuned; the suggested per-shape LINEAR_CHOICE
  threshold    supermask::topk_threshold vs torch.topk(sorted=False), sort, kthvalue
  train        fc and conv4 training steps, eager and torch.compile, with launch/sync/copy counts
  summary      DIR/summary.md from the rows

Exit: 0 (rows ok or SKIPPED), 1 (a row FAILED), 2 (bad arguments), 3 (preflight refused).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check_common as C  # noqa: E402  (sets TRITON_INTERPRET before triton is imported)
import torch  # noqa: E402

STAGES = ("env", "preflight", "correctness", "nan", "tiny", "kernels", "threshold", "train", "summary")


# ---------------------------------------------------------------------------------------------
def stage_env(res: C.Results, args) -> None:
    """Versions, device, clocks; nvidia-smi's full query to DIR/env.txt."""
    import triton  # noqa: PLC0415

    import supermask.kernels as k  # noqa: PLC0415
    from supermask.threads import cpu_model  # noqa: PLC0415
    res.row("versions", python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
            cuda=torch.version.cuda, kernels_from=str(Path(k.__file__).resolve().parent),
            autotune=os.environ.get("SUPERMASK_AUTOTUNE", "1"), cpu=cpu_model(), cpu_count=os.cpu_count())
    if not C.CUDA:
        res.skipped("GPU name, SMs, clocks", C.NO_CUDA)
        return
    p = torch.cuda.get_device_properties(0)
    res.row("device", name=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}", tf32_default=torch.get_float32_matmul_precision())
    if not shutil.which("nvidia-smi"):
        res.skipped("clocks", "nvidia-smi is not on PATH")
        return
    q = "clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,driver_version"
    r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], check=False, capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        res.skipped("clocks", f"nvidia-smi --query-gpu failed: {(r.stderr or r.stdout).strip()[:200]}")
    else:
        res.row("clocks", **dict(zip(q.split(","), r.stdout.strip().split(", "))))
    full = subprocess.run(["nvidia-smi", "-q"], check=False, capture_output=True, text=True, timeout=30)
    (res.dir / "env.txt").write_text(full.stdout[-200_000:])




# ---------------------------------------------------------------------------------------------
def _models(backend: str | None):
    """A small fc (linear layers: masked_linear) and a small conv model (masked_weight), on DEV."""
    import supermask  # noqa: PLC0415
    from supermask import models  # noqa: PLC0415
    out = []
    for name, width in (("fc", 0.1), ("conv2", 0.1)):
        m = supermask.convert(models.build(name, (1, 28, 28), 10, width), k=0.5).to(C.DEV)
        if backend is not None:
            supermask.set_backend(m, backend)
        elif not C.CUDA:
            supermask.set_backend(m, "triton")  # on CPU tensors "auto" means the C kernels
        out.append((name, m))
    return out


def _layers_step(model, x):
    def step():
        model(x).square().mean().backward()
    return step


def stage_preflight(res: C.Results, args) -> None:
    """Refused unless each model's training step launches supermask's Triton kernels, and unless
    the guard refuses a plain torch computation timed as "fused"."""
    os.environ["SUPERMASK_AUTOTUNE"] = "0"  # one config per kernel: the check, not the tuning, is timed here
    try:
        names = C.kernel_names()
    except ImportError as e:
        raise C.Refused(f"supermask.kernels is not importable from {ROOT} ({e})") from e
    res.row("kernels found by introspection", kernels=",".join(sorted(names)))
    x = torch.randn(4, 1, 28, 28, device=C.DEV)
    seen = set()
    for name, model in _models(args.backend):
        got = C.require_triton(_layers_step(model, x), f"{name} training step (backend {args.backend or 'default'})")
        seen |= set(got)
        res.row(f"{name} step launches Triton", kernels=",".join(sorted(got)))
    w, s = torch.randn(64, 32, device=C.DEV), torch.randn(64, 32, device=C.DEV)
    try:
        C.require_triton(lambda: torch.nn.functional.linear(x.flatten(1)[:, :32], w * (s.abs() > 0.5)), "ref")
    except C.Refused:
        res.row("reference timed as fused is refused")
    else:
        raise C.Refused("the guard let plain torch pass as the fused path: the check cannot be trusted")
    res.row("kernels not launched by these steps", kernels=",".join(sorted(C.kernel_names() - seen)) or "-")


# ---------------------------------------------------------------------------------------------
def stage_summary(res: C.Results, args) -> None:
    """DIR/summary.md: per stage the counts of ok / FAIL / SKIPPED / ..., the failures, the
    suggested LINEAR_CHOICE table (from the kernels stage)."""
    rows = C.read_rows(args.out)
    stages: dict[str, dict] = {}
    for r in rows:
        stages.setdefault(r["stage"], {}).setdefault(r["status"], 0)
        stages[r["stage"]][r["status"]] += 1
    lines = ["# GPU check summary", "", f"device: {torch.cuda.get_device_name() if C.CUDA else 'none: ' + C.NO_CUDA}",
             "", "| stage | " + " | ".join(_STATUSES) + " |", "|---|" + "---|" * len(_STATUSES)]
    for st, counts in stages.items():
        lines.append(f"| {st} | " + " | ".join(str(counts.get(s, 0)) for s in _STATUSES) + " |")
    bad = [r for r in rows if r["status"] in ("FAIL", "REFUSED", "TIMEOUT")]
    lines += ["", f"{len(bad)} rows FAIL / REFUSED / TIMEOUT" + (":" if bad else ".")]
    lines += [f"- {r['stage']}: {r['case']}: {r['status']} {r.get('error', r.get('why', ''))}"[:400] for r in bad]
    late = [r for r in rows if r["status"] == "SKIPPED" and "no time left" in r.get("why", "")]
    if late:
        lines += ["", f"{len(late)} cases SKIPPED for lack of time (their stage's limit): "
                  + ", ".join(f"{st} {sum(r['stage'] == st for r in late)}"
                              for st in dict.fromkeys(r["stage"] for r in late))
                  + "; rerun one stage alone with more time: python3 benchmarks/gpu_check.py --stage NAME --out DIR"]
    choice = [r for r in rows if r["stage"] == "kernels" and "suggest" in r]
    if choice:
        lines += ["", "Suggested per-shape choice (kernels/masked_linear.py LINEAR_CHOICE):", "", "```python"]
        lines += [f"LINEAR_CHOICE[{r['key']}] = {r['suggest']!r}  # fused {r['fused_ms']:.4g} ms, "
                  f"masked+cuBLAS {r['cublas_ms']:.4g} ms ({r['case']})" for r in choice]
        lines.append("```")
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "summary.md").write_text(text)
    print(text)


_STATUSES = ("ok", "FAIL", "SKIPPED", "REFUSED", "TIMEOUT", "DRYRUN")


def _stage(name: str):
    if name in ("correctness", "nan", "tiny"):
        import gpu_check_correct as m  # noqa: PLC0415
        return getattr(m, f"stage_{name}")
    if name in ("kernels", "threshold", "train"):
        import gpu_check_perf as m  # noqa: PLC0415
        return getattr(m, f"stage_{name}")
    return globals()[f"stage_{name}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--out", required=True, help="folder for the results (created)")
    p.add_argument("--backend", default=None, help="preflight: supermask.set_backend name to check "
                   "(default: the layers' own 'auto' on CUDA, 'triton' on the CPU)")
    args = p.parse_args(argv)
    res = C.Results(args.out, args.stage)
    try:
        _stage(args.stage)(res, args)
    except C.Refused as e:
        res.row(args.stage, "REFUSED", error=str(e))
        print(f"gpu_check: {args.stage} REFUSED: {e}", file=sys.stderr)
        return 3
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
