"""Distributed training under torchrun (torch.distributed + DistributedDataParallel).

``torchrun --nproc-per-node N -m supermask.train ...`` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; ``setup(device)`` reads them, joins the process group (NCCL on CUDA,
gloo on the CPU) and returns this process's device (cuda:LOCAL_RANK on GPUs). Without those
variables nothing is initialised and every helper answers as for one process (rank 0 of 1), so a
plain ``python -m supermask.train`` runs exactly as before.

Rules the rest of the package follows: every rank computes the same things from the same seed;
only the main process (rank 0) writes files, logs and shows progress; anything only rank 0 can
know (a run folder's state, a checkpoint read from its disk) is broadcast with ``broadcast``.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankMismatchError(RuntimeError):
    """Masks or weights differ between ranks: the run would silently train different networks."""


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (WORLD_SIZE and RANK are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_initialized() -> bool:
    """Whether a torch.distributed process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process' rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process' rank on its node (LOCAL_RANK; 0 without a process group)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a plain, non-distributed run): the one process that writes."""
    return rank() == 0


def barrier():
    """Wait for every process (a no-op without a process group)."""
    if is_initialized():
        dist.barrier()


def backend_for(device: torch.device) -> str:
    """The process group backend for device: nccl on CUDA, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def setup(device: torch.device, timeout_minutes: float = 30) -> torch.device:
    """Join the process group if launched by torchrun; returns the device this rank uses.

    On CUDA each process takes the GPU numbered by its LOCAL_RANK (so --nproc-per-node must not
    exceed the GPUs per node). Idempotent; a no-op without torchrun's variables.
    """
    device = torch.device(device)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 1:
        return device
    if device.type == "cuda":
        lr = int(os.environ.get("LOCAL_RANK", 0))
        if lr >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {lr} but only {torch.cuda.device_count()} GPU(s) visible on this "
                               "node: use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(lr)
        device = torch.device("cuda", lr)
    if not is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(minutes=timeout_minutes),
                                **kwargs)
    return device


def teardown():
    """Leave the process group, if one is up."""
    if is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device):
    """``with session(device) as device:`` set up around a command and torn down after it; a
    process group that already existed (a program that set it up itself) is left alone."""
    existed = is_initialized()
    try:
        yield setup(device)
    finally:
        if not existed:
            teardown()


def broadcast(obj, src: int = 0):
    """obj as rank src has it, on every rank (any picklable object; tensors come back on the CPU)."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn, *args, **kwargs):
    """fn(...) on rank 0 only; its result (or its exception, re-raised as the same type where
    possible) on every rank. Keeps the other ranks from hanging when rank 0 fails, e.g. on a
    run folder that may not be overwritten."""
    if not is_initialized():
        return fn(*args, **kwargs)
    result = error = None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (re-raised on every rank below)
            error = e
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result


def sum_all(values) -> list[float]:
    """Element-wise sum over ranks of a list of numbers (float64 on the CPU with gloo, on the
    GPU with NCCL)."""
    if not is_initialized():
        return list(values)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values), dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.cpu().tolist()


def shard_bounds(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """[lo, hi) of rank r's contiguous share of n items: sizes differ by at most one (the first
    n % w ranks take one more), like torch.tensor_split."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


# ---- consistency checks -------------------------------------------------------------------------

def _digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def model_checksums(model: nn.Module) -> dict[str, str]:
    """Hashes of the masks in use (supermask layers: the evaluation-time mask, which draws no
    random numbers) and of every parameter (frozen weights and trained ones; IMP's pruned weights
    are exact zeros, so its masks are covered) and buffer."""
    from .layers import supermask_layers  # noqa: PLC0415

    masks = []
    for name, layer in supermask_layers(model):
        masks.append((name, layer.mask()))
    return {"masks": _digest(masks),
            "weights": _digest(sorted(model.named_parameters())),
            "buffers": _digest(sorted((n, b) for n, b in model.named_buffers() if b is not None))}


def verify_identical(model: nn.Module, what: str = "") -> dict[str, str]:
    """All-gather model_checksums and raise RankMismatchError (on every rank) if any rank differs.
    Returns this rank's checksums. Free in a non-distributed run (nothing is hashed)."""
    if not is_initialized():
        return {}
    mine = model_checksums(model)
    everyone = all_gather(mine)
    bad = sorted({k for c in everyone for k in c if c[k] != everyone[0][k]})
    if bad:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {c[k][:12]}" for r, c in enumerate(everyone))
                           for k in bad)
        raise RankMismatchError(f"{', '.join(bad)} differ between ranks{' ' + what if what else ''} ({detail}); "
                                "every rank must build the same network from the same seed")
    return mine


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0):
    """Copy rank src's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them
    at the start of each forward, so after the last training step the ranks' buffers differ by
    that step's local batch; call this before evaluating or checkpointing."""
    if not is_initialized():
        return
    for b in model.buffers():
        if b is not None:
            dist.broadcast(b.data, src=src)
