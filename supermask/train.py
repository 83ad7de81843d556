"""Train a supermask (edge-popup) or, with --dense, the same network's weights.

    python -m supermask.train --width 2.5 --k 0.5            # MNIST, LeNet-300-100 x 2.5, keep 50%
    python -m supermask.train --dataset fashion-mnist --dense # the dense baseline

Every run lives in its own folder (--out, default runs/<name from the hyperparameters>) holding
config.json, metrics.jsonl, checkpoint.pt and results.json. All flags: docs/commands.md (or --help).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import desc, distributed, threads, train_run
from .cli import (Parser, add_backend, add_fields, add_model_args, add_training_args, config_value, resolve_backend,
                  resolve_device, run_main)
from .errors import UsageError


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
        run_dir = Path(args.evaluate)
        test, results = train_run.evaluate_saved(run_dir, args.data_dir, resolve_device(args.device), args.workers)
        note = f" (stored: {results['test_acc']:.2f}%)" if isinstance(results.get("test_acc"), float | int) else ""
        print(f"{run_dir}: test top-1 {test['acc']:.2f}%{note}, top-5 {test['acc5']:.2f}%, loss {test['loss']:.4f}")
        return 0
    validate(args)
    # Under torchrun: join the process group (NCCL on CUDA, gloo on the CPU); otherwise a no-op.
    with distributed.session(resolve_device(args.device)) as device:
        backend = resolve_backend(args.backend, device)
        threads.apply_threads(args.threads)
        train_run.run(args, device, backend, args.out, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(run_main("python -m supermask.train", main, interrupted=INTERRUPTED))
