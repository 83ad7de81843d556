"""MaskBank on permuted Fashion-MNIST (a quick check, not the issue's full benchmark): one random fc
784-300-300-10 (k=0.5, signed constant, seed 0), T tasks (task 0: identity pixels; task t: one fixed
permutation by seed t), each trained 2 epochs (50k images, batch 128, SGD lr 0.1 momentum 0.9 cosine)
on its own scores only. Prints each task's test accuracy right after it trains and again after all
tasks, and the bytes per task. Made the figure in docs/adapters.md:
`OMP_NUM_THREADS=1 python docs/permuted_fashion_mnist_bank.py 20` (Debian's dataset-fashion-mnist)."""
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import supermask as sm
from supermask import data
from supermask.bank import MaskBank

T = int(sys.argv[1]) if len(sys.argv) > 1 else 3
EPOCHS = 2
ds = data.load("fashion-mnist", "/usr/share/datasets", val_size=10000, download=False)
xtr, ytr = ds.train_x.flatten(1), ds.train_y
xte, yte = ds.test_x.flatten(1), ds.test_y
perms = [torch.arange(784)] + [torch.randperm(784, generator=torch.Generator().manual_seed(t)) for t in range(1, T)]
model = sm.convert(nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(),
                                 nn.Linear(300, 10)), k=0.5, seed=0, strict=True)
bank = MaskBank(model, T, seed=0)


@torch.no_grad()
def acc(t):
    bank.set_task(t)
    bank.eval()
    return (bank(xte[:, perms[t]]).argmax(1) == yte).float().mean().item()


first, t0 = [], time.time()
for t in range(T):
    bank.set_task(t)
    bank.train()
    opt = torch.optim.SGD(bank.task_parameters(t), lr=0.1, momentum=0.9)
    steps = EPOCHS * (len(ytr) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(100 + t)
    for _ in range(EPOCHS):
        order = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr) - 127, 128):
            idx = order[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(bank(xtr[idx][:, perms[t]]), ytr[idx]).backward()
            opt.step()
            sched.step()
    first.append(acc(t))
    print(f"task {t}: test acc {first[-1]:.4f} ({time.time() - t0:.0f} s)", flush=True)
final = [acc(t) for t in range(T)]
print("after all tasks:", " ".join(f"{a:.4f}" for a in final))
print("identical to right after training:", final == first)
print("bytes per task:", sum(v.numel() for v in bank.pack_task(0).values()),
      "(weights:", sum(m.weight.numel() for _, m in sm.supermask_layers(model)), ")")
