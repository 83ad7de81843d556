"""Ahead-of-time compile of every kernel, in every configuration, for Ampere (sm_80) and Hopper
(sm_90a), on a machine without a GPU (Triton's wheel ships ptxas).

    python -m supermask.kernels.aot --out benchmarks/results/kernels_aot.json   # full sweep (+ .md beside)
    python -m supermask.kernels.aot --quick --out /tmp/aot.json             # one config per kernel and arch

It writes only where --out says (the JSON there, the markdown table beside it with suffix .md), never
into the source tree by default: without --out it exits 2 with one line on stderr.

For each build it records registers per thread, spill stores/loads (ptxas -v), shared memory
(Triton's allocation), local memory, and which tensor-core instructions the PTX holds (mma.sync on
sm_80, wgmma on sm_90). The interpreter replaces jit functions, so when TRITON_INTERPRET is set
this module re-runs itself in a subprocess with the variable removed.

The signatures are the common specialization the JIT would also pick on a GPU: 16-byte aligned
pointers, unit strides as constants, other strides divisible by 16 (e.g. K = 784 or 4096).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCHS = (80, 90)
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _jobs(quick: bool):
    """(kernel name, variant, dtype, num_warps, num_stages, constexprs) to build."""
    from supermask.kernels.masked_linear import MATMUL_CONFIGS  # noqa: PLC0415 (triton only in the worker processes, which run without TRITON_INTERPRET)
    from supermask.kernels.masked_weight import ELEMENTWISE_CONFIGS  # noqa: PLC0415 (triton only in the worker processes, which run without TRITON_INTERPRET)
    from supermask.kernels.threshold import HISTOGRAM_CONFIGS  # noqa: PLC0415 (triton only in the worker processes, which run without TRITON_INTERPRET)

    jobs = []
    mm = [(c.kwargs, c.num_warps, c.num_stages) for c in MATMUL_CONFIGS]
    if quick:
        pick = mm[6]  # 64x64x64, 4 warps, 3 stages (quick to build; the sweep has the rest)
        jobs += [("_masked_matmul_kernel", "fwd", "fp16", pick), ("_masked_matmul_kernel", "dx", "bf16", pick),
                 ("_matmul_ste_kernel", "ds", "fp32", pick)]
        jobs += [("_radix_histogram_kernel", "pass", "fp32", ({"BLOCK": 4096, "SHIFT": 16}, 8, 1)),
                 ("_radix_scan_kernel", "scan", "i32", ({"SHIFT": 8}, 4, 1)),
                 ("_masked_weight_kernel", "contiguous", "fp16", ({"BLOCK": 1024, "CONTIGUOUS": True}, 4, 1)),
                 ("_ste_grad_kernel", "strided", "bf16", ({"BLOCK": 1024, "CONTIGUOUS": False}, 4, 1))]
    else:
        for dt in DTYPES:
            for cfg in mm:
                jobs += [("_masked_matmul_kernel", "fwd", dt, cfg), ("_masked_matmul_kernel", "dx", dt, cfg),
                         ("_matmul_ste_kernel", "ds", dt, cfg)]
            for block, warps in HISTOGRAM_CONFIGS:
                jobs.append(("_radix_histogram_kernel", "pass", dt, ({"BLOCK": block, "SHIFT": 16}, warps, 1)))
            for block, warps in ELEMENTWISE_CONFIGS:
                for contig in (True, False):
                    v = "contiguous" if contig else "strided"
                    jobs.append(("_masked_weight_kernel", v, dt, ({"BLOCK": block, "CONTIGUOUS": contig}, warps, 1)))
                    jobs.append(("_ste_grad_kernel", v, dt, ({"BLOCK": block, "CONTIGUOUS": contig}, warps, 1)))
        jobs.append(("_radix_scan_kernel", "scan", "i32", ({"SHIFT": 8}, 4, 1)))
    return [(name, var, dt, cfg, arch) for (name, var, dt, cfg) in jobs for arch in ARCHS]


def _signature(name: str, variant: str, dt: str, constexprs: dict):
    """Triton signature, constants and divisibility hints for one kernel variant."""
    import importlib  # noqa: PLC0415 (triton only in the worker processes, which run without TRITON_INTERPRET)
    # (the package re-exports a function named masked_linear, so import the modules by path)
    masked_linear, masked_weight, threshold = (importlib.import_module(f"supermask.kernels.{m}")
                                               for m in ("masked_linear", "masked_weight", "threshold"))
    fn = {"_masked_matmul_kernel": masked_linear._masked_matmul_kernel,
          "_matmul_ste_kernel": masked_linear._matmul_ste_kernel,
          "_radix_histogram_kernel": threshold._radix_histogram_kernel,
          "_radix_scan_kernel": threshold._radix_scan_kernel,
          "_masked_weight_kernel": masked_weight._masked_weight_kernel,
          "_ste_grad_kernel": masked_weight._ste_grad_kernel}[name]
    ptr = "*" + dt
    prec = "tf32" if dt == "fp32" else "ieee"
    consts = dict(constexprs)
    sig = {}
    div16 = []
    if name == "_masked_matmul_kernel":
        for a in fn.arg_names:
            sig[a] = "i32"
        sig.update(w_ptr=ptr, s_ptr=ptr, b_ptr=ptr, c_ptr=ptr, v_ptr="*fp32", lim_ptr="*i64")
        consts.update(APPLY_MASK=True, HAS_LIMIT=True, FLAT_T=variant == "dx", INPUT_PRECISION=prec, UPCAST=False)
        # fwd: Y^T = Wm @ X^T (W row-major, Y row-major); dx: dX^T = Wm^T @ dY^T.
        unit = (["stride_wk", "stride_sk", "stride_bk", "stride_cm"] if variant == "fwd"
                else ["stride_wm", "stride_sm", "stride_bk", "stride_cm"])
        div16 = ["w_ptr", "s_ptr", "b_ptr", "c_ptr", "v_ptr"] + [
            s for s in ("stride_wm", "stride_wk", "stride_sm", "stride_sk", "stride_bn", "stride_cn") if s not in unit]
        consts.update({u: 1 for u in unit})
    elif name == "_matmul_ste_kernel":
        for a in fn.arg_names:
            sig[a] = "i32"
        sig.update(a_ptr=ptr, b_ptr=ptr, w_ptr=ptr, s_ptr=ptr, c_ptr=ptr)
        consts.update(INPUT_PRECISION=prec, UPCAST=False)
        unit = ["stride_am", "stride_bn", "stride_wn", "stride_sn", "stride_cn"]  # dS = dY^T @ X
        consts.update({u: 1 for u in unit})
        div16 = ["a_ptr", "b_ptr", "w_ptr", "s_ptr", "c_ptr",
                 "stride_ak", "stride_bk", "stride_wm", "stride_sm", "stride_cm"]
    elif name == "_radix_histogram_kernel":
        sig = dict(x_ptr=ptr, n="i32", state_ptr="*i32", hist_ptr="*i32", gate_ptr="*i32")
        div16 = ["x_ptr", "state_ptr", "hist_ptr"]
        consts = {"RANKS": 1, "GATED": False, **consts}  # (the cold select's defaults)
    elif name == "_radix_scan_kernel":
        sig = dict(state_ptr="*i32", hist_ptr="*i32", n_hist="i32", gate_ptr="*i32")
        div16 = ["state_ptr", "hist_ptr"]
        consts = {"RANKS": 1, "GATED": False, **consts}
    else:
        for a in fn.arg_names:
            sig[a] = "i32"
        ptrs = [a for a in fn.arg_names if a.endswith("_ptr")]
        sig.update({p: ptr for p in ptrs})
        if name == "_masked_weight_kernel":
            sig.update(v_ptr="*fp32", lim_ptr="*i64")
            consts.setdefault("HAS_LIMIT", True)
        div16 = ptrs
    for c in consts:
        sig[c] = "constexpr"
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    return fn, sig, consts, attrs


def _build(job):
    name, variant, dt, (constexprs, warps, stages), arch = job
    import triton  # noqa: PLC0415 (triton only in the worker processes, which run without TRITON_INTERPRET)
    from triton import knobs  # noqa: PLC0415 (triton only in the worker processes, which run without TRITON_INTERPRET)
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415 (triton only in the worker processes, which run without TRITON_INTERPRET)
    from triton.compiler import ASTSource  # noqa: PLC0415 (triton only in the worker processes, which run without TRITON_INTERPRET)

    fn, sig, consts, attrs = _signature(name, variant, dt, constexprs)
    target = GPUTarget("cuda", arch, 32)
    opts = triton.compiler.make_backend(target).parse_options({"num_warps": warps, "num_stages": stages})
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its -v log
    log = io.StringIO()
    t0 = time.time()
    rec = dict(kernel=name, variant=variant, dtype=dt, arch=f"sm_{arch}", num_warps=warps, num_stages=stages,
               config={k: v for k, v in constexprs.items()})
    try:
        with contextlib.redirect_stdout(log):
            cc = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts.__dict__)
    except Exception as e:  # noqa: BLE001 (any compiler error is recorded, and fails the test)
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        return rec
    ptx, text = cc.asm["ptx"], log.getvalue()

    def grab(pat):
        m = re.search(pat, text)
        return int(m.group(1)) if m else None

    rec.update(
        ok="cubin" in cc.asm and len(cc.asm["cubin"]) > 0,
        compile_s=round(time.time() - t0, 2),
        cubin_bytes=len(cc.asm["cubin"]),
        registers=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        stack_frame=grab(r"(\d+) bytes stack frame"),
        shared_bytes=int(cc.metadata.shared),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        ldmatrix=len(re.findall(r"\bldmatrix", ptx)),
        cp_async=len(re.findall(r"\bcp\.async\b(?!\.bulk)", ptx)),
    )
    return rec


SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def run(quick: bool, workers: int) -> list[dict]:
    """Build every job (``quick``: one config per kernel and arch) for sm_80 and sm_90 in ``workers``
    processes (which must run without TRITON_INTERPRET); one record per build, in job order: kernel,
    variant, dtype, arch, config, ``ok``, and for a build that succeeded compile_s (seconds),
    cubin_bytes, registers (per thread), spill_stores/spill_loads/stack_frame (bytes, from ptxas -v),
    shared_bytes and counts of tensor-core instructions in the PTX; a failed build has ``error``."""
    jobs = _jobs(quick)
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(_build, jobs))


def _markdown(recs) -> str:
    lines = ["# AOT builds of supermask.kernels (CPU-only machine, Triton's bundled ptxas)", "",
             "| kernel | variant | dtype | arch | config | warps | stages | regs | spill st/ld (B) | smem (B) "
             "| tensor-core instr. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
        if not r["ok"]:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['arch']} | {cfg} | {r['num_warps']} "
                         f"| {r['num_stages']} | FAILED | | | {r['error'][:80]} |")
            continue
        tc = f"wgmma×{r['wgmma']}" if r["wgmma"] else (f"mma.sync×{r['mma_sync']}" if r["mma_sync"] else "-")
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['arch']} | {cfg} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared_bytes']} | {tc} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """The command (see the module docstring): argv as sys.argv[1:]. Returns the exit status: 0 when
    every build succeeded, 1 when one failed (the JSON and .md still written), 2 without --out (one
    line on stderr, nothing written). Under TRITON_INTERPRET it re-runs itself without it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one config per kernel and arch")
    p.add_argument("--out", default=None, help="JSON path (required; the .md table goes beside it)")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    a = p.parse_args(argv)
    if not a.out:
        print("aot: --out PATH is required (the results go only where they are told)", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "supermask.kernels.aot", *(argv or sys.argv[1:])], env=env)
    t0 = time.time()
    recs = run(a.quick, a.workers)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import triton  # noqa: PLC0415 (triton only in the worker processes, which run without TRITON_INTERPRET)
    meta = dict(triton=triton.__version__, archs=[f"sm_{a}" for a in ARCHS], seconds=round(time.time() - t0, 1),
                builds=len(recs), failed=sum(not r["ok"] for r in recs))
    out.write_text(json.dumps(dict(meta=meta, builds=recs), indent=1))
    out.with_suffix(".md").write_text(_markdown(recs))
    print(f"{meta['builds']} builds, {meta['failed']} failed, {meta['seconds']} s -> {out}")
    return 1 if meta["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
