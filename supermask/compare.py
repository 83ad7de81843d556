"""Edge-popup supermasks vs lottery tickets (IMP, with controls) vs dense training, side by side.

    python -m supermask.compare --dataset fashion-mnist --epochs 10 --seeds 0 --rounds 8 --out docs/compare

Runs, or reuses, every run the comparison needs (edge-popup at each --ks and --widths through
supermask.train, dense training at each width, IMP tickets and --controls at each --imp-widths
through supermask.imp), each in --runs-dir under the name derived from its configuration, exactly
as those commands name them: a finished run is never recomputed, so a sweep can grow. Then writes
table.md, table.csv and plot.png (accuracy and early-stop iteration against % of weights
remaining, mean and min-max over seeds) into --out. --no-train only reads what is stored.
--pai adds pruning at initialisation (supermask.pai: the dense network's weights masked at init
and trained) at each --ks and --widths, i.e. at the sparsities of the edge-popup runs, and
--pai-checks their sanity checks (Frankle et al. 2021).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from . import comparison, desc, distributed, threads
from . import pai as pai_mod
from .cli import Parser, add_fields, add_training_args, list_type, resolve_backend, resolve_device, run_main
from .errors import UsageError, write_error
from .storage import check_writable

PROG = "python -m supermask.compare"


def _listed(value, f: desc.Field, flag: str) -> list:
    """A list flag's values: as its argparse type gave them, or, for compare called as a library
    with a string, parsed by the same type (cli.list_type(f)). Raises UsageError."""
    if not isinstance(value, str):
        return list(value)
    try:
        return list(list_type(f)(value))
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"argument {flag}: {e}") from None


WIDTH, SEED = desc.pick(desc.MODEL_FIELDS, "width", "seed")


def parser() -> Parser:
    """The flags of python -m supermask.compare."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_fields(p, desc.pick(desc.MODEL_FIELDS, "model", "dataset", "data_dir", "val_size"))
    p.add_argument("--seeds", type=list_type(SEED), default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--ks", type=list_type(desc.K_FIELD), default="0.1,0.3,0.5,0.7",
                   help="edge-popup fractions kept (default 0.1,0.3,0.5,0.7)")
    p.add_argument("--widths", type=list_type(WIDTH), default="1,2.5",
                   help="widths for edge-popup and dense (default 1,2.5)")
    p.add_argument("--imp-widths", type=list_type(WIDTH), default="1",
                   help="widths for IMP and its controls (default 1)")
    add_fields(p, desc.pick(desc.TRAIN_FIELDS, "init", "scale_fan"),
               init={"default": "signed_constant", "help": "edge-popup weight init"},
               scale_fan={"help": "edge-popup init with fan_in * k"})
    add_fields(p, desc.pick(desc.IMP_FIELDS, "rounds", "prune_rate", "scope", "rewind_iter", "val_every"),
               rounds={"default": 8, "help": "IMP pruning rounds after the dense round (default 8)"},
               prune_rate={"help": "IMP: fraction pruned per round (default 0.2)"},
               scope={"help": "IMP pruning scope (default layer)"},
               rewind_iter={"help": "IMP: rewind to this iteration (default 0: init)"},
               val_every={"help": "IMP: validation every this many iterations"})
    p.add_argument("--controls", default="reinit,random-mask",
                   help=f"IMP controls, comma-separated from {','.join(desc.CONTROLS)} ('' for none)")
    p.add_argument("--pai", default="",
                   help="pruning-at-init methods trained at each --ks, comma-separated from "
                        f"{','.join(pai_mod.METHODS)} (default: none)")
    p.add_argument("--pai-checks", default="",
                   help=f"sanity checks of every --pai method, comma-separated from {','.join(pai_mod.CHECKS)}")
    add_training_args(p)
    p.set_defaults(epochs=10)
    p.add_argument("--runs-dir", default="runs", help="where the runs are stored and reused (default runs/)")
    p.add_argument("--out", default="comparison", help="folder for table.md, table.csv, plot.png (and comparison.json, "
                                                       "the runs they were made from)")
    p.add_argument("--force", action="store_true", help="overwrite an --out that holds another comparison")
    p.add_argument("--no-train", action="store_true", help="only read stored runs; skip the missing ones")
    return p


def validate(args):
    """Check the flags and parse the comma-separated lists into args.*_list. Raises UsageError."""
    desc.check_training(args)  # model, dataset, and the training flags together (e.g. multistep's milestones)
    args.seed_list = _listed(args.seeds, SEED, "--seeds")
    args.k_list = _listed(args.ks, desc.K_FIELD, "--ks")
    args.width_list = _listed(args.widths, WIDTH, "--widths")
    args.imp_width_list = _listed(args.imp_widths, WIDTH, "--imp-widths")
    args.control_list = [c.strip() for c in args.controls.split(",") if c.strip()]
    if not args.seed_list:
        raise UsageError("--seeds is empty")
    if not args.width_list and not args.imp_width_list:
        raise UsageError("nothing to compare: --widths and --imp-widths are both empty")
    if args.width_list and not args.k_list:
        raise UsageError("--ks is empty: edge-popup at --widths needs at least one k")
    for c in args.control_list:
        if c not in desc.CONTROLS:
            raise UsageError(f"unknown control {c!r}; choose from {', '.join(desc.CONTROLS)}")
    args.pai_list = [m.strip() for m in args.pai.split(",") if m.strip()]
    args.pai_check_list = [c.strip() for c in args.pai_checks.split(",") if c.strip()]
    for m in args.pai_list:
        if m not in pai_mod.METHODS:
            raise UsageError(f"unknown pruning-at-init method {m!r}; choose from {', '.join(pai_mod.METHODS)}")
    for c in args.pai_check_list:
        if c not in pai_mod.CHECKS:
            raise UsageError(f"unknown --pai-checks entry {c!r}; choose from {', '.join(pai_mod.CHECKS)}")
    if args.pai_check_list and not args.pai_list:
        raise UsageError("--pai-checks needs --pai methods to check")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    runs = Path(args.runs_dir)
    if runs.exists() and not runs.is_dir():
        raise UsageError(f"--runs-dir {runs} exists and is not a folder")
    check_writable(out, "--out")  # before any training, not after
    if not args.no_train:
        check_writable(runs, "--runs-dir")


def main(argv=None) -> int:
    """python -m supermask.compare: plan the runs, run the missing ones (unless --no-train), write the table and
    plot; returns the exit code."""
    args = parser().parse_args(argv)
    validate(args)
    jobs = comparison.plan(args)  # validates every run's description before anything runs
    out = Path(args.out)
    comparison.check_out(out, [j.out.name for j in jobs], args.force)
    todo = [j for j in jobs if not j.done()]
    if todo and not args.no_train:
        print(f"{len(jobs)} runs, {len(todo)} to compute or finish, under {args.runs_dir}/")
        threads.apply_threads(args.threads)
        for job in tqdm(todo, desc="compare", disable=args.no_progress, dynamic_ncols=True):
            tqdm.write(f"[compare] {job.method} width {job.width:g} {job.setting or ''} seed {job.seed} -> {job.out}")
            # Under torchrun: the process group around each run, as each command had it.
            with distributed.session(resolve_device(args.device)) as device:
                job.run(device, resolve_backend("auto", device))
    elif todo:
        print(f"--no-train: {len(todo)} of {len(jobs)} runs are missing or unfinished; shown as far as they go")
    rows = [row for job in jobs for row in job.rows()]
    if not rows:
        raise UsageError(f"no finished runs to compare under {args.runs_dir}/ (drop --no-train to compute them)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(write_error(out, e)) from None
    title = (f"{args.model} on {args.dataset}, {args.epochs} epochs, seeds {','.join(map(str, args.seed_list))}")
    comparison.write_record(out, jobs, rows, title)
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'plot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main,
                      interrupted="interrupted; run the same command again: finished runs are reused, the "
                                  "interrupted one continues from its last finished epoch"))
