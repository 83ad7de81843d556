"""Shared parts of the one-call GPU check (benchmarks/gpu_check.sh): where rows go, which Triton
kernels exist, which were launched, timing with CUDA events, profiler counts.

Rows are appended to DIR/results.jsonl (one JSON object a line) and DIR/results.md (markdown) the
moment they are known, each file opened, written and closed per row, so a check killed half-way
leaves every finished row readable. Row fields: stage, case, status (ok | FAIL | SKIPPED | REFUSED |
TIMEOUT | DRYRUN) and the stage's own fields (times in milliseconds, ratios as plain numbers).

Without CUDA, TRITON_INTERPRET=1 is set before triton is first imported, so the kernels run in
Triton's interpreter on CPU tensors (the preflight and a few tiny correctness cases use that).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by supermask.kernels)

DEV = torch.device("cuda" if CUDA else "cpu")
# The path the supermask layers ask for: on CUDA what users get ("auto": the device decides, Triton);
# on the CPU "triton" (the interpreter), since "auto" there means the C kernels.
FUSED_PATH = "auto" if CUDA else "triton"
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
FILES = ("results.md", "results.jsonl", "summary.md", "log.txt", "env.txt", "sanitizer.txt")


class Refused(RuntimeError):
    """The check would time or trust the wrong path (e.g. the reference timed as "fused")."""


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
class Results:
    """Appends rows under out_dir (results.jsonl + results.md), one open/write/close per row."""

    def __init__(self, out_dir, stage: str):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.columns: list[str] = []
        self.failed = 0

    def _append(self, name: str, text: str) -> None:
        with open(self.dir / name, "a", encoding="utf-8") as f:
            f.write(text)

    def md(self, text: str) -> None:
        """A markdown line (also printed)."""
        print(text, flush=True)
        self._append("results.md", text + "\n")

    def table(self, title: str, columns: list[str]) -> None:
        """Starts a markdown table: the rows that follow give these columns (field names)."""
        self.columns = list(columns)
        self.md(f"\n### {self.stage}: {title}\n")
        self.md("| " + " | ".join(self.columns) + " |")
        self.md("|" + "---|" * len(self.columns))

    def row(self, case: str, status: str = "ok", **fields) -> dict:
        """One result: a JSON line, and a markdown table row when a table is open."""
        rec = {"stage": self.stage, "case": case, "status": status, **fields, "t": round(time.time(), 1)}
        self._append("results.jsonl", json.dumps(rec, default=str) + "\n")
        if status in ("FAIL", "REFUSED"):
            self.failed += 1
        if self.columns:
            cells = [_cell(rec.get(c, "")) for c in self.columns]
            self.md("| " + " | ".join(cells) + " |")
        else:
            self.md(f"- {case}: {status} " + " ".join(f"{k}={_cell(v)}" for k, v in fields.items()))
        return rec

    def skipped(self, what: str, why: str) -> None:
        """A SKIPPED line: what did not run, and why."""
        self._append("results.jsonl", json.dumps({"stage": self.stage, "case": what, "status": "SKIPPED",
                                                  "why": why, "t": round(time.time(), 1)}) + "\n")
        if self.columns:  # inside a table: a row of it, so the table stays one table
            cells = [what if c == "case" else f"SKIPPED: {why}" if c == "status" else "" for c in self.columns]
            self.md("| " + " | ".join(_cell(c) for c in cells) + " |")
        else:
            self.md(f"SKIPPED {self.stage}: {what}: {why}")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def read_rows(out_dir) -> list[dict]:
    """The rows of out_dir/results.jsonl (a torn last line, from a kill mid-write, is left out)."""
    path = Path(out_dir) / "results.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


# ---------------------------------------------------------------------------------------------
# Which Triton kernels exist (introspection of the @triton.jit functions in supermask.kernels)
# ---------------------------------------------------------------------------------------------
def _jit_functions() -> dict[str, object]:
    import triton  # noqa: PLC0415

    import supermask.kernels as pkg  # noqa: PLC0415
    kinds = [triton.runtime.jit.JITFunction]
    with contextlib.suppress(AttributeError):
        kinds.append(triton.runtime.interpreter.InterpretedFunction)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "aot":  # the ahead-of-time builder, no kernels of its own
            continue
        mod = importlib.import_module(f"supermask.kernels.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, tuple(kinds)) and obj.fn.__module__ == mod.__name__:
                found[obj.fn.__name__] = obj
    return found


def kernel_names() -> set[str]:
    """The names of the Triton kernels of supermask.kernels that are launched (not the @triton.jit
    helpers inlined into them): every jit function that no other jit function calls."""
    fns = _jit_functions()
    sources = {name: inspect.getsource(f.fn) for name, f in fns.items()}
    called = {name for name in fns
              for other, src in sources.items() if other != name and re.search(rf"\b{name}\s*\(", src)}
    return set(fns) - called


# ---------------------------------------------------------------------------------------------
# What a call launched
# ---------------------------------------------------------------------------------------------
def _profile(fn, steps: int = 1):
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync()
    return prof


def launched(fn) -> Counter:
    """How many times fn() launched each Triton kernel of supermask.kernels (by name). On CUDA:
    the kernels torch.profiler saw on the device; without CUDA: the interpreted kernels' Python
    frames (sys.setprofile), as the interpreter runs each kernel's function per program."""
    names = kernel_names()
    seen: Counter = Counter()
    if CUDA:
        for e in _profile(fn).events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                seen.update(n for n in names if n in e.name)
        return seen
    codes: Counter = Counter()

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name in names:
            codes[frame.f_code.co_name] += 1
    old = sys.getprofile()
    sys.setprofile(tracer)
    try:
        fn()
    finally:
        sys.setprofile(old)
    return codes


def require_triton(fn, what: str) -> Counter:
    """The Triton kernels fn() launches; Refused (one line) when it launches none of them: a
    "fused" timing or check of fn would measure some other path (the reference against itself)."""
    seen = launched(fn)
    if not seen:
        raise Refused(f"{what}: none of the {len(kernel_names())} Triton kernels of supermask.kernels "
                      f"was launched ({', '.join(sorted(kernel_names()))}); refusing to time or check it as "
                      f"the fused path")
    return seen


def require_no_triton(fn, what: str) -> None:
    """Refused when a baseline (cuBLAS, the reference) launches a supermask Triton kernel."""
    seen = launched(fn)
    if seen:
        raise Refused(f"{what}: the baseline launched supermask Triton kernels {dict(seen)}")


_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
         "cuCtxSynchronize", "cuEventSynchronize")


def step_counts(fn, steps: int = 5) -> dict:
    """Per call of fn, from torch.profiler: device kernels launched, host syncs (CUDA
    *Synchronize calls, aten::_local_scalar_dense = .item()/.tolist()), device-to-host copies."""
    prof = _profile(fn, steps)
    kernels = syncs = d2h = items = 0
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if "DtoH" in name or "Device -> Pageable" in name or "Device -> Pinned" in name:
                d2h += 1
            elif not name.startswith(("Memcpy", "Memset")):
                kernels += 1
        elif name in _SYNC:
            syncs += 1
        elif name == "aten::_local_scalar_dense":
            items += 1
    return {"launches": kernels / steps, "syncs": syncs / steps, "item_reads": items / steps,
            "d2h_copies": d2h / steps}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def time_interleaved(fns: dict, reps: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each fn(), the fns interleaved round by round (CUDA events on the
    device's clock; without CUDA, perf_counter)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync()
    marks: dict[str, list] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if CUDA:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                f()
                b.record()
                marks[k].append((a, b))
            else:
                t0 = time.perf_counter()
                f()
                marks[k].append(time.perf_counter() - t0)
    sync()
    if CUDA:
        return {k: statistics.median(a.elapsed_time(b) for a, b in v) for k, v in marks.items()}
    return {k: statistics.median(v) * 1e3 for k, v in marks.items()}


@contextlib.contextmanager
def env(**values):
    """Environment variables set for the block (None: removed), restored after."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def time_left() -> float:
    """Seconds until this stage's soft deadline (GPU_CHECK_DEADLINE, epoch seconds, set by
    gpu_check.sh a few seconds before the stage's hard limit); inf when unset."""
    deadline = os.environ.get("GPU_CHECK_DEADLINE")
    return float(deadline) - time.time() if deadline else float("inf")


def guarded(res: Results, fn, *args, margin: float = 3.0) -> None:
    """fn(res, *args), one case of a stage: SKIPPED when the stage's soft deadline is (almost)
    reached, so a stage ends with its rows instead of being killed; Refused -> a REFUSED row,
    another exception a FAIL row (the other cases still run)."""
    name = f"{fn.__name__}{args}"
    if time_left() < margin:
        res.skipped(name, "no time left in this stage's limit (GPU_CHECK_DEADLINE)")
        return
    try:
        fn(res, *args)
    except Refused as e:
        res.row(name, "REFUSED", error=str(e)[:300])
    except Exception as e:  # noqa: BLE001 (one failing case must not hide the others)
        res.row(name, "FAIL", error=f"{type(e).__name__}: {str(e)[:300]}")


def dry_run() -> bool:
    """GPU_CHECK_CPU_DRYRUN=1 without CUDA: the CUDA stages run their code once on tiny CPU inputs
    (the Triton kernels interpreted), rows marked DRYRUN, so the code is exercised here. Not timings."""
    return not CUDA and os.environ.get("GPU_CHECK_CPU_DRYRUN") == "1"
