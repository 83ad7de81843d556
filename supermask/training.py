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
from .storage import save_checkpoint, write_json

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
    extra: dict = field(default_factory=dict)


def learning_rate(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int = 1) -> float:
    """Learning rate at an iteration (0-based). Warm-up: lr * (step + 1) / warmup_steps for the
    first warmup_steps iterations; then cosine (annealed to 0 over the remaining iterations),
    multistep (times gamma at each milestone epoch) or constant."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(step >= m * steps_per_epoch for m in cfg.milestones)
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
    data = memoryview((json.dumps(row) + "\n").encode())
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
    model.to(device)
    world, main = dist_mod.world_size(), dist_mod.is_main()
    if not main:
        out, progress, log = None, False, lambda *_a, **_k: None
    if world > 1 and cfg.batch_size < world:
        raise ValueError(f"the global batch size ({cfg.batch_size}) must be at least the number of processes ({world})")
    streaming = getattr(dataset, "streaming", False)
    tensors = {} if streaming else {k: getattr(dataset, k).to(device) for k in
                                    ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
    optimizer = make_optimizer(model, cfg)
    n_train = len(dataset.train) if streaming else len(tensors["train_y"])
    n_val = _split_len(dataset, tensors, "val")
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if not 0 <= start_step < total_steps:
        raise ValueError(f"start_step must be in [0, {total_steps}), got {start_step}")
    metrics, epoch_seconds = [], []
    start_epoch, skip = divmod(start_step, steps_per_epoch)  # skip: batches of start_epoch already trained
    val_curve = []  # (iteration, val loss) for the early-stop iteration
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            metrics, epoch_seconds = list(resume["metrics"]), list(resume["epoch_seconds"])
            val_curve, start_epoch, skip = [tuple(v) for v in resume["val_curve"]], int(resume["epoch"]), 0
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            why = f"no {e} entry" if isinstance(e, KeyError) else " ".join(str(e).split())[:160]
            raise UsageError(f"the checkpoint to resume from does not fit this run ({why}); "
                             "it is another run's or damaged: delete the run folder or choose another --out") from None
        if "rng" in resume:  # sampled masks draw from the global RNG: continue its stream exactly
            torch.set_rng_state(resume["rng"])
    net = model
    if world > 1:
        dist_mod.verify_identical(model, "before training")  # DDP would hide it: it copies rank 0's
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics_file = None
    if out:
        # metrics.jsonl: one row per epoch of the checkpoint, then appended. Written from the
        # checkpoint's rows on resume, so a kill between a row and its checkpoint leaves no extra row.
        # Unbuffered: a failed write raises at once and _append_row can cut the file back.
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
    board = TensorBoardLog(out, tensorboard)
    warned_not_learning = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            bar = tqdm(_epoch_batches(dataset, tensors, cfg, epoch, device), total=steps_per_epoch, leave=False,
                       desc=f"{desc}epoch {epoch + 1}/{cfg.epochs}", disable=not progress, dynamic_ncols=True)
            seen = loss_sum = correct = eval_seconds = 0.0
            timer = time.perf_counter()
            for i, (xb, yb, global_n) in enumerate(bar):
                if epoch == start_epoch and i < skip:
                    continue  # before start_step (drawn all the same: the data stream stays the same)
                step = epoch * steps_per_epoch + i
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, step, total_steps, steps_per_epoch)
                out_b = net(xb)
                if world == 1:
                    loss = F.cross_entropy(out_b, yb, label_smoothing=cfg.label_smoothing)
                    batch_loss = loss.item() * len(yb)
                else:  # DDP averages gradients over ranks: scale so that it is the global batch's mean
                    local = F.cross_entropy(out_b, yb, label_smoothing=cfg.label_smoothing, reduction="sum")
                    loss = local * (world / global_n)
                    batch_loss = local.item()
                if world == 1 and not math.isfinite(batch_loss):
                    _diverged(batch_loss, step, epoch, out)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step(model)
                seen += len(yb)
                loss_sum += batch_loss
                correct += (out_b.argmax(1) == yb).sum().item()
                if progress and i % 20 == 0 and seen:
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
                if cfg.val_every and (step + 1) % cfg.val_every == 0 and n_val:
                    eval_start = time.perf_counter()
                    dist_mod.broadcast_buffers(model)
                    val_curve.append((step + 1, _evaluate_split(model, dataset, tensors, "val", device, cfg)["loss"]))
                    eval_seconds += time.perf_counter() - eval_start
            epoch_seconds.append(time.perf_counter() - timer - eval_seconds)
            bar.close()
            if world > 1:
                dist_mod.broadcast_buffers(model)  # BatchNorm statistics: rank 0's on every rank
                seen, loss_sum, correct = dist_mod.sum_all([seen, loss_sum, correct])
                dist_mod.verify_identical(model, f"after epoch {epoch + 1}")
            if not math.isfinite(loss_sum):  # (under torchrun the sum over ranks: every rank stops alike)
                _diverged(loss_sum, (epoch + 1) * steps_per_epoch - 1, epoch, out)
            val = _evaluate_split(model, dataset, tensors, "val", device, cfg)
            test = _evaluate_split(model, dataset, tensors, "test", device, cfg)
            iteration = (epoch + 1) * steps_per_epoch
            if not cfg.val_every and n_val:
                val_curve.append((iteration, val["loss"]))
            row = {"epoch": epoch + 1, "iteration": iteration, "lr": learning_rate(cfg, iteration - 1, total_steps, steps_per_epoch),
                   "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
                   "val_loss": val["loss"], "val_acc": val["acc"], "test_loss": test["loss"],
                   "test_acc": test["acc"], "test_acc5": test["acc5"], "seconds": epoch_seconds[-1]}
            metrics.append(row)
            log(f"{desc}epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2f}%  "
                f"val {val['acc']:.2f}%  test {test['acc']:.2f}%  {epoch_seconds[-1]:.1f}s")
            board.epoch(row, model)
            if main and not warned_not_learning and not_learning(row["train_loss"], row["train_acc"],
                                                                 dataset.num_classes):
                warned_not_learning = True  # once a run: the run goes on, its numbers are what they are
                print(f"warning: {desc}epoch {epoch + 1}: training loss {row['train_loss']:.4g} is no lower than "
                      f"chance (ln {dataset.num_classes} = {math.log(dataset.num_classes):.4f}) and training "
                      f"accuracy {row['train_acc']:.2f}% is near chance ({100 / dataset.num_classes:.0f}%): the "
                      f"network is not learning (too high a --lr?)", file=sys.stderr)
            if out:
                _append_row(metrics_file, row, out / "metrics.jsonl")
                save_checkpoint(out / "checkpoint.pt", {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                    "metrics": metrics, "epoch_seconds": epoch_seconds, "val_curve": val_curve,
                    "rng": torch.get_rng_state(),
                    **(checkpoint_extra or {})})
    finally:
        board.close()
        if metrics_file:
            metrics_file.close()
    total, kept = count_params(model)
    last = metrics[-1] if metrics else {}
    early = min(val_curve, key=lambda v: v[1]) if val_curve else (None, None)
    results = {
        "test_acc": last.get("test_acc"), "test_acc5": last.get("test_acc5"),
        "best_test_acc": max((m["test_acc"] for m in metrics), default=None),
        "val_acc": last.get("val_acc"), "best_val_acc": max((m["val_acc"] for m in metrics), default=None),
        "early_stop_iteration": early[0], "early_stop_val_loss": early[1],
        "epochs": len(metrics), "start_iteration": start_step,
        "iterations": (metrics[-1]["iteration"] - start_step) if metrics else 0,
        "params_total": total, "params_kept": kept, "weights_remaining": 100.0 * kept / max(1, total),
        "seconds_per_epoch": statistics.median(epoch_seconds) if epoch_seconds else None,
        "train_config": asdict(cfg),
        **({"config": config} if config is not None else {}),
    }
    if out:
        write_curves(out / "curves.png", metrics, title=desc.strip() or out.name)
        write_json(out / "results.json", results)
    dist_mod.barrier()  # rank 0's files are complete before any rank goes on
    return results


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
