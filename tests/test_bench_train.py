"""benchmarks/bench_train.py end to end on a few hundred images: every way trains, and the
ratios, the thresholds' statistics and the selection rows land in its JSON and Markdown files."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from supermask import cpu_kernels

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model, width", [("fc", 0.5), ("conv2", 0.25)])
def test_bench_train_runs_every_way_and_writes_its_results(tmp_path, model, width):
    bench, threads = load_bench(), torch.get_num_threads()
    try:
        # the compiled ways (torch.compile takes a minute per model here) for fc only
        bench.main(["--model", model, "--width", str(width), "--limit", "512", "--repeats", "2", "--warmup-steps", "2",
                    "--select-sizes", "1000,20000", "--threads", "1", "--out-dir", str(tmp_path)]
                   + (["--no-compiled"] if model != "fc" else []))
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / f"train_{model}.json").read_text())["results"]
    fast = ["dense", "supermask", "floor"] + (["cpu"] if cpu_kernels.available() else [])
    fast += ["dense_compiled", "compiled"] if model == "fc" else []
    for way in fast + ["sort", "kthvalue"]:
        row = rows[way]
        assert len(row["epoch_s"]) == (2 if way in fast else 1), way  # 2 rounds; the slow ways once
        assert row["ratio_to_dense"] > 0 and math.isfinite(row["final_loss"]), way
    assert rows["dense"]["paired_ratios"] == [1.0, 1.0]
    layers = rows["supermask"]["warm_start"]
    assert layers and all(st["cold"] >= 1 for st in layers.values())  # each layer's first step is cold
    if cpu_kernels.available():  # the one pass answered the later steps of every layer (12 steps, 1 cold)
        assert all(st["fused"] >= 8 for st in rows["cpu"]["warm_start"].values())
    if model == "fc":
        assert rows["compiled"]["ratio_to_dense_compiled"] > 0
        assert "Compiled supermask vs compiled dense" in (tmp_path / "train_fc.md").read_text()
    else:
        assert "compiled" not in rows
    sel = json.loads((tmp_path / "select_cpu.json").read_text())["results"]
    assert [r["n"] for r in sel] == [1000, 20000]
    assert all(r["speedup_vs_kthvalue"]["torch.kthvalue"] == 1.0 for r in sel)
    md = (tmp_path / f"train_{model}.md").read_text()
    assert md.startswith(f"## Training speed: {model}, width {width}") and "| 20,000 |" in md
