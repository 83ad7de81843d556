"""Instability analysis (linear mode connectivity) and stability to pruning.

    python -m supermask.instability --dataset fashion-mnist --epochs 5 --rewind-iters 0,50,200
    python -m supermask.instability --dataset fashion-mnist --epochs 5 --ticket runs/imp_... --round 4
    python -m supermask.instability --dataset fashion-mnist --epochs 5 --edge-popup --k 0.5

Frankle, Dziugaite, Roy & Carbin, "Linear mode connectivity and the lottery ticket hypothesis"
(ICML 2020): the network at rewind iteration k (k = 0: the initialisation) is trained to the end
twice, with two data orders (--data-seeds; same weights at k, same mask, same hyperparameters,
the learning-rate schedule continuing from k as imp --rewind-iter does). The test error of
(1 - a) W1 + a W2 is evaluated at --points evenly spaced a in [0, 1] (BatchNorm statistics
re-estimated on the training set at every point when the network has BatchNorm); the error
barrier is the largest error on the path minus the mean of the two end points' errors. The
network is "stable" at k when the barrier is below 2 percentage points.

What is analysed: the dense network (default); an IMP ticket (--ticket IMP_DIR --round R: the
mask of round R applied to the dense network's weights at iteration k, pruned weights held at
zero, so the path runs over the kept weights; the mask is the one that IMP run found, with its own
--rewind-iter, whereas the paper runs IMP again for every k); or an edge-popup supermask (--edge-popup --k K:
the scores are trained and interpolated, the masks follow from the interpolated scores). With a
ticket, also the stability to pruning of Frankle et al. 2019 ("Stabilizing the lottery ticket
hypothesis"): the L2 distance, over the ticket's kept weights, between the ticket trained from k
and the dense network trained from k (same data order), divided by the norm of the latter.

Everything is stored and never recomputed: the weights at each rewind iteration in
RUNS/instability_rewind_<...> (one partial training pass from the initialisation, data order of
--seed), each trained copy in its own training run folder RUNS/instability_copy_<...> named after
its configuration (a dense copy is shared by the dense analysis and a ticket's stability to
pruning), each path in OUT/path_kNNNNNN.json. OUT (default RUNS/instability_<...>) receives
instability.json, table.md and plot.png for the rewind iterations asked for.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import data as data_mod
from . import desc, stability, threads
from .cli import (Parser, add_backend, add_fields, add_model_args, add_training_args, list_type, resolve_backend,
                  resolve_device, run_main)
from .errors import UsageError
from .storage import exclusive

PROG = "python -m supermask.instability"
REWIND_ITERATION, DATA_SEED, POINTS = desc.pick(desc.ANALYSIS_FIELDS, "rewind_iteration", "data_seed", "points")


def parser() -> Parser:
    """The flags of python -m supermask.instability."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_fields(p, desc.pick(desc.TRAIN_FIELDS, "init"),
               init={"help": "weight init (default kaiming_normal; signed_constant with --edge-popup)"})
    p.add_argument("--rewind-iters", type=list_type(REWIND_ITERATION), default="0",
                   help="comma-separated rewind iterations k to analyse, e.g. 0,50,200 (default 0)")
    add_fields(p, [POINTS])
    p.add_argument("--data-seeds", type=list_type(DATA_SEED), default="1,2",
                   help="the two copies' data orders (default 1,2)")
    p.add_argument("--ticket", default=None, help="an IMP run folder: analyse its ticket of --round")
    add_fields(p, [desc.ROUND_FIELD], round={"default": None})
    p.add_argument("--edge-popup", action="store_true", help="analyse an edge-popup supermask (scores interpolated)")
    add_fields(p, desc.pick(desc.TRAIN_FIELDS, "k", "scale_fan", "topk"),
               k={"help": "with --edge-popup: fraction of weights kept (default 0.5)"},
               scale_fan={"help": "with --edge-popup: init with fan_in * k"},
               topk={"default": "layer", "help": "with --edge-popup: top-k scope"})
    add_training_args(p)
    add_backend(p, "edge-popup's mask implementation (as in supermask.train)")
    p.add_argument("--runs-dir", default="runs",
                   help="where rewind states and trained copies are stored (default runs/)")
    p.add_argument("--out", default=None,
                   help="folder for the results (default RUNS/instability_<name from the flags>)")
    return p


def validate(args):
    """Checks that need no data. Raises UsageError."""
    desc.check_training(args)
    desc.check_in_memory(args, "the instability analysis needs an in-memory dataset, not {dataset}")
    args.rewind_list = sorted(set(args.rewind_iters))
    if not args.rewind_list:
        raise UsageError("--rewind-iters is empty")
    args.data_seed_list = list(args.data_seeds)
    if len(args.data_seed_list) != 2:
        raise UsageError(f"--data-seeds takes two seeds (one per copy), got {args.data_seeds!r}")
    if args.ticket is not None and args.round is None:
        raise UsageError("--ticket needs --round R (the IMP round whose mask is analysed)")
    if args.round is not None and args.ticket is None:
        raise UsageError("--round needs --ticket IMP_DIR")
    if args.ticket is not None and args.edge_popup:
        raise UsageError("--ticket and --edge-popup analyse different networks: choose one")
    if args.init is None:
        args.init = "signed_constant" if args.edge_popup else "kaiming_normal"


def main(argv=None) -> int:
    """python -m supermask.instability: the rewind states, the two copies per rewind iteration, the error paths,
    then the table, plot and instability.json; returns the exit code."""
    args = parser().parse_args(argv)
    validate(args)
    device = resolve_device(args.device)
    backend = resolve_backend(args.backend, device) if args.edge_popup else "torch"
    threads.apply_threads(args.threads)
    config = desc.instability_identity(args)
    dataset = data_mod.load(args.dataset, args.data_dir, args.val_size)  # fail on missing data first
    desc.check_fits_memory(args, dataset.input_shape, dataset.num_classes, device)  # before anything is written
    stability.check_rewind_iters(args.rewind_list, args.epochs, args.batch_size, dataset)
    model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
    masks = stability.load_ticket(Path(args.ticket), args.round, config, model) if args.ticket else None
    mode = "ticket" if args.ticket else "edge-popup" if args.edge_popup else "dense"
    oconfig = stability.out_config(config, mode, masks, args.data_seed_list, args.points)
    runs_dir = Path(args.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UsageError(f"--runs-dir {runs_dir} exists and is not a folder")
    out = Path(args.out) if args.out else runs_dir / stability.out_name(oconfig, config)
    stability.prepare_out(out, runs_dir, oconfig)
    analysis = stability.Analysis(config, masks, args.data_seed_list, args.points, dataset, device, backend, runs_dir,
                                  progress=not args.no_progress, tensorboard=not args.no_tensorboard)
    with exclusive(out):
        rows, seconds = stability.analyse(analysis, args.rewind_list, out)
        stability.write_record(out, _title(args, masks), {"config": oconfig, "ticket": args.ticket,
                                                          "round": args.round, "rows": rows,
                                                          "seconds_this_call": seconds})
    print((out / "table.md").read_text())
    print(f"took {seconds['rewind_states']:.0f} s for rewind states, {seconds['copies']:.0f} s for copies, "
          f"{seconds['paths']:.0f} s for paths; wrote {out / 'instability.json'}, {out / 'table.md'}, "
          f"{out / 'plot.png'}")
    return 0


def _title(args, masks: dict | None) -> str:
    """The table's and plot's title: network, what is analysed, training, seeds."""
    kept = "" if masks is None else f", ticket of round {args.round} " \
        f"({100 * sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()):.1f}% weights)"
    kind = f"edge-popup k={args.k:g}" if args.edge_popup else "dense" if masks is None else "IMP"
    return (f"{args.model} x{args.width:g} ({kind}{kept}) on {args.dataset}, {args.epochs} epochs, seed "
            f"{args.seed}, data orders {args.data_seed_list[0]} and {args.data_seed_list[1]}")


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
