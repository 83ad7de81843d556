"""Supermask training speed vs dense training, on the CPU reference path (and Triton when CUDA is there).

One process trains the same network (--model: by default LeNet-300-100 x width, 784 -> 300w ->
100w -> 10; or Conv-2/4/6/8 of supermask.models; no biases, ReLU) for one epoch (after a warm-up)
these ways:

  dense        plain nn.Linear / nn.Conv2d training (the baseline; ratios are to this)
  sort         GetSubnet as in the official hidden-networks code (SubnetLinear / SubnetConv):
               |scores| sorted every step, an autograd.Function returns the 0/1 mask, weight * mask
  kthvalue     the README's faster GetSubnet: torch.kthvalue instead of the sort
  supermask    this library's reference path (supermask.convert, then
               supermask.set_backend(model, "torch")): exact top-k without sorting, warm-started from
               the previous step's threshold
  cpu          this library's default on a CPU: the supermask custom ops' CPU implementation, the
               fused C kernels (C compiled on first use): the same masks and gradients, one pass
               forward (selection included), one backward
  compiled     torch.compile(model) of the cpu way (the ops stay opaque kernels in the graph;
               inductor fuses the rest); its ratio is to dense_compiled, torch.compile of the dense
               model. Compilation happens in the warm-up, untimed (--no-compiled: skip both)
  floor        not a method: a lower bound. The per-step work every exact eager supermask path
               has to do beyond dense training (|s| and a compare into a 0/1 mask, weight * mask,
               the straight-through gradient g * w * sign(s)) with the top-k selection removed:
               the threshold is fixed at the first step's median. Its ratio to dense is the best
               any eager (unfused) reference path can reach on this machine
  triton       the supermask model on CUDA (the ops pick the Triton kernels), only when
               torch.cuda.is_available()

dense, cpu, supermask, floor, dense_compiled and compiled are timed in --repeats rounds; within a round their epochs run
interleaved, --chunk-steps steps at a time, and each epoch's ratio is to the dense epoch run beside
it (the headline is the median over the rounds). The slow ways run once, alone.

SGD lr 0.1, momentum 0.9, weight decay 1e-4 everywhere. Data: Fashion-MNIST from
/usr/share/datasets/fashion-mnist when present (IDX files read by supermask.data.read_idx), else
synthetic data of the same shape; kept in memory as tensors and sliced into batches.

Then a selection micro-benchmark: the k-th largest (k = n/2) of n random values, this library's
kth_largest (cold), warm-started layer threshold (reference path) and the CPU kernels' one pass
(threshold and masked weight together, updated in place) vs torch.sort, torch.kthvalue, torch.topk.

    python benchmarks/bench_train.py                  # defaults: fc, width 2.5, k 0.5, 2 threads
    python benchmarks/bench_train.py --skip-slow      # no sort / kthvalue GetSubnet epochs

Prints tables and writes benchmarks/results/train_<model>.json and .md and select_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import supermask  # noqa: E402
from supermask.data import read_idx  # noqa: E402
from supermask.mask import TopKWarmStart, num_kept, warm_topk_threshold  # noqa: E402
from supermask import cpu_kernels, ops  # noqa: E402
from supermask.models import build as build_model  # noqa: E402
from supermask.select import kth_largest  # noqa: E402
from supermask.threads import cpu_model  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
INPUT_SHAPE = (1, 28, 28)
BENCH_MODELS = ("fc", "conv2", "conv4", "conv6", "conv8")  # the flat ones of supermask.models
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_data() -> tuple[torch.Tensor, torch.Tensor, str]:
    images, labels = FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz"
    if images.exists() and labels.exists():
        x = read_idx(images).unsqueeze(1).float().div_(255.0)
        x = (x - 0.2860) / 0.3530
        return x, read_idx(labels).long(), "fashion-mnist"
    g = torch.Generator().manual_seed(0)
    return torch.randn(60000, 1, 28, 28, generator=g), torch.randint(0, 10, (60000,), generator=g), "synthetic"


# ---------------------------------------------------------------------------------------------
# Models: dense, the official GetSubnet (sort / kthvalue), this library
# ---------------------------------------------------------------------------------------------
class GetSubnetSort(torch.autograd.Function):
    """hidden-networks' GetSubnet: sort the scores, zero the bottom (1 - k), one the top k."""

    @staticmethod
    def forward(ctx, scores, k):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat_out = out.flatten()
        flat_out[idx[:j]] = 0
        flat_out[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


class GetSubnetKth(torch.autograd.Function):
    """The README's faster variant: one torch.kthvalue instead of the sort."""

    @staticmethod
    def forward(ctx, scores, k):
        j = int((1 - k) * scores.numel())
        if j < 1:
            return torch.ones_like(scores)
        thr = torch.kthvalue(scores.flatten(), j).values
        return (scores > thr).to(scores.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


class Subnet(nn.Module):
    """hidden-networks' SubnetLinear / SubnetConv around a bias-free nn.Linear or nn.Conv2d: the
    weight frozen (Kaiming normal), scores learned, weight * GetSubnet(|scores|) every step."""

    def __init__(self, layer: nn.Module, k: float, fn):
        super().__init__()
        self.layer, self.k, self.fn = layer, k, fn
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        layer.weight.requires_grad_(False)
        self.scores = nn.Parameter(torch.empty_like(layer.weight))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))

    def masked_weight(self):
        return self.layer.weight * self.fn.apply(self.scores.abs(), self.k)

    def forward(self, x):
        w = self.masked_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, None)
        return F.linear(x, w)


def with_layers(model: nn.Sequential, make) -> nn.Sequential:
    """model with every Linear and Conv2d replaced by make(layer) (the models here are flat)."""
    return nn.Sequential(*[make(m) if isinstance(m, (nn.Linear, nn.Conv2d)) else m for m in model])


class FloorMask(torch.autograd.Function):
    """The fewest eager passes a masked weight and its straight-through gradient take: abs and a
    compare into a reused buffer, one multiply; sign and two multiplies in backward."""

    @staticmethod
    def forward(ctx, weight, scores, threshold, buffers):
        ctx.save_for_backward(weight, scores)
        ctx.sign_buffer = buffers[1]
        mask = torch.abs(scores, out=buffers[0])
        torch.ge(mask, threshold, out=mask)
        return mask.mul_(weight)

    @staticmethod
    def backward(ctx, g):
        weight, scores = ctx.saved_tensors
        sign = torch.sign(scores, out=ctx.sign_buffer)
        return None, torch.mul(g, weight).mul_(sign), None, None


class Floor(Subnet):
    """Subnet with FloorMask: a fixed threshold (the initial median of |scores|), so no selection
    at all. Only for timing: its mask stops being a top-k mask once scores move."""

    def __init__(self, layer: nn.Module, k: float):
        super().__init__(layer, k, None)
        self.threshold = float(kth_largest(self.scores.detach().abs(), num_kept(self.scores.numel(), k)))
        self.buffers = [torch.empty_like(self.scores), torch.empty_like(self.scores)]

    def masked_weight(self):
        return FloorMask.apply(self.layer.weight, self.scores, self.threshold, self.buffers)


# The backend each way's supermask layers run (supermask.set_backend; the others keep "auto").
BACKEND = {"supermask": "torch"}


def build(method: str, model: str, width: float, k: float) -> nn.Module:
    torch.manual_seed(0)
    dense = build_model(model, INPUT_SHAPE, 10, width)
    if method == "dense":
        return dense
    if method == "dense_compiled":
        return torch.compile(dense)
    if method == "compiled":
        return torch.compile(supermask.convert(dense, k))
    if method in ("sort", "kthvalue"):
        return with_layers(dense, lambda m: Subnet(m, k, GetSubnetSort if method == "sort" else GetSubnetKth))
    if method == "floor":
        return with_layers(dense, lambda m: Floor(m, k))
    model = supermask.convert(dense, k)
    if method in BACKEND:
        supermask.set_backend(model, BACKEND[method])
    if method == "triton":
        model = model.cuda()
    return model


# ---------------------------------------------------------------------------------------------
# Training timing
# ---------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class EpochRun:
    """One way's training (model, SGD, data), an epoch at a time, run a chunk of steps per call so
    that the ways' epochs can be interleaved. `seconds`: the time of the epoch's steps so far."""

    def __init__(self, model, x, y, batch_size, device):
        self.model, self.device, self.batch_size = model, device, batch_size
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.x, self.y = x.to(device), y.to(device)
        self.steps = (self.x.shape[0] + batch_size - 1) // batch_size
        self.i, self.seconds, self.loss = self.steps, 0.0, float("nan")

    def _step(self, i):
        b = self.batch_size
        loss = F.cross_entropy(self.model(self.x[i * b:(i + 1) * b]), self.y[i * b:(i + 1) * b])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def warm_up(self, steps):
        self.model.train()
        for i in range(steps):
            self._step(i % self.steps)
        # the last, smaller batch too: a compiled model compiles its shape here, not in a timed epoch
        self._step(self.steps - 1)
        sync(self.device)

    def new_epoch(self):
        self.i, self.seconds = 0, 0.0

    @property
    def done(self):
        return self.i >= self.steps

    def run(self, count):
        if self.done:  # (a way whose epoch ended before the others': nothing to time)
            return
        t0 = time.perf_counter()
        for _ in range(min(count, self.steps - self.i)):
            loss = self._step(self.i)
            self.i += 1
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        if self.done:
            self.loss = float(loss.detach())


def run_epochs(runs: dict, warmup_steps, epochs, chunk_steps):
    """Epoch times {way: [seconds, ...]} of the runs, their epochs interleaved chunk by chunk."""
    for run in runs.values():
        run.warm_up(warmup_steps)
    times = {name: [] for name in runs}
    for _ in range(epochs):
        for run in runs.values():
            run.new_epoch()
        while not all(run.done for run in runs.values()):
            for run in runs.values():
                run.run(chunk_steps)
        for name, run in runs.items():
            times[name].append(run.seconds)
    return times


def bench_training(args, x, y):
    fast = ["dense", "cpu", "supermask", "floor"]  # timed in every round; the others once
    if not args.no_compiled:
        fast += ["dense_compiled", "compiled"]
    slow = [] if args.skip_slow else ["kthvalue", "sort"]
    if torch.cuda.is_available():
        slow.append("triton")
    # Each round trains the fast ways for an epoch each, interleaved in chunks of a few steps
    # (dense 20 steps, cpu 20 steps, supermask 20 steps, floor 20 steps, dense 20 steps, ...), so
    # each epoch is spread over the same seconds as the dense one it is compared with. Each epoch
    # is divided by the dense epoch of its round (the slow ways, timed alone in the first round,
    # by that round's), and the median of these paired ratios is the headline: on a shared VM
    # whose speed drifts by tens of percent between minutes, ratios of epochs run side by side
    # are steadier than best against best.
    models = {}
    rows: dict[str, dict] = {}

    def fail(method, e, what):
        rows[method] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{method:10s} {what}: {rows[method]['error']}", flush=True)

    for method in fast + slow:
        try:
            models[method] = build(method, args.model, args.width, args.k)
        except Exception as e:  # noqa: BLE001 (e.g. Triton kernels not available: the row says why)
            fail(method, e, "skipped")

    def device(method):
        return torch.device("cuda" if method == "triton" else "cpu")

    def record(method, times, loss):
        row = rows.setdefault(method, {"epoch_s": [], "device": str(device(method))})
        row["epoch_s"] += times
        row["final_loss"] = loss
        print(f"{method:10s} epoch {min(times):7.3f} s  (loss {loss:.3f})", flush=True)

    def start(method):
        return EpochRun(models[method], x, y, args.batch_size, device(method))

    for r in range(args.repeats):
        runs = {m: start(m) for m in fast if m in models}
        times = run_epochs(runs, args.warmup_steps, args.epochs_measured, args.chunk_steps)
        for method, run in runs.items():
            record(method, times[method], run.loss)
        if r == 0:
            for method in slow:
                if method not in models:
                    continue
                try:
                    run = start(method)
                    epochs = run_epochs({method: run}, args.warmup_steps, args.epochs_measured, run.steps)
                    record(method, epochs[method], run.loss)
                except Exception as e:  # noqa: BLE001 (a slow method that fails is a row saying why)
                    fail(method, e, "failed")
    if "error" in rows["dense"]:
        raise SystemExit(f"bench_train.py: the dense baseline failed: {rows['dense']['error']}")
    dense = rows["dense"]["epoch_s"]
    for method, row in rows.items():
        if "epoch_s" in row:
            row["best_epoch_s"] = min(row["epoch_s"])
            row["paired_ratios"] = [t / d for t, d in zip(row["epoch_s"], dense)]
            row["ratio_to_dense"] = statistics.median(row["paired_ratios"])
    if "epoch_s" in rows.get("compiled", {}) and "epoch_s" in rows.get("dense_compiled", {}):
        row = rows["compiled"]
        row["paired_ratios_compiled"] = [t / d for t, d in zip(row["epoch_s"], rows["dense_compiled"]["epoch_s"])]
        row["ratio_to_dense_compiled"] = statistics.median(row["paired_ratios_compiled"])
    for method in ("supermask", "cpu", "compiled"):
        if method not in models or "epoch_s" not in rows.get(method, {}):
            continue
        stats = {}
        for name, layer in supermask.supermask_layers(models[method]):
            st = ops.get_state(layer._state.id)
            if st.key is not None:
                stats[name] = {"numel": layer.scores.numel(), "fused": st.fused, "candidates": st.guessed,
                               "band": st.warm, "widened": st.widened, "cold": st.cold}
        rows[method]["warm_start"] = stats
    return rows


# ---------------------------------------------------------------------------------------------
# Selection micro-benchmark
# ---------------------------------------------------------------------------------------------
def _time(fn, budget_s=1.0, max_reps=50, min_reps=3, setup=None):
    """Median seconds of fn(); setup(), if given, runs before each call, untimed."""
    if setup:
        setup()
    fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < t_end):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_select(sizes, device):
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        x = torch.randn(n, generator=g).to(device)
        k = n // 2
        state = TopKWarmStart()
        scores = x.clone()
        warm_topk_threshold(scores, k, state)
        drift = torch.randn(n, generator=g).to(device) * 1e-4
        flip = [1.0]

        def step():
            # a training-like step (not timed): scores move a little
            scores.add_(drift, alpha=flip[0])
            flip[0] = -flip[0]

        def warm():
            # the threshold found again, as the reference path finds it for a layer
            warm_topk_threshold(scores, k, state)

        cpu_state, weight = ops.LayerState(), torch.randn(n, generator=g).to(device)

        def cpu_pass():
            # the CPU kernels' one pass: threshold and masked weight, updated in place (as in training)
            cpu_kernels.masked_weight_cached(weight, scores, k, cpu_state)

        def sync_fn(f):
            def run():
                f()
                sync(torch.device(device))
            return run

        budget = 1.5 if n >= 10**6 else 0.5
        t = {
            "kth_largest": _time(sync_fn(lambda: kth_largest(x, k)), budget),
            "warm_layer_threshold": _time(sync_fn(warm), budget, setup=step) if n > 16384 else None,
            "cpu_kernels_pass": (_time(sync_fn(cpu_pass), budget, setup=step)
                                 if n > 16384 and device == "cpu" and cpu_kernels.available() else None),
            "torch.kthvalue": _time(sync_fn(lambda: torch.kthvalue(x, n - k + 1)), budget),
            "torch.sort": _time(sync_fn(lambda: torch.sort(x, descending=True, stable=True)), budget,
                                max_reps=5 if n >= 10**7 else 50),
            "torch.topk": _time(sync_fn(lambda: torch.topk(x, k, sorted=False)), budget,
                                max_reps=5 if n >= 10**7 else 50),
        }
        row = {"n": n, "seconds": t,
               "elements_per_s": {m: (n / s if s else None) for m, s in t.items()},
               "speedup_vs_kthvalue": {m: (t["torch.kthvalue"] / s if s else None) for m, s in t.items()}}
        rows.append(row)
        print(f"n={n:>9,d}  " + "  ".join(f"{m} {s * 1e3:8.3f} ms" for m, s in t.items() if s is not None),
              flush=True)
    return rows


# ---------------------------------------------------------------------------------------------


def markdown(args, data_name, rows, sel_rows) -> str:
    lines = [f"## Training speed: {args.model}, width {args.width}, k {args.k}, batch {args.batch_size}, "
             f"{args.threads} CPU threads of {cpu_model()} ({data_name})", "",
             "| method | best epoch (s) | ratio to dense (median of rounds) | ratios of the rounds |",
             "|---|---:|---:|---|"]
    label = {"dense": "dense", "sort": "GetSubnet, sort (official)", "kthvalue": "GetSubnet, kthvalue (README)",
             "supermask": "supermask reference path (set_backend(model, \"torch\"), --backend torch; the ground truth)",
             "triton": "supermask Triton backend",
             "cpu": "supermask CPU kernels (the ops' CPU implementation, what train uses on a CPU)",
             "floor": "floor: mask passes only, no selection (lower bound, not a method)",
             "dense_compiled": "dense, torch.compile", "compiled": "supermask CPU kernels, torch.compile"}
    for method in ("dense", "sort", "kthvalue", "cpu", "supermask", "floor", "triton", "dense_compiled", "compiled"):
        row = rows.get(method)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {label[method]} | n/a | n/a | ({row['error'][:60]}) |")
        else:
            rounds = ", ".join(f"{r:.2f}" for r in row["paired_ratios"])
            lines.append(f"| {label[method]} | {row['best_epoch_s']:.2f} | {row['ratio_to_dense']:.2f}x | {rounds} |")
    comp = rows.get("compiled", {})
    if "ratio_to_dense_compiled" in comp:
        rounds = ", ".join(f"{r:.2f}" for r in comp["paired_ratios_compiled"])
        lines += ["", f"Compiled supermask vs compiled dense (torch.compile both, epochs side by side): "
                  f"{comp['ratio_to_dense_compiled']:.2f}x (median; rounds {rounds})"]
    for method, who in (("cpu", "the CPU kernels"), ("supermask", "the reference path"),
                        ("compiled", "the compiled model's CPU kernels")):
        stats = rows.get(method, {}).get("warm_start")
        if stats:
            lines += ["", f"How {who} found each layer's threshold (steps): " + "; ".join(
                f"{name} ({st['numel']:,}): {st['fused']} in the fused pass, {st['candidates']} by candidates, "
                f"{st['band']} band, {st['widened']} widened, {st['cold']} cold" for name, st in stats.items())]
    if sel_rows:
        lines += ["", "## Selection: k-th largest of n (k = n/2), median time", "",
                  "| n | kth_largest | warm layer threshold | CPU kernels' pass | torch.kthvalue | torch.sort "
                  "| torch.topk "
                  "| kth_largest vs kthvalue | warm vs kthvalue | CPU pass vs kthvalue "
                  "| elements/s: CPU pass, warm, kthvalue |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sel_rows:
            t = r["seconds"]

            def ms(v):
                return "n/a" if v is None else f"{v * 1e3:.3f} ms"

            def rate(m):
                v = r["elements_per_s"].get(m)
                return "n/a" if v is None else f"{v:.2g}"

            def ratio(m):
                v = r["speedup_vs_kthvalue"].get(m)
                return "n/a" if v is None else f"{v:.1f}x"

            lines.append(f"| {r['n']:,} | {ms(t['kth_largest'])} | {ms(t['warm_layer_threshold'])} | "
                         f"{ms(t.get('cpu_kernels_pass'))} | {ms(t['torch.kthvalue'])} | {ms(t['torch.sort'])} | "
                         f"{ms(t['torch.topk'])} | {ratio('kth_largest')} | {ratio('warm_layer_threshold')} | "
                         f"{ratio('cpu_kernels_pass')} | {rate('cpu_kernels_pass')}, {rate('warm_layer_threshold')}, "
                         f"{rate('torch.kthvalue')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fc", choices=BENCH_MODELS,
                   help="fc: LeNet-300-100; convN: Conv-2/4/6/8 (on the 28x28 images)")
    p.add_argument("--width", type=float, default=2.5)
    p.add_argument("--k", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs-measured", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5, help="rounds of dense, cpu, supermask and floor epochs")
    p.add_argument("--chunk-steps", type=int, default=20,
                   help="steps each way runs before the next one's turn within a round's interleaved epochs")
    p.add_argument("--skip-slow", action="store_true", help="skip the sort and kthvalue GetSubnet epochs")
    p.add_argument("--no-compiled", action="store_true", help="skip the torch.compile ways (compiling takes minutes)")
    p.add_argument("--select-sizes", default="1e3,1e4,1e5,1e6,1e7")
    p.add_argument("--no-select", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only (a quick check)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(), "python": platform.python_version()}

    rows, data_name = {}, "n/a"
    if not args.no_train:
        x, y, data_name = load_data()
        if args.limit:
            x, y, data_name = x[:args.limit], y[:args.limit], f"{data_name}, first {args.limit} images"
        print(f"training {args.model} width {args.width} k {args.k} batch {args.batch_size} on {data_name}, "
              f"{torch.get_num_threads()} threads", flush=True)
        rows = bench_training(args, x, y)
        (out / f"train_{args.model}.json").write_text(json.dumps(
            {"meta": meta, "args": vars(args), "data": data_name, "results": rows}, indent=2))
    sel_rows = []
    if not args.no_select:
        sizes = [int(float(s)) for s in args.select_sizes.split(",")]
        print(f"selection micro-benchmark ({torch.get_num_threads()} threads)", flush=True)
        sel_rows = bench_select(sizes, "cpu")
        (out / "select_cpu.json").write_text(json.dumps({"meta": meta, "results": sel_rows}, indent=2))
    md = markdown(args, data_name, rows, sel_rows)
    print()
    print(md)
    if not args.no_train:
        (out / f"train_{args.model}.md").write_text(md)


if __name__ == "__main__":
    main()
