"""Keep the weights (issue #26 item 2): a dense fc (LeNet-300-100, width 1) trained on Fashion-MNIST,
moved to a new task, one fixed pixel permutation of Fashion-MNIST (seed 1; the task family of the
mask-bank check in adapters.md). Compared on the new task, each from the same pretrained network:

- mask, threshold style (Piggyback / Zhao et al.): ``convert(weights="keep", mask="threshold")``,
  threshold 5e-3, scores at 1e-2 (the full pretrained network at the start), Adam on the scores at
  lr 1e-4 (Piggyback's optimiser and rate) and at 1e-3; and at 1e-3 with the last layer left dense
  and trained with the masks (Piggyback's protocol: a new classifier per task; its fp32 weights
  then count in the bytes per task);
- mask, top-k (edge-popup over the kept weights): ``convert(weights="keep", k=0.5,
  score_init="magnitude")`` (starts as 50% magnitude pruning), SGD lr 0.1 momentum 0.9 (edge-popup's);
- full fine-tuning: every weight, SGD lr 0.05 momentum 0.9;
- linear probe: the last layer only, SGD lr 0.1 momentum 0.9;
- no training: the pretrained network as it is.

Every run: batch 128, cosine schedule, the same epochs and sample order. Bytes per task: what a
task adds to the shared pretrained network: a mask at 1 bit per masked weight
(``supermask.compact.pack_bits``, the compact format's packing: ceil(n / 8) bytes per layer);
fine-tuning every weight in fp32; the probe its layer in fp32. The masked models are checked
against their baked copies (``supermask.baking.bake``: plain nn.Linear holding weight * mask):
equal outputs on the test set.

Writes OUT/table.md and OUT/results.json. Made docs/keep_weights/:
``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python docs/keep_weights.py --dataset fashion-mnist
--data-dir /usr/share/datasets --epochs 3 --threads 1 --out docs/keep_weights``
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import supermask as sm
from supermask import data, models
from supermask.baking import bake
from supermask.compact import pack_bits
from supermask.init import init_dense_
from supermask.threads import apply_threads, cpu_model

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist"))
p.add_argument("--data-dir", default="/usr/share/datasets")
p.add_argument("--epochs", type=int, default=3, help="epochs of pretraining and of each method on the new task")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--out", type=Path, required=True)
args = p.parse_args()
if args.out.exists() and any(args.out.iterdir()):
    raise SystemExit(f"--out {args.out} is not empty: give a fresh folder")
apply_threads(args.threads)
BATCH = 128
ds = data.load(args.dataset, args.data_dir, val_size=10000, download=False)
xtr, ytr, xte, yte = ds.train_x.flatten(1), ds.train_y, ds.test_x.flatten(1), ds.test_y
perm = torch.randperm(784, generator=torch.Generator().manual_seed(1))


def train(model, params, opt, task_perm, seed):
    """args.epochs epochs on (xtr permuted by task_perm), batch 128, cosine schedule over every step."""
    steps = args.epochs * (len(ytr) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in range(args.epochs):
        order = data.epoch_order(len(ytr), seed, epoch)
        for i in range(0, len(ytr) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx][:, task_perm]), ytr[idx]).backward()
            opt.step()
            sched.step()


@torch.no_grad()
def outputs(model, task_perm):
    model.eval()
    return torch.cat([model(xte[i:i + 1000][:, task_perm]) for i in range(0, len(yte), 1000)])


def accuracy(model, task_perm) -> float:
    return (outputs(model, task_perm).argmax(1) == yte).float().mean().item()


def trained(params) -> int:
    return sum(q.numel() for q in params)


t0 = time.time()
base = models.fc((1, 28, 28), 10, 1.0)
init_dense_(base, "kaiming_normal", 0)
train(base, base.parameters(), torch.optim.SGD(base.parameters(), lr=0.1, momentum=0.9), torch.arange(784), 0)
source_acc = accuracy(base, torch.arange(784))
print(f"pretrained on {args.dataset}: test acc {source_acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
n_weights = sum(q.numel() for q in base.parameters())
rows = [dict(method="no training (pretrained as is)", acc=accuracy(base, perm), trained=0, bytes=0)]


def run_mask(name, opt_fn, head=False, **kw):
    """Mask-only training of a copy of base (head: the last layer left dense and trained too,
    Piggyback's protocol of a new classifier per task)."""
    t = time.time()
    model = sm.convert(base, strict=True, weights="keep", skip=("5",) if head else (), **kw)
    params = [q for q in model.parameters() if q.requires_grad]  # the scores (and the head)
    train(model, params, opt_fn(params), perm, 1)
    acc = accuracy(model, perm)
    baked = bake(model)
    assert torch.equal(outputs(baked, perm), outputs(model, perm)), "baked outputs differ"
    masks = [layer.mask() for _, layer in sm.supermask_layers(model)]
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    nbytes = sum(pack_bits(m).numel() for m in masks) + (4 * model[5].weight.numel() if head else 0)
    rows.append(dict(method=name, acc=acc, trained=trained(params), bytes=nbytes, kept=kept))
    print(f"{name}: test acc {acc:.4f}, kept {kept:.3f} ({time.time() - t:.0f} s)", flush=True)


run_mask("mask, threshold (Piggyback), Adam lr 1e-4", lambda ps: torch.optim.Adam(ps, lr=1e-4), mask="threshold")
run_mask("mask, threshold, Adam lr 1e-3", lambda ps: torch.optim.Adam(ps, lr=1e-3), mask="threshold")
run_mask("mask, threshold, Adam lr 1e-3, + last layer trained dense", lambda ps: torch.optim.Adam(ps, lr=1e-3),
         head=True, mask="threshold")
run_mask("mask, top-k k=0.5 (edge-popup) from magnitudes, SGD lr 0.1",
         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), k=0.5, score_init="magnitude")

t = time.time()
ft = models.fc((1, 28, 28), 10, 1.0)
ft.load_state_dict(base.state_dict())
train(ft, ft.parameters(), torch.optim.SGD(ft.parameters(), lr=0.05, momentum=0.9), perm, 1)
rows.append(dict(method="full fine-tuning", acc=accuracy(ft, perm), trained=n_weights, bytes=4 * n_weights))
print(f"fine-tuning: test acc {rows[-1]['acc']:.4f} ({time.time() - t:.0f} s)", flush=True)

t = time.time()
probe = models.fc((1, 28, 28), 10, 1.0)
probe.load_state_dict(base.state_dict())
last = list(probe.parameters())[-1]
for q in probe.parameters():
    q.requires_grad_(q is last)
train(probe, [last], torch.optim.SGD([last], lr=0.1, momentum=0.9), perm, 1)
rows.append(dict(method="linear probe (last layer)", acc=accuracy(probe, perm), trained=last.numel(),
                 bytes=4 * last.numel()))
print(f"probe: test acc {rows[-1]['acc']:.4f} ({time.time() - t:.0f} s)", flush=True)

minutes = (time.time() - t0) / 60
lines = [f"Fashion-MNIST -> permuted Fashion-MNIST (one fixed pixel permutation, seed 1), LeNet-300-100 "
         f"({n_weights:,} weights) pretrained {args.epochs} epochs on {args.dataset} (test acc "
         f"{100 * source_acc:.2f}%), each method {args.epochs} epochs on the new task; {minutes:.1f} min on "
         f"{cpu_model()} ({torch.get_num_threads()} thread).", "",
         "| method | test acc (new task) | trained parameters | bytes per task |", "|---|---:|---:|---:|"]
for r in rows:
    extra = f" ({100 * r['kept']:.1f}% kept)" if "kept" in r else ""
    lines.append(f"| {r['method']}{extra} | {100 * r['acc']:.2f}% | {r['trained']:,} | {r['bytes']:,} |")
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "table.md").write_text("\n".join(lines) + "\n")
(args.out / "results.json").write_text(json.dumps(
    dict(dataset=args.dataset, new_task="permuted (seed 1)", epochs=args.epochs, source_test_acc=source_acc,
         weights=n_weights, minutes=round(minutes, 2), cpu=cpu_model(), threads=torch.get_num_threads(),
         rows=rows), indent=1) + "\n")
print("\n".join(lines))
