"""Input pipeline: in-memory tensor slicing (what supermask.data does) vs torchvision's per-sample
PIL transforms through a DataLoader, for one pass over Fashion-MNIST's training set (batch 128).

    python benchmarks/bench_data.py [--threads 2] [--workers 0 2]

Only the data pipeline is timed (no model). Writes benchmarks/results/data.json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from supermask import data as data_mod

RESULTS = Path(__file__).parent / "results"


def torchvision_pass(root: Path, workers: int, batch_size: int) -> float:
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    ds = torchvision.datasets.FashionMNIST(str(root), train=True, transform=tf, download=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)
    start = time.perf_counter()
    for xb, yb in loader:
        pass
    return time.perf_counter() - start


def in_memory_pass(ds: data_mod.Dataset, batch_size: int) -> float:
    start = time.perf_counter()
    order = data_mod.epoch_order(len(ds.train_y), 0, 0)
    for xb, yb in data_mod.batches(ds.train_x, ds.train_y, batch_size, order):
        pass
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    source = data_mod.DEBIAN_FASHION_MNIST
    if not data_mod._find_idx(source):
        raise SystemExit(f"needs Fashion-MNIST in {source} (apt-get install dataset-fashion-mnist)")
    ds = data_mod.load("fashion-mnist", val_size=0)
    rows = {"in-memory slices": in_memory_pass(ds, args.batch_size)}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in source.glob("*.gz"):  # torchvision wants the files unpacked
            with gzip.open(f) as src, open(raw / f.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
        for w in args.workers:
            rows[f"torchvision + PIL transforms, {w} workers"] = torchvision_pass(Path(tmp), w, args.batch_size)
    base = rows["in-memory slices"]
    print(f"one pass over {len(ds.train_y)} training images, batch {args.batch_size}, {args.threads} threads")
    for name, sec in rows.items():
        print(f"  {name:42s} {sec:7.3f} s   {sec / base:7.1f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps({
        "command": "python benchmarks/bench_data.py", "threads": args.threads, "batch_size": args.batch_size,
        "machine": platform.processor() or platform.machine(), "seconds": rows,
        "ratio_to_in_memory": {k: v / base for k, v in rows.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
