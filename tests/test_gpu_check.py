"""The one-call GPU check (benchmarks/gpu_check.sh) on this CPU-only machine: the preflight refuses
when the Triton path is not the one taken, the guard refuses to time the reference as "fused",
bad arguments are refused, and the whole check runs end to end (SKIPPED for every CUDA part),
writing its rows as it goes (a kill half-way leaves them readable)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check_common as C  # noqa: E402

from supermask import ops  # noqa: E402

# The launched kernels of supermask.kernels (what the AOT test compiles), for the introspection test.
KERNELS = {"_masked_matmul_kernel", "_matmul_ste_kernel", "_radix_histogram_kernel", "_radix_scan_kernel",
           "_masked_weight_kernel", "_ste_grad_kernel", "_warm_plan_kernel", "_warm_gather_kernel",
           "_warm_select_kernel", "_tie_count_kernel", "_cold_finish_kernel"}


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("GPU_CHECK_CPU_DRYRUN", None)
    return env


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_kernel_names_found_by_introspection():
    assert C.kernel_names() == KERNELS  # the @triton.jit helpers (sign_of, keep_of, ...) left out


def test_guard_refuses_the_reference_timed_as_fused():
    x, w, s = torch.randn(5, 19), torch.randn(7, 19), torch.randn(7, 19, requires_grad=True)

    def reference():
        ops.masked_linear(x, w, s, 40, -1, "reference").sum().backward()

    def fused():
        ops.masked_linear(x, w, s, 40, -1, "triton").sum().backward()
    with pytest.raises(C.Refused, match="refusing to time or check it as the fused path"):
        C.require_triton(reference, "reference as fused")
    seen = C.require_triton(fused, "fused")
    assert {"_masked_matmul_kernel", "_matmul_ste_kernel", "_radix_histogram_kernel"} <= set(seen)
    with pytest.raises(C.Refused, match="baseline launched"):
        C.require_no_triton(fused, "fused as baseline")


def test_preflight_refuses_when_the_triton_path_is_not_taken(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--stage", "preflight",
                        "--out", str(tmp_path), "--backend", "torch"], env=_env(), check=False, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 3, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "preflight REFUSED" in lines[0] and "backend torch" in lines[0], r.stderr
    assert [row["status"] for row in _rows(tmp_path)][-1] == "REFUSED"


# (arguments, message on the one stderr line): refused with exit 2, nothing run.
BAD_ARGS = [
    ([], "--out DIR is required"),
    (["--out"], "--out needs a folder"),
    (["--out", "{tmp}", "--budget", "ten"], "--budget must be whole seconds"),
    (["--out", "{tmp}", "--quick"], "unknown argument '--quick'"),
    (["--out", "{full}"], "already holds results"),
]


@pytest.mark.parametrize("args,message", BAD_ARGS)
def test_bad_arguments_refused(tmp_path, args, message):
    full = tmp_path / "full"
    full.mkdir()
    (full / "results.jsonl").write_text('{"stage": "env"}\n')
    args = [a.format(tmp=tmp_path / "new", full=full) for a in args]
    r = subprocess.run(["bash", str(SCRIPT), *args], env=_env(), check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert (full / "results.jsonl").read_text() == '{"stage": "env"}\n'  # nothing overwritten
    assert not (tmp_path / "new" / "results.jsonl").exists()


def test_killed_half_way_keeps_the_finished_rows(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen(["bash", str(SCRIPT), "--out", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            jl = out / "results.jsonl"
            if jl.exists() and sum(1 for line in jl.read_text().splitlines() if '"preflight"' in line) >= 2:
                break
            time.sleep(0.5)
        os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    rows = _rows(out)  # every line parses
    assert rows[0]["stage"] == "env" and sum(r["stage"] == "preflight" for r in rows) >= 2
    assert "stopped by a signal" in err
    md = (out / "results.md").read_text()
    assert "versions" in md and "kernels found by introspection" in md
    assert not (out / "summary.md").exists()


@pytest.mark.slow
def test_whole_check_on_a_cpu_machine(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], env=_env(), check=False, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8 and set(files) <= set(C.FILES), files
    rows = _rows(out)
    assert rows, "no rows"
    by_stage = {}
    for row in rows:
        by_stage.setdefault(row["stage"], []).append(row)
        assert row["status"] in ("ok", "SKIPPED"), row
    for stage in ("sanitizer", "kernels", "threshold", "train"):
        assert [x["status"] for x in by_stage[stage]] == ["SKIPPED"], stage
        assert "no CUDA device" in by_stage[stage][0]["why"]
    assert any(x["status"] == "SKIPPED" and "no CUDA device" in x["why"] for x in by_stage["correctness"])
    assert sum(x["status"] == "ok" and x["case"].startswith("linear") for x in by_stage["correctness"]) >= 6
    assert any(x["case"] == "reference timed as fused is refused" for x in by_stage["preflight"])
    assert "SKIPPED" in r.stdout and "0 rows FAIL" in (out / "summary.md").read_text()


def test_summary_suggests_the_per_shape_choice(tmp_path):
    """The summary stage reads the rows (a torn last line left out) and prints LINEAR_CHOICE lines."""
    rows = [{"stage": "kernels", "case": "128x750x784 bf16 fixed config", "status": "ok", "fused_ms": 0.05,
             "cublas_ms": 0.08, "suggest": "fused", "key": "(128, 750, 784, torch.bfloat16)"},
            {"stage": "kernels", "case": "4096x4096x4096 bf16 fixed config", "status": "ok", "fused_ms": 0.9,
             "cublas_ms": 0.7, "suggest": "cublas", "key": "(4096, 4096, 4096, torch.bfloat16)"},
            {"stage": "train", "case": "fc", "status": "FAIL", "error": "boom"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "tra')
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--stage", "summary", "--out",
                        str(tmp_path)], env=_env(), check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "LINEAR_CHOICE[(128, 750, 784, torch.bfloat16)] = 'fused'" in text
    assert "LINEAR_CHOICE[(4096, 4096, 4096, torch.bfloat16)] = 'cublas'" in text
    assert "1 rows FAIL / REFUSED / TIMEOUT" in text and "train: fc: FAIL boom" in text


@pytest.mark.slow
def test_cuda_stages_code_runs_as_a_cpu_dry_run(tmp_path):
    """GPU_CHECK_CPU_DRYRUN=1: the timing stages' code (variants, guards, profiler counts, rows) runs
    once on tiny CPU inputs with the kernels interpreted, so it is exercised before a GPU is lent."""
    env = dict(_env(), GPU_CHECK_CPU_DRYRUN="1")
    for stage in ("kernels", "threshold", "train"):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--stage", stage, "--out",
                            str(tmp_path)], env=env, check=False, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = _rows(tmp_path)
    assert {r["stage"] for r in rows} == {"kernels", "threshold", "train"}
    assert all(r["status"] == "DRYRUN" for r in rows), rows
    assert [r["case"] for r in rows if r["stage"] == "train"] == ["fc x0.1 eager dense", "fc x0.1 eager supermask"]
