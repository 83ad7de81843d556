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

import sys
from pathlib import Path

from tqdm.auto import tqdm

from . import comparison, desc, distributed, threads
from . import pai as pai_mod
from .cli import Parser, add_fields, add_training_args, number, resolve_backend, resolve_device, run_main
from .errors import UsageError, write_error
from .data import DATASETS
from .init import INITS
from .models import MODELS
from .storage import check_writable

PROG = "python -m supermask.compare"


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be a comma-separated list of numbers, got {text!r}") from None
    return values


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None


WIDTHS = number(float, 0, low_open=True, list_of=True)


def parser() -> Parser:
    """The flags of python -m supermask.compare."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fc", help=f"architecture: {', '.join(MODELS)} (default fc)")
    p.add_argument("--dataset", default="mnist", help=f"{', '.join(DATASETS)} (default mnist)")
    p.add_argument("--data-dir", default="data", help="where datasets are found or downloaded (default ./data)")
    add_fields(p, [f for f in desc.MODEL_FIELDS if f.name == "val_size"])
    p.add_argument("--seeds", type=number(int, 0, desc.SEED_MAX, list_of=True), default="0",
                   help="comma-separated seeds (default 0)")
    p.add_argument("--ks", type=number(float, 0, 1, low_open=True, list_of=True), default="0.1,0.3,0.5,0.7",
                   help="edge-popup fractions kept (default 0.1,0.3,0.5,0.7)")
    p.add_argument("--widths", type=WIDTHS, default="1,2.5", help="widths for edge-popup and dense (default 1,2.5)")
    p.add_argument("--imp-widths", type=WIDTHS, default="1", help="widths for IMP and its controls (default 1)")
    p.add_argument("--init", choices=INITS, default="signed_constant", help="edge-popup weight init")
    p.add_argument("--scale-fan", action="store_true", help="edge-popup init with fan_in * k")
    add_fields(p, desc.pick(desc.IMP_FIELDS, "rounds", "prune_rate", "scope", "rewind_iter", "val_every"),
               rounds={"default": 8, "help": "IMP pruning rounds after the dense round (default 8)"},
               prune_rate={"help": "IMP: fraction pruned per round (default 0.2)"},
               scope={"help": "IMP pruning scope (default layer)"},
               rewind_iter={"help": "IMP: rewind to this iteration (default 0: init)"},
               val_every={"help": "IMP: validation every this many iterations"})
    p.add_argument("--controls", default="reinit,random-mask",
                   help="IMP controls, comma-separated from reinit,random-mask ('' for none)")
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
    # (the lists are parsed and range-checked by their argparse types; strings when called as a library)
    args.seed_list = _ints(args.seeds, "--seeds") if isinstance(args.seeds, str) else list(args.seeds)
    args.k_list = _floats(args.ks, "--ks") if isinstance(args.ks, str) else list(args.ks)
    args.width_list = _floats(args.widths, "--widths") if isinstance(args.widths, str) else list(args.widths)
    args.imp_width_list = (_floats(args.imp_widths, "--imp-widths") if isinstance(args.imp_widths, str)
                           else list(args.imp_widths))
    args.control_list = [c.strip() for c in args.controls.split(",") if c.strip()]
    if not args.seed_list:
        raise UsageError("--seeds is empty")
    if not args.width_list and not args.imp_width_list:
        raise UsageError("nothing to compare: --widths and --imp-widths are both empty")
    if args.width_list and not args.k_list:
        raise UsageError("--ks is empty: edge-popup at --widths needs at least one k")
    for k in args.k_list:
        if not 0 < k <= 1:
            raise UsageError(f"--ks values must be in (0, 1], got {k:g}")
    for w in args.width_list + args.imp_width_list:
        if not w > 0:
            raise UsageError(f"widths must be > 0, got {w:g}")
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
