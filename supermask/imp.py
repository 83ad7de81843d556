"""Lottery tickets by iterative magnitude pruning (Frankle & Carbin), with rewinding and controls.

    python -m supermask.imp --dataset fashion-mnist --rounds 8 --epochs 10    # LeNet-300-100
    python -m supermask.imp --dataset fashion-mnist --rounds 8 --epochs 10 --control reinit

Round 0 trains the dense network; every later round prunes --prune-rate of the surviving weights
of smallest magnitude (the output layer at half that rate), resets the survivors to their initial
values (or, with --rewind-iter K, to their values after K iterations of round 0) and trains again
(rewound: from iteration K to the end, the batches and learning-rate schedule continuing from K,
as open_lth does; the controls too).
Pruned weights stay exactly zero: their gradients are masked and they are re-zeroed after every
step. Controls train on the ticket's masks: --control reinit (same masks, fresh random weights,
Liu et al.) and --control random-mask (random masks of the same per-layer sparsity, original
weights); they need the ticket run, which is run or reused first (--ticket, default beside --out).

OUT (default runs/imp_<name derived from the flags>) holds config.json, init.pt (rewind.pt),
round_00 ... round_NN (each a training run folder whose checkpoint.pt also holds the round's
"masks") and results.json with one row per round. Re-running the same command recomputes
nothing; an interrupted round resumes from its last epoch; a larger --rounds extends the run.
"""
from __future__ import annotations

import sys

from . import desc, distributed, lottery, threads
from .cli import Parser, add_fields, add_model_args, add_training_args, resolve_device, run_main

PROG = "python -m supermask.imp"


def parser() -> Parser:
    """The flags of python -m supermask.imp (from the run description's fields, supermask.desc)."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_fields(p, desc.IMP_FIELDS)
    add_training_args(p)
    p.add_argument("--out", default=None, help="run folder (default runs/<name derived from the flags>)")
    p.add_argument("--ticket", default=None,
                   help="with --control: the ticket run folder (default: beside --out, named from the flags)")
    return p


def validate(args) -> None:
    """The description's checks (desc.check_imp); fills in --output-prune-rate's default. Raises UsageError."""
    desc.check_imp(args)


def main(argv=None) -> int:
    """python -m supermask.imp: the ticket run (first, for a control) and the IMP run's rounds; returns the exit
    code."""
    args = parser().parse_args(argv)
    validate(args)
    # Under torchrun: join the process group (NCCL on CUDA, gloo on the CPU); otherwise a no-op.
    with distributed.session(resolve_device(args.device)) as device:
        threads.apply_threads(args.threads)
        out, results = lottery.run_description(args, device, args.out, args.ticket)
        if distributed.is_main():
            print(lottery.format_rounds([row for row in results["rounds"] if row["round"] <= args.rounds]))
            print(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main,
                      interrupted="interrupted; run the same command again: it continues the interrupted round from "
                                  "its last finished epoch (or starts that round again if none finished)"))
