"""Ahead-of-time builds for real GPUs, on a machine without one (python -m supermask.kernels.aot).

Default run: one configuration per kernel for sm_80 and sm_90 (~30 s). With --slow: every kernel
in every autotune configuration and dtype, both archs (several minutes on 2 cores).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supermask.kernels.aot import _jobs

MATMULS = {"_masked_matmul_kernel", "_matmul_ste_kernel"}
ALL = MATMULS | {"_radix_histogram_kernel", "_radix_scan_kernel", "_masked_weight_kernel", "_ste_grad_kernel"}


def _aot(tmp_path, *args):
    out = tmp_path / "aot.json"
    env = dict(os.environ)  # TRITON_INTERPRET stays: the module must drop it for its own process
    r = subprocess.run([sys.executable, "-m", "supermask.kernels.aot", *args, "--workers", "2", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def _check(builds, expected_jobs):
    assert len(builds) == len(expected_jobs)
    assert {b["kernel"] for b in builds} == ALL
    for b in builds:
        where = f"{b['kernel']}/{b['variant']}/{b['dtype']}/{b['arch']}/{b['config']}"
        assert b["ok"], f"{where}: {b.get('error')}"
        assert b["cubin_bytes"] > 0 and b["registers"] is not None and b["spill_stores"] is not None, where
        assert 0 < b["registers"] <= 255, where
        if b["kernel"] in MATMULS:
            if b["arch"] == "sm_80":
                assert b["mma_sync"] > 0, f"{where}: no mma.sync in the PTX"
            elif b["num_warps"] >= 4:  # wgmma needs a whole warp group
                assert b["wgmma"] > 0, f"{where}: no wgmma in the PTX"
            else:
                assert b["mma_sync"] + b["wgmma"] > 0, f"{where}: no tensor-core instruction"
    for arch in ("sm_80", "sm_90"):
        assert {b["kernel"] for b in builds if b["arch"] == arch} == ALL


def test_aot_quick_all_kernels_compile_with_tensor_cores(tmp_path):
    data = _aot(tmp_path, "--quick")
    _check(data["builds"], _jobs(quick=True))


@pytest.mark.slow
def test_aot_full_sweep(tmp_path):
    data = _aot(tmp_path)
    _check(data["builds"], _jobs(quick=False))


def test_committed_aot_results_cover_every_config():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "kernels_aot.json"
    data = json.loads(path.read_text())
    got = {(b["kernel"], b["variant"], b["dtype"], b["arch"], json.dumps(b["config"], sort_keys=True),
            b["num_warps"], b["num_stages"]) for b in data["builds"]}
    want = {(n, v, d, f"sm_{a}", json.dumps(c[0], sort_keys=True), c[1], c[2]) for n, v, d, c, a in _jobs(quick=False)}
    assert want <= got, f"results miss {len(want - got)} builds: rerun python -m supermask.kernels.aot"
    _check([b for b in data["builds"]], _jobs(quick=False))


# (arguments, what must hold): without --out the module refuses (one line on stderr, exit 2) and
# writes nothing, into the source tree least of all.
BAD_AOT_ARGS = [
    (["--quick"], "--out PATH is required"),
    ([], "--out PATH is required"),
]


@pytest.mark.parametrize("args,message", BAD_AOT_ARGS)
def test_aot_writes_only_where_told(tmp_path, args, message):
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    r = subprocess.run([sys.executable, "-m", "supermask.kernels.aot", *args], check=False, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before
    assert list(tmp_path.iterdir()) == []
