"""The training loop shared by edge-popup, dense and IMP runs.

Data are in-memory tensors (supermask.data); each epoch's order depends only on (seed, epoch) and
every piece of state lives in the checkpoint, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from . import distributed as dist_mod
from .layers import supermask_layers
from .runlog import TensorBoardLog, write_curves
from .errors import UsageError, write_error
from .storage import json_safe, save_checkpoint, write_json

OPTIMIZERS = ("sgd", "adam")
# What train(resume=...) reads from a checkpoint (load_checkpoint(path, require=RESUME_KEYS)).
RESUME_KEYS = ("model", "optimizer", "epoch", "metrics", "epoch_seconds", "val_curve")
SCHEDULES = ("cosine", "multistep", "none")


@dataclass
class TrainConfig:
    """The training hyperparameters of one run (supermask.desc.training_config makes it from a run's identity):
    epochs, batch size, lr (per-iteration schedule: cosine, multistep at milestones by gamma, or none; linear
    warm-up over warmup_epochs), SGD or Adam with momentum, weight decay (none on BatchNorm with no_bn_decay),
    label smoothing; seed orders the data."""
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    seed: int = 0
    val_every: int = 0  # also evaluate validation loss every this many iterations (0: per epoch)
    warmup_epochs: float = 0.0  # linear warm-up from lr/warmup_steps to lr, then the schedule
    milestones: tuple = ()  # multistep: epochs at which the lr is multiplied by gamma
    gamma: float = 0.1
    label_smoothing: float = 0.0
    nesterov: bool = False
    no_bn_decay: bool = False  # no weight decay on BatchNorm parameters
    hn_compat: bool = False  # hidden-networks' schedule: the lr set once per epoch (hn_learning_rate)
    extra: dict = field(default_factory=dict)


def learning_rate(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int = 1) -> float:
    """Learning rate at an iteration (0-based). Warm-up: lr * (step + 1) / warmup_steps for the
    first warmup_steps iterations; then cosine (annealed to 0 over the remaining iterations),
    multistep (times gamma at each milestone epoch) or constant. With cfg.hn_compat: hn_learning_rate
    of the iteration's epoch."""
    if cfg.hn_compat:
        return hn_learning_rate(cfg, step // max(1, steps_per_epoch))
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(step >= m * steps_per_epoch for m in cfg.milestones)
    return cfg.lr


def hn_learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """hidden-networks' learning rate (utils/schedulers.py), set once at the start of each epoch
    (0-based): warm-up lr * (epoch + 1) / warmup_epochs for the first warmup_epochs epochs (not in
    multistep); then cosine 0.5 * lr * (1 + cos(pi * (epoch - warmup) / (epochs - warmup))),
    multistep lr * gamma ** (milestones passed), or constant lr."""
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        warmup = cfg.warmup_epochs
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - warmup) / max(1, cfg.epochs - warmup)))
    return cfg.lr


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer cfg names (SGD with momentum and Nesterov, or Adam) over the trainable parameters; with
    cfg.no_bn_decay, BatchNorm parameters get no weight decay."""
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if not (cfg.no_bn_decay and id(p) in bn_params)]},
              {"params": [p for p in params if cfg.no_bn_decay and id(p) in bn_params], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict:
    """Mean loss, top-1 and top-5 accuracy (%) of model on (x, y)."""
    if len(y) == 0:
        return {"loss": float("nan"), "acc": float("nan"), "acc5": float("nan")}
    loss, correct, correct5 = _sums(model, data_mod.batches(x, y, batch_size))
    n = len(y)
    return {"loss": loss / n, "acc": 100.0 * correct / n, "acc5": 100.0 * correct5 / n}


def _sums(model: nn.Module, batches, device: torch.device | None = None) -> tuple[float, float, float]:
    """Summed loss, top-1 and top-5 hits of model (in eval mode) over (x, y) batches."""
    was_training = model.training
    model.eval()
    loss = correct = correct5 = 0.0
    for xb, yb in batches:
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        out = model(xb)
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct += (top[:, 0] == yb).sum().item()
        correct5 += (top == yb[:, None]).any(1).sum().item()
    model.train(was_training)
    return loss, correct, correct5


@torch.no_grad()
def evaluate_streamed(model: nn.Module, subset, device: torch.device, batch_size: int = 256,
                      workers: int = 0) -> dict:
    """evaluate() for a dataset read from disk (e.g. ImageNet's ImageFolder): under torchrun each
    rank evaluates its contiguous share and the sums are all-reduced, so every rank gets the
    result over the whole set."""
    n = len(subset)
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "acc5": float("nan")}
    lo, hi = dist_mod.shard_bounds(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(subset, range(lo, hi)), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    loss, correct, correct5 = dist_mod.sum_all(list(_sums(model, loader, device)))
    return {"loss": loss / n, "acc": 100.0 * correct / n, "acc5": 100.0 * correct5 / n}


def _evaluate_split(model, dataset, tensors, split: str, device, cfg: TrainConfig) -> dict:
    """Evaluate on "val" or "test": in memory on every rank (the whole set: identical), or
    streamed and sharded across ranks."""
    if getattr(dataset, "streaming", False):
        per_rank = max(1, math.ceil(cfg.batch_size / dist_mod.world_size()))
        return evaluate_streamed(model, getattr(dataset, split), device, per_rank, dataset.workers)
    return evaluate(model, tensors[f"{split}_x"], tensors[f"{split}_y"])


def _split_len(dataset, tensors, split: str) -> int:
    if getattr(dataset, "streaming", False):
        return len(getattr(dataset, split))
    return len(tensors[f"{split}_y"])


def _epoch_batches(dataset, tensors, cfg: TrainConfig, epoch: int, device: torch.device):
    """Yield (x, y, global batch size) of this rank, in the epoch's order.

    The global batches are exactly those of a single-process run (epoch_order, then slices of
    batch_size); under torchrun rank r takes the r-th contiguous share of every global batch
    (shard_bounds), so --batch-size stays the global batch. In memory, augmentation is applied to
    the global batch before it is split, so its random stream is that of one process as well.
    """
    world = dist_mod.world_size()
    if getattr(dataset, "streaming", False):
        n = len(dataset.train)
        order = data_mod.epoch_order(n, cfg.seed, epoch)
        sizes = [len(order[s:s + cfg.batch_size]) for s in range(0, n, cfg.batch_size)]
        shards = []
        for i, size in enumerate(sizes):
            lo, hi = dist_mod.shard_bounds(size)
            shards.append(order[i * cfg.batch_size + lo:i * cfg.batch_size + hi].tolist())
        # The workers' augmentation seeds come from this generator, not from torch's global RNG
        # (which sampled masks use): deterministic per (seed, epoch, rank), so resume is exact.
        gen = torch.Generator().manual_seed((cfg.seed * 100_003 + epoch) * 1_000 + dist_mod.rank())
        loader = torch.utils.data.DataLoader(dataset.train, batch_sampler=[s for s in shards if s],
                                             num_workers=dataset.workers, generator=gen,
                                             pin_memory=device.type == "cuda")
        batches = iter(loader)
        for shard, size in zip(shards, sizes):
            if not shard:  # fewer samples than ranks in the last global batch: an empty share
                yield (torch.empty((0, *dataset.input_shape), device=device),
                       torch.empty(0, dtype=torch.long, device=device), size)
                continue
            xb, yb = next(batches)
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True), size
        return
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = data_mod.epoch_order(len(tensors["train_y"]), cfg.seed, epoch).to(device)
    for xb, yb in data_mod.batches(tensors["train_x"], tensors["train_y"], cfg.batch_size, order, gen,
                                   dataset.augment):
        if world == 1:
            yield xb, yb, len(yb)
        else:
            lo, hi = dist_mod.shard_bounds(len(yb))
            yield xb[lo:hi], yb[lo:hi], len(yb)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(weights of all Linear/Conv2d layers, how many of them are in use): supermask layers count
    their mask, ordinary layers count their nonzero weights."""
    total = kept = 0
    masked = {id(m) for _, m in supermask_layers(model)}
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            total += m.weight.numel()
            kept += int(m.mask().sum()) if id(m) in masked else int((m.weight != 0).sum())
    return total, kept


class DivergedError(UsageError):
    """The training loss became nan or inf: the run stops, its results are not written."""


def _diverged(loss: float, step: int, epoch: int, out: Path | None):
    where = f"; {out} is not marked finished" if out else ""
    raise DivergedError(f"the training loss became {loss} at iteration {step + 1} (epoch {epoch + 1}): training "
                        f"diverged (lower --lr?){where}")


def not_learning(train_loss: float, train_acc: float, num_classes: int) -> bool:
    """True when an epoch's mean training loss is no lower than that of predicting every class with
    probability 1/C (ln C nats) and its training accuracy (%) is below twice chance: the network is
    not learning (a learning rate too high for it, dead ReLUs after a blow-up, ...)."""
    return num_classes > 1 and train_loss >= math.log(num_classes) and train_acc < 200.0 / num_classes


def _append_row(f, row: dict, path: Path):
    """Append one metrics row; on a failed write (a full disk) cut the file back to whole rows."""
    pos = f.tell()
    data = memoryview((json.dumps(json_safe(row), allow_nan=False) + "\n").encode())  # NaN (--val-size 0): null
    try:
        while data:  # a raw file may write part of it
            data = data[f.write(data):]
    except OSError as e:
        with contextlib.suppress(OSError):
            f.truncate(pos)
        raise UsageError(write_error(path, e)) from None


def train(model: nn.Module, dataset: data_mod.Dataset, cfg: TrainConfig, device: torch.device,
          out: Path | None = None, resume: dict | None = None, after_step=None, progress: bool = True,
          desc: str = "", log=print, checkpoint_extra: dict | None = None, start_step: int = 0,
          tensorboard: bool = True, config: dict | None = None) -> dict:
    """Train model; returns the results dict (also written to out/results.json when out is given).

    With out, every epoch is also logged to TensorBoard event files in out (tensorboard=False: not;
    see supermask.runlog) and the finished run gets out/curves.png. config: the run's full
    configuration (config.json), stored in results.json as "config".

    start_step: train from this iteration to the end, as a run rewound to it does (IMP with
    --rewind-iter): the batches, the learning-rate schedule and the iteration numbers continue
    from there (epoch start_step // steps_per_epoch, skipping its first batches); the optimizer
    state is fresh.

    after_step(model) runs after every optimiser step (IMP uses it to keep pruned weights at zero).
    resume is a checkpoint dict written by an earlier call with the same arguments.
    checkpoint_extra: more entries stored in every checkpoint.pt (IMP stores its masks there).

    A training loss that becomes nan or inf raises DivergedError (a UsageError: one line) before
    that epoch's metrics row and checkpoint, so out keeps its last finished epoch and no
    results.json. A resume checkpoint that does not fit model raises UsageError; so does a failed
    write into out (a full disk), leaving no partial file.

    Under torchrun (supermask.distributed.setup called first) the model is wrapped in
    DistributedDataParallel, each rank trains on its share of every global batch, masks and
    weights are checked to be identical on every rank after each epoch, and only rank 0 logs,
    shows progress and writes into out; resume must then be the same dict on every rank.
    """
    run = _Run(model, dataset, cfg, device, out, after_step, progress, desc, log)
    if not run.main:
        run.out, run.progress, run.log = None, False, lambda *_a, **_k: None
    if run.world > 1 and cfg.batch_size < run.world:
        raise ValueError(f"the global batch size ({cfg.batch_size}) must be at least the number of processes "
                         f"({run.world})")
    if not 0 <= start_step < run.total_steps:
        raise ValueError(f"start_step must be in [0, {run.total_steps}), got {start_step}")
    start_epoch, skip = divmod(start_step, run.steps_per_epoch)  # skip: batches of start_epoch already trained
    if resume is not None:
        start_epoch, skip = _resume(run, resume), 0
    if run.world > 1:
        dist_mod.verify_identical(model, "before training")  # DDP would hide it: it copies rank 0's
        run.net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics_file = _open_metrics(run.out, run.metrics)
    board = TensorBoardLog(run.out, tensorboard)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            loss_sum, correct, seen = _train_epoch(run, epoch, skip if epoch == start_epoch else 0)
            row = _end_epoch(run, epoch, loss_sum, correct, seen)
            board.epoch(row, model)
            if run.out:
                _append_row(metrics_file, row, run.out / "metrics.jsonl")
                save_checkpoint(run.out / "checkpoint.pt", {
                    "model": model.state_dict(), "optimizer": run.optimizer.state_dict(), "epoch": epoch + 1,
                    "metrics": run.metrics, "epoch_seconds": run.epoch_seconds, "val_curve": run.val_curve,
                    "rng": torch.get_rng_state(), **(checkpoint_extra or {})})
    finally:
        board.close()
        if metrics_file:
            metrics_file.close()
    results = _results(run, start_step, config)
    if run.out:
        write_curves(run.out / "curves.png", run.metrics, title=desc.strip() or run.out.name)
        write_json(run.out / "results.json", results)
    dist_mod.barrier()  # rank 0's files are complete before any rank goes on
    return results


class _Run:
    """What one call of train shares between its parts: the model (net: its DDP wrapper under
    torchrun), data on the device, optimizer, schedule lengths, where it writes and logs, and the
    state that a checkpoint keeps (metrics rows, epoch seconds, the validation-loss curve)."""

    def __init__(self, model, dataset, cfg: TrainConfig, device, out, after_step, progress, desc, log):
        model.to(device)
        self.model = self.net = model
        self.dataset, self.cfg, self.device, self.out = dataset, cfg, device, out
        self.after_step, self.progress, self.desc, self.log = after_step, progress, desc, log
        self.world, self.main = dist_mod.world_size(), dist_mod.is_main()
        streaming = getattr(dataset, "streaming", False)
        self.tensors = {} if streaming else {k: getattr(dataset, k).to(device) for k in
                                             ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        self.optimizer = make_optimizer(model, cfg)
        n_train = len(dataset.train) if streaming else len(self.tensors["train_y"])
        self.n_val = _split_len(dataset, self.tensors, "val")
        self.steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.metrics, self.epoch_seconds, self.val_curve = [], [], []  # val_curve: (iteration, val loss)
        self.warned_not_learning = False

    def lr(self, step: int) -> float:
        """The learning rate at iteration step."""
        return learning_rate(self.cfg, step, self.total_steps, self.steps_per_epoch)

    def evaluate(self, split: str) -> dict:
        """Loss, top-1 and top-5 accuracy on split ("val" or "test")."""
        return _evaluate_split(self.model, self.dataset, self.tensors, split, self.device, self.cfg)


def _resume(run: _Run, resume: dict) -> int:
    """Load a checkpoint's model, optimizer, metrics and RNG state into run; returns the epoch to
    continue from. UsageError when it does not fit."""
    try:
        run.model.load_state_dict(resume["model"])
        run.optimizer.load_state_dict(resume["optimizer"])
        run.metrics, run.epoch_seconds = list(resume["metrics"]), list(resume["epoch_seconds"])
        run.val_curve, epoch = [tuple(v) for v in resume["val_curve"]], int(resume["epoch"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        why = f"no {e} entry" if isinstance(e, KeyError) else " ".join(str(e).split())[:160]
        raise UsageError(f"the checkpoint to resume from does not fit this run ({why}); "
                         "it is another run's or damaged: delete the run folder or choose another --out") from None
    if "rng" in resume:  # sampled masks draw from the global RNG: continue its stream exactly
        torch.set_rng_state(resume["rng"])
    return epoch


def _open_metrics(out: Path | None, metrics: list[dict]):
    """metrics.jsonl opened for appending (None without out), holding the rows of metrics: written
    from the checkpoint's rows on resume, so a kill between a row and its checkpoint leaves no
    extra row. Unbuffered: a failed write raises at once and _append_row can cut the file back."""
    if not out:
        return None
    try:
        metrics_file = open(out / "metrics.jsonl", "wb", buffering=0)  # noqa: SIM115
    except OSError as e:
        raise UsageError(write_error(out / "metrics.jsonl", e)) from None
    try:
        for row in metrics:
            _append_row(metrics_file, row, out / "metrics.jsonl")
    except BaseException:
        metrics_file.close()
        raise
    return metrics_file


def _train_epoch(run: _Run, epoch: int, skip: int) -> tuple[float, float, float]:
    """One epoch's optimiser steps (from its batch skip on); returns the sums of loss and correct
    predictions and the examples seen (over every rank), and appends the epoch's seconds."""
    cfg, model = run.cfg, run.model
    model.train()
    bar = tqdm(_epoch_batches(run.dataset, run.tensors, cfg, epoch, run.device), total=run.steps_per_epoch,
               leave=False, desc=f"{run.desc}epoch {epoch + 1}/{cfg.epochs}", disable=not run.progress,
               dynamic_ncols=True)
    seen = loss_sum = correct = eval_seconds = 0.0
    timer = time.perf_counter()
    for i, (xb, yb, global_n) in enumerate(bar):
        if i < skip:
            continue  # before start_step (drawn all the same: the data stream stays the same)
        step = epoch * run.steps_per_epoch + i
        batch_loss, out_b = _step(run, step, epoch, xb, yb, global_n)
        seen += len(yb)
        loss_sum += batch_loss
        correct += (out_b.argmax(1) == yb).sum().item()
        if run.progress and i % 20 == 0 and seen:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        if cfg.val_every and (step + 1) % cfg.val_every == 0 and run.n_val:
            eval_start = time.perf_counter()
            dist_mod.broadcast_buffers(model)
            run.val_curve.append((step + 1, run.evaluate("val")["loss"]))
            eval_seconds += time.perf_counter() - eval_start
    run.epoch_seconds.append(time.perf_counter() - timer - eval_seconds)
    bar.close()
    if run.world > 1:
        dist_mod.broadcast_buffers(model)  # BatchNorm statistics: rank 0's on every rank
        seen, loss_sum, correct = dist_mod.sum_all([seen, loss_sum, correct])
        dist_mod.verify_identical(model, f"after epoch {epoch + 1}")
    if not math.isfinite(loss_sum):  # (under torchrun the sum over ranks: every rank stops alike)
        _diverged(loss_sum, (epoch + 1) * run.steps_per_epoch - 1, epoch, run.out)
    return loss_sum, correct, seen


def _step(run: _Run, step: int, epoch: int, xb, yb, global_n) -> tuple[float, torch.Tensor]:
    """One optimiser step on the batch (xb, yb) at iteration step; returns its summed loss and outputs."""
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr(step)
    out_b = run.net(xb)
    label_smoothing = run.cfg.label_smoothing
    if run.world == 1:
        loss = F.cross_entropy(out_b, yb, label_smoothing=label_smoothing)
        batch_loss = loss.item() * len(yb)
    else:  # DDP averages gradients over ranks: scale so that it is the global batch's mean
        local = F.cross_entropy(out_b, yb, label_smoothing=label_smoothing, reduction="sum")
        loss = local * (run.world / global_n)
        batch_loss = local.item()
    if run.world == 1 and not math.isfinite(batch_loss):
        _diverged(batch_loss, step, epoch, run.out)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if run.after_step is not None:
        run.after_step(run.model)
    return batch_loss, out_b


def _end_epoch(run: _Run, epoch: int, loss_sum: float, correct: float, seen: float) -> dict:
    """Evaluate after epoch, append its metrics row (returned), log it, warn once if not learning."""
    val, test = run.evaluate("val"), run.evaluate("test")
    iteration = (epoch + 1) * run.steps_per_epoch
    if not run.cfg.val_every and run.n_val:
        run.val_curve.append((iteration, val["loss"]))
    row = {"epoch": epoch + 1, "iteration": iteration, "lr": run.lr(iteration - 1),
           "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
           "val_loss": val["loss"], "val_acc": val["acc"], "test_loss": test["loss"],
           "test_acc": test["acc"], "test_acc5": test["acc5"], "seconds": run.epoch_seconds[-1]}
    run.metrics.append(row)
    run.log(f"{run.desc}epoch {epoch + 1}/{run.cfg.epochs}  loss {row['train_loss']:.4f}  train "
            f"{row['train_acc']:.2f}%  val {val['acc']:.2f}%  test {test['acc']:.2f}%  {run.epoch_seconds[-1]:.1f}s")
    classes = run.dataset.num_classes
    if run.main and not run.warned_not_learning and not_learning(row["train_loss"], row["train_acc"], classes):
        run.warned_not_learning = True  # once a run: the run goes on, its numbers are what they are
        print(f"warning: {run.desc}epoch {epoch + 1}: training loss {row['train_loss']:.4g} is no lower than "
              f"chance (ln {classes} = {math.log(classes):.4f}) and training accuracy {row['train_acc']:.2f}% is "
              f"near chance ({100 / classes:.0f}%): the network is not learning (too high a --lr?)", file=sys.stderr)
    return row


def _results(run: _Run, start_step: int, config: dict | None) -> dict:
    """results.json's dict: the last and best accuracies, the early-stop iteration (lowest
    validation loss), iterations, weights kept, seconds per epoch (median), the configs."""
    metrics, val_curve = run.metrics, run.val_curve
    total, kept = count_params(run.model)
    last = metrics[-1] if metrics else {}
    early = min(val_curve, key=lambda v: v[1]) if val_curve else (None, None)
    return {
        "test_acc": last.get("test_acc"), "test_acc5": last.get("test_acc5"),
        "best_test_acc": max((m["test_acc"] for m in metrics), default=None),
        "val_acc": last.get("val_acc"), "best_val_acc": max((m["val_acc"] for m in metrics), default=None),
        "early_stop_iteration": early[0], "early_stop_val_loss": early[1],
        "epochs": len(metrics), "start_iteration": start_step,
        "iterations": (metrics[-1]["iteration"] - start_step) if metrics else 0,
        "params_total": total, "params_kept": kept, "weights_remaining": 100.0 * kept / max(1, total),
        "seconds_per_epoch": statistics.median(run.epoch_seconds) if run.epoch_seconds else None,
        "train_config": asdict(run.cfg),
        **({"config": config} if config is not None else {}),
    }


@torch.no_grad()
def evaluate_untrained(model: nn.Module, dataset: data_mod.Dataset, cfg: TrainConfig, device: torch.device,
                       out: Path | None = None, config: dict | None = None) -> dict:
    """Results of a model that is not trained (the random-subnetwork baseline). BatchNorm running
    statistics, which are buffers, not parameters, are first estimated over one pass of the
    training set; no parameter changes. Under torchrun every rank does the same pass (identical
    results) and only rank 0 writes."""
    if getattr(dataset, "streaming", False):
        raise ValueError(f"evaluating an untrained network is only supported on in-memory datasets, not {dataset.name}")
    if not dist_mod.is_main():
        out = None
    model.to(device)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
        model.train()
        for xb, _ in data_mod.batches(dataset.train_x.to(device), dataset.train_y.to(device), cfg.batch_size):
            model(xb)
    val = evaluate(model, dataset.val_x.to(device), dataset.val_y.to(device))
    test = evaluate(model, dataset.test_x.to(device), dataset.test_y.to(device))
    total, kept = count_params(model)
    results = {"test_acc": test["acc"], "test_acc5": test["acc5"], "best_test_acc": test["acc"],
               "val_acc": val["acc"], "best_val_acc": val["acc"], "early_stop_iteration": 0,
               "early_stop_val_loss": val["loss"], "epochs": 0, "iterations": 0, "params_total": total,
               "params_kept": kept, "weights_remaining": 100.0 * kept / max(1, total),
               "seconds_per_epoch": None, "train_config": asdict(cfg),
               **({"config": config} if config is not None else {})}
    if out:
        save_checkpoint(out / "checkpoint.pt", {"model": model.state_dict(), "epoch": 0})
        write_curves(out / "curves.png", [{"epoch": 0, "val_loss": val["loss"], "val_acc": val["acc"],
                                           "test_loss": test["loss"], "test_acc": test["acc"]}], title=out.name)
        write_json(out / "results.json", results)
    return results
