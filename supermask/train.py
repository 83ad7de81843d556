"""Train a supermask (edge-popup) or, with --dense, the same network's weights.

    python -m supermask.train --width 2.5 --k 0.5            # MNIST, LeNet-300-100 x 2.5, keep 50%
    python -m supermask.train --dataset fashion-mnist --dense # the dense baseline

Every run lives in its own folder (--out, default runs/<name from the hyperparameters>) holding
config.json, metrics.jsonl, checkpoint.pt and results.json. All flags: docs/commands.md (or --help).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from . import data as data_mod
from . import distributed
from . import pai, threads
from . import desc
from .cli import Parser, resolve_backend, resolve_device, run_main
from .convert import set_backend
from .errors import UsageError
from .storage import load_checkpoint, open_run, read_json_object, read_results, read_run_config
from .flags import add_backend, add_fields, add_model_args, add_training_args, config_value
from .training import RESUME_KEYS, evaluate, evaluate_streamed, evaluate_untrained, train

def parser() -> Parser:
    """The flags of python -m supermask.train (from the run description's fields, supermask.desc)."""
    p = Parser(prog="python -m supermask.train", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_fields(p, desc.TRAIN_FIELDS[:-2])
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="take the defaults from a YAML config of the official edge-popup code (hidden-networks) "
                        "or of configs/; flags given here override it (supermask.hn_config)")
    add_fields(p, desc.TRAIN_FIELDS[-2:])
    p.add_argument("--evaluate", metavar="RUN_DIR", default=None,
                   help="evaluate a saved run on the test set (top-1, top-5) without training")
    add_training_args(p)
    add_backend(p, "mask implementation: the reference torch path, the fused CPU kernels (C, compiled on first use) "
                   "or the Triton kernels (auto: triton on CUDA, cpu on CPU when a C compiler is there, else torch)")
    p.add_argument("--out", default=None, help="run folder (default runs/<name derived from the flags>)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    return p


# What Ctrl-C prints: an interrupted run may have no checkpoint yet (then --resume starts it again).
INTERRUPTED = ("interrupted; run the same command with --resume to continue from the last finished epoch "
               "(a run stopped before its first epoch ended starts again)")


def validate(args):
    """The description's checks (desc.check_train). Raises UsageError."""
    desc.check_train(args)


def evaluate_saved_run(run_dir: Path, data_dir: str, device: torch.device, workers: int) -> int:
    """--evaluate: rebuild a finished or checkpointed run and report its test accuracy."""
    ckpt_path = run_dir / "checkpoint.pt"
    config = read_run_config(run_dir)
    if desc.config_problem(config):
        raise UsageError(f"{run_dir / 'config.json'} is damaged: {desc.config_problem(config)}")
    if config.get("command") != "train":
        raise UsageError(f"--evaluate {run_dir}: not a supermask.train run")
    stored = run_dir / "results.json"
    results = read_results(run_dir, config) if stored.is_file() else {}
    if ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, require=("model",))["model"]
    elif not config.get("random_subnet"):
        raise UsageError(f"--evaluate {run_dir}: no checkpoint.pt to evaluate")
    streamed = {"workers": workers} if config["dataset"] in data_mod.STREAMED else {}
    dataset = data_mod.load(config["dataset"], data_dir, config["val_size"], **streamed)
    try:
        model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{run_dir / 'config.json'} does not describe a network this supermask builds ({e})") from None
    if ckpt_path.is_file():
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UsageError(f"{ckpt_path} does not fit the network its config.json describes "
                             f"({' '.join(str(e).split())[:160]})") from None
    model.to(device)
    if getattr(dataset, "streaming", False):
        test = evaluate_streamed(model, dataset.test, device, config["batch_size"], dataset.workers)
    else:
        test = evaluate(model, dataset.test_x.to(device), dataset.test_y.to(device))
    note = f" (stored: {results['test_acc']:.2f}%)" if isinstance(results.get("test_acc"), float | int) else ""
    print(f"{run_dir}: test top-1 {test['acc']:.2f}%{note}, top-5 {test['acc5']:.2f}%, loss {test['loss']:.4f}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; with --config FILE.yaml its values are the defaults that the flags override."""
    p = parser()
    args = p.parse_args(argv)
    if args.config:
        from . import hn_config  # noqa: PLC0415

        source = f"--config {args.config}"
        defaults = hn_config.to_flags(hn_config.read_yaml(args.config), source, args.hn_compat)
        actions = {a.dest: a for a in p._actions}
        for dest, value in defaults.items():
            defaults[dest] = config_value(actions[dest], value, source)
        p.set_defaults(**defaults)
        args = p.parse_args(argv)
        if args.k is None:
            raise UsageError(f"{source} sets prune_rate -1 (given on the command line in hidden-networks): pass --k")
    return args


def main(argv=None) -> int:
    """python -m supermask.train: parse the flags, then evaluate a saved run (--evaluate) or train one; returns the
    exit code."""
    args = parse_args(argv)
    if args.evaluate:
        return evaluate_saved_run(Path(args.evaluate), args.data_dir, resolve_device(args.device), args.workers)
    validate(args)
    # Under torchrun: join the process group (NCCL on CUDA, gloo on the CPU); otherwise a no-op.
    with distributed.session(resolve_device(args.device)) as device:
        return _train_main(args, device)


def _train_main(args, device: torch.device) -> int:
    backend = resolve_backend(args.backend, device)
    threads.apply_threads(args.threads)
    config = desc.train_identity(args)
    out = Path(args.out) if args.out else Path("runs") / desc.train_name(config)
    # fail on missing data first
    dataset = data_mod.load(args.dataset, args.data_dir, args.val_size, **_load_options(args))
    desc.check_fits_memory(args, dataset.input_shape, dataset.num_classes, device)  # before anything is written
    if distributed.world_size() > 1 and args.batch_size < distributed.world_size():
        raise UsageError(f"--batch-size is the global batch: it must be at least the number of processes "
                         f"({distributed.world_size()}), got {args.batch_size}")
    # Only rank 0 looks at and writes the run folder; the others get its answer (and the checkpoint
    # it read, so that resuming works without a shared file system).
    with contextlib.ExitStack() as held:
        # (rank 0 holds the run folder's lock until the run ends: see runs.exclusive)
        state, resume = distributed.run_on_main(_open_run_dir, out, config, args.resume, held)
        return _train_run(args, device, config, out, state, resume, backend, dataset)


def _train_run(args, device, config, out, state, resume, backend, dataset) -> int:
    say = print if distributed.is_main() else (lambda *_a, **_k: None)
    if state == "done":
        results = read_json_object(out / "results.json", hint_results(out)) if distributed.is_main() else {}
        say(f"{out} already holds this finished run: test accuracy {results.get('test_acc', 0):.2f}% "
            "(nothing recomputed)")
        return 0
    torch.manual_seed(args.seed)
    model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
    set_backend(model, backend)
    kind = "dense" if args.dense else f"supermask k={args.k}"
    keeper, extra = None, None
    if args.prune_at_init:  # the mask at init, held fixed while training
        keeper, extra = pai.prepare_training(model, config, dataset, device, resume)
        kind = f"dense, {args.prune_at_init} at init, k={args.k}" + (f", {args.pai_check}" if args.pai_check else "")
    ranks = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    say(f"{args.model} x{args.width:g} ({kind}) on {args.dataset}, {device}{ranks}, backend {backend} -> {out}")
    cfg = desc.training_config(config)
    if args.random_subnet:
        results = evaluate_untrained(model, dataset, cfg, device, out, config=config)
    else:
        results = train(model, dataset, cfg, device, out, resume, after_step=keeper, progress=not args.no_progress,
                        checkpoint_extra=extra, tensorboard=not args.no_tensorboard, config=config)
    speed = f"{results['seconds_per_epoch']:.2f} s/epoch" if results["seconds_per_epoch"] else "not trained"
    say(f"test accuracy {results['test_acc']:.2f}% (best {results['best_test_acc']:.2f}%, "
          f"top-5 {results['test_acc5']:.2f}%), {results['params_kept']}/{results['params_total']} weights kept, "
          f"{speed}; results in {out / 'results.json'}")
    return 0


def _load_options(args) -> dict:
    return {"workers": args.workers} if args.dataset in data_mod.STREAMED else {}


def _open_run_dir(out: Path, config: dict, resume: bool, held: contextlib.ExitStack):
    """storage.open_run with the checkpoint entries this run resumes from."""
    required = ("model",) if config.get("random_subnet") else RESUME_KEYS  # a random subnet is recomputed
    return open_run(out, config, resume, held, required)


def hint_results(out: Path) -> str:
    """What to do about a corrupted results.json of the run folder out (rewrite it from its checkpoint, or train
    again)."""
    return (f"; delete it and run the same command with --resume to write it again from {out / 'checkpoint.pt'}"
            if (out / "checkpoint.pt").is_file() else "; delete the run folder to train it again")


if __name__ == "__main__":
    sys.exit(run_main("python -m supermask.train", main, interrupted=INTERRUPTED))
