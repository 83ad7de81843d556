"""Learn a sequence of tasks on one frozen random network, one supermask per task (SupSup).

    python -m supermask.tasks --benchmark permuted --tasks 20 --epochs 2 --dataset fashion-mnist
    python -m supermask.tasks --benchmark split --tasks 5 --epochs 2 --dataset fashion-mnist

permuted: task 0 the images as they are, task t one fixed pixel permutation (by --seed and t);
split: task t the classes 2t and 2t+1, labelled 0/1. After each task every task learned so far is
evaluated with the task given (the accuracy matrix) and SupSup's one-shot task inference is scored on
test batches of 128; at the end also its binary variant. OUT (default runs/tasks_<name from the
flags>) holds config.json, one task_NNN.pt per finished task (its masks at 1 bit per weight), then
results.json, matrix.csv, table.md and plot.png. Running the same command again continues after the
last finished task, or only reads a finished run. The library part: supermask.sequences.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import data as data_mod
from . import desc, threads
from .cli import Parser, add_fields, number, run_main
from .sequences import BENCHMARKS, SEQUENCE_DATASETS, VAL_SIZE, run_sequence, sequence_config, sequence_name
from .storage import check_writable

PROG = "python -m supermask.tasks"
# What Ctrl-C prints: the finished tasks are stored, the one being learned starts again.
INTERRUPTED = "interrupted; run the same command again to continue after the last finished task"
FIELDS = {f.name: f for f in (*desc.MODEL_FIELDS, *desc.TRAIN_FIELDS, *desc.RUNTIME_FIELDS)}


def parser() -> Parser:
    """The flags of python -m supermask.tasks."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", choices=BENCHMARKS, default="permuted",
                   help="permuted (one pixel permutation per task) or split (2 classes per task, at most 5 tasks)")
    p.add_argument("--tasks", type=number(int, 2, 1000), default=5, help="number of tasks, in [2, 1000]")
    p.add_argument("--epochs", type=number(int, 1, 1000), default=1, help="training epochs per task")
    add_fields(p, [FIELDS["width"], FIELDS["k"], FIELDS["seed"]])
    p.add_argument("--dataset", choices=SEQUENCE_DATASETS, default="fashion-mnist",
                   help="the images the tasks are made from (synthetic: small, for tests)")
    add_fields(p, [FIELDS["data_dir"]])
    p.add_argument("--baselines", type=number(int, 0, 999), default=0,
                   help="also train single-task edge-popup runs (a fresh network each) of tasks 1..N, to compare")
    p.add_argument("--out", default=None, help="run folder (default runs/<name derived from the flags>)")
    add_fields(p, [FIELDS["threads"], FIELDS["no_progress"]])
    return p


def main(argv=None) -> int:
    """python -m supermask.tasks: flags -> supermask.sequences.run_sequence -> a summary; returns the exit code."""
    args = parser().parse_args(argv)
    config = sequence_config(args.benchmark, args.tasks, args.epochs, args.width, args.k, args.seed, args.dataset,
                             args.baselines)
    out = Path(args.out) if args.out else Path("runs") / sequence_name(config)
    check_writable(out)
    threads.apply_threads(args.threads)
    dataset = data_mod.load(args.dataset, args.data_dir, val_size=VAL_SIZE)
    print(f"{args.benchmark} {args.dataset}: {args.tasks} tasks on one random fc x{args.width:g} "
          f"(k={args.k:g}, {args.epochs} epoch(s) per task) -> {out}")
    results = run_sequence(config, out, dataset, "cpu", progress=not args.no_progress)
    inf = results["inference"]
    print(f"mean test accuracy with the task given {results['mean_acc']:.2f}% (min {results['min_acc']:.2f}%); "
          f"task inference on {inf['batches']} batches of {inf['batch_size']}: one-shot {100 * inf['one-shot']:.2f}%, "
          f"binary {100 * inf['binary']:.2f}%; {results['bytes_per_task']:,} bytes per task; "
          f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main, interrupted=INTERRUPTED))
