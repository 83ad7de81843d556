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

import csv
import io
import statistics
import sys
from pathlib import Path

from tqdm.auto import tqdm

from . import imp as imp_mod
from . import pai as pai_mod
from . import train as train_mod
from . import desc
from .cli import Parser, number, run_main
from .flags import add_fields, add_training_args
from .data import DATASETS
from .init import INITS
from .models import MODELS
from .pruning import SCOPES
from .runlog import pyplot, save_figure
from .errors import UsageError, write_error
from .storage import atomic_write, check_writable, read_json_object, read_results, write_json

PROG = "python -m supermask.compare"
TRAINING_FLAGS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule")
METHOD_ORDER = ("dense", "edge-popup", "IMP ticket", "IMP reinit", "IMP random-mask")
# Pruning at initialisation: "PaI <method>" and "PaI <method> <check>", after METHOD_ORDER.
PAI_ORDER = tuple(f"PaI {m}{c}" for m in pai_mod.METHODS for c in ("", *(f" {c}" for c in pai_mod.CHECKS)))


def method_rank(method: str) -> int:
    """The plot and table order of a method (METHOD_ORDER, then pruning at init by PAI_ORDER, then the rest)."""
    order = METHOD_ORDER + PAI_ORDER
    return order.index(method) if method in order else len(order)


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
    p.add_argument("--rounds", type=imp_mod.ROUNDS, default=8,
                   help="IMP pruning rounds after the dense round (default 8)")
    p.add_argument("--prune-rate", type=imp_mod.PRUNE_RATE, default=0.2,
                   help="IMP: fraction pruned per round (default 0.2)")
    p.add_argument("--scope", choices=SCOPES, default="layer", help="IMP pruning scope (default layer)")
    p.add_argument("--rewind-iter", type=number(int, 0), default=0,
                   help="IMP: rewind to this iteration (default 0: init)")
    p.add_argument("--val-every", type=number(int, 0), default=100, help="IMP: validation every this many iterations")
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
    if args.model not in MODELS:
        raise UsageError(f"unknown model {args.model!r}; choose from {', '.join(MODELS)}")
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
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
        if c not in imp_mod.CONTROLS:
            raise UsageError(f"unknown control {c!r}; choose from {', '.join(imp_mod.CONTROLS)}")
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


RECORD = "comparison.json"  # in --out: which runs its table and plot were made from


def check_out(out: Path, runs: list[str], force: bool) -> None:
    """UsageError unless --out may take this comparison's table and plot: empty or missing, or
    holding this same comparison (its RECORD names the same runs), or --force. A folder holding
    another comparison, or files of its own, is never overwritten silently."""
    if not out.is_dir() or not any(p.name != ".lock" for p in out.iterdir()) or force:
        return
    record = out / RECORD
    stored = read_json_object(record, "; pass --force to overwrite --out") if record.is_file() else None
    if stored is None or stored.get("runs") != runs:
        what = "another comparison" if stored is not None else "files not written by this comparison"
        raise UsageError(f"--out {out} holds {what}; pass --force to overwrite it or choose another --out")


def _common(args, seed: int, width: float) -> list[str]:
    argv = ["--model", args.model, "--width", f"{width:g}", "--dataset", args.dataset, "--data-dir", args.data_dir,
            "--val-size", str(args.val_size), "--seed", str(seed)]
    for flag in TRAINING_FLAGS:
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    argv += ["--device", args.device, "--threads", str(args.threads)]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


class Job:
    """One run of supermask.train or supermask.imp: its argv, its folder, whether it is finished."""

    def __init__(self, method: str, width: float, setting, seed: int, kind: str, argv: list[str], runs_dir: Path,
                 rounds: int = 0):
        self.method, self.width, self.setting, self.seed, self.kind = method, width, setting, seed, kind
        self.rounds = rounds
        if kind == "train":
            a = train_mod.parser().parse_args(argv)
            train_mod.validate(a)
            self.out = runs_dir / desc.train_name(desc.train_identity(a))
        else:
            a = imp_mod.parser().parse_args(argv)
            imp_mod.validate(a)
            self.out = imp_mod.default_out(desc.imp_identity(a), runs_dir)
        self.argv = [*argv, "--out", str(self.out)]

    def done(self) -> bool:
        """Whether the run is finished (for IMP: every round asked for)."""
        if self.kind == "train":
            return (self.out / "results.json").is_file()
        first = 1 if self.method != "IMP ticket" else 0
        return all((self.out / f"round_{r:02d}" / "results.json").is_file() for r in range(first, self.rounds + 1))

    def run(self):
        """Run (or resume) it with the train or imp command."""
        if self.kind == "train":
            resume = ["--resume"] if (self.out / "config.json").is_file() else []
            train_mod.main([*self.argv, *resume])
        else:
            imp_mod.main(self.argv)

    def rows(self) -> list[dict]:
        """One row per point of the plot (a finished run, or each finished round of an IMP run)."""
        if self.kind == "train":
            if not (self.out / "results.json").is_file():
                return []
            res = read_results(self.out, read_json_object(self.out / "config.json"))
            return [self._row(self.setting, res)]
        if not (self.out / "results.json").is_file():
            return []
        res = read_results(self.out, read_json_object(self.out / "config.json"))
        return [self._row(f"round {r['round']}", r) for r in res["rounds"] if r["round"] <= self.rounds]

    def _row(self, setting, res) -> dict:
        kept = res.get("weights_kept", res.get("params_kept"))
        total = res.get("weights_total", res.get("params_total"))
        return {"method": self.method, "width": self.width, "setting": setting, "seed": self.seed,
                "weights_remaining": res["weights_remaining"], "weights_kept": kept, "weights_total": total,
                "test_acc": res["test_acc"], "best_test_acc": res["best_test_acc"],
                "early_stop_iteration": res["early_stop_iteration"], "seconds_per_epoch": res["seconds_per_epoch"],
                "run": str(self.out)}


def plan(args) -> list[Job]:
    """Every run the comparison needs: dense, edge-popup (and pruning at init) per width, k and seed; IMP and its
    controls per IMP width and seed."""
    runs = Path(args.runs_dir)
    jobs = []
    for seed in args.seed_list:
        for w in args.width_list:
            base = _common(args, seed, w)
            jobs.append(Job("dense", w, "dense", seed, "train", [*base, "--dense"], runs))
            for k in args.k_list:
                extra = ["--k", f"{k:g}", "--init", args.init] + (["--scale-fan"] if args.scale_fan else [])
                jobs.append(Job("edge-popup", w, f"k={k:g}", seed, "train", [*base, *extra], runs))
                for m in args.pai_list:  # the same sparsity, weights trained from a mask chosen at init
                    pai = [*base, "--dense", "--prune-at-init", m, "--k", f"{k:g}"]
                    jobs.append(Job(f"PaI {m}", w, f"k={k:g}", seed, "train", pai, runs))
                    for c in args.pai_check_list:
                        jobs.append(Job(f"PaI {m} {c}", w, f"k={k:g}", seed, "train", [*pai, "--pai-check", c], runs))
        for w in args.imp_width_list:
            base = [*_common(args, seed, w), "--rounds", str(args.rounds), "--prune-rate", str(args.prune_rate),
                    "--scope", args.scope, "--rewind-iter", str(args.rewind_iter), "--val-every", str(args.val_every)]
            jobs.append(Job("IMP ticket", w, None, seed, "imp", base, runs, args.rounds))
            for c in args.control_list:
                jobs.append(Job(f"IMP {c}", w, None, seed, "imp", [*base, "--control", c], runs, args.rounds))
    return jobs


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean, standard deviation, min and max over seeds of every (method, width, setting)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["width"], row["setting"]), []).append(row)

    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None, None, None
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), sd, min(values), max(values)

    out = []
    for (method, width, setting), group in groups.items():
        agg = {"method": method, "width": width, "setting": setting, "seeds": len(group),
               "weights_remaining": statistics.fmean(r["weights_remaining"] for r in group),
               "weights_kept": round(statistics.fmean(r["weights_kept"] for r in group))}
        for key in ("test_acc", "best_test_acc", "early_stop_iteration", "seconds_per_epoch"):
            agg[f"{key}_mean"], agg[f"{key}_sd"], agg[f"{key}_min"], agg[f"{key}_max"] = stats(
                [r[key] for r in group])
        out.append(agg)
    out.sort(key=lambda a: (method_rank(a["method"]), a["width"], -a["weights_remaining"]))
    return out


def _pm(mean, sd, digits=2, n=1):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def write_table(agg: list[dict], out: Path, title: str):
    """table.md and table.csv in out: accuracy (mean +- sd over seeds) by method, width and setting."""
    lines = [f"**{title}**", "",
             "| method | width | setting | weights remaining (%) | weights kept | test acc (%) | best test acc (%) "
             "| early-stop iteration | s/epoch | seeds |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a in agg:
        n = a["seeds"]
        it = "-" if a["early_stop_iteration_mean"] is None else _pm(a["early_stop_iteration_mean"],
                                                                      a["early_stop_iteration_sd"], 0, n)
        lines.append(f"| {a['method']} | {a['width']:g} | {a['setting']} | {a['weights_remaining']:.1f} | "
                     f"{a['weights_kept']} | {_pm(a['test_acc_mean'], a['test_acc_sd'], 2, n)} | "
                     f"{_pm(a['best_test_acc_mean'], a['best_test_acc_sd'], 2, n)} | {it} | "
                     f"{a['seconds_per_epoch_mean']:.2f} | {n} |")
    atomic_write(out / "table.md", ("\n".join(lines) + "\n").encode())
    rows = io.StringIO(newline="")
    writer = csv.DictWriter(rows, fieldnames=list(agg[0]) if agg else ["method"])
    writer.writeheader()
    writer.writerows(agg)
    atomic_write(out / "table.csv", rows.getvalue().encode())


def write_plot(agg: list[dict], out: Path, title: str):
    """plot.png in out: test accuracy against the weights remaining, one line per method and width."""
    import matplotlib  # noqa: PLC0415 (the axes' formatters)

    plt = pyplot()
    fig, (ax_acc, ax_es) = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines: dict[tuple, list[dict]] = {}
    for a in agg:
        lines.setdefault((a["method"], a["width"]), []).append(a)
    styles = {"edge-popup": "o-", "IMP ticket": "s-", "IMP reinit": "v--", "IMP random-mask": "^:"}
    for i, ((method, width), pts) in enumerate(lines.items()):
        colour = colours[i % len(colours)]
        label = f"{method}, width {width:g}"
        if method == "dense":
            p = pts[0]
            lo, hi = p["test_acc_min"], p["test_acc_max"]
            ax_acc.axhline(p["test_acc_mean"], color=colour, lw=1, ls="-.", label=f"{label} (min-max band)")
            ax_acc.axhspan(lo - 0.05, hi + 0.05, color=colour, alpha=0.15)
            if p["early_stop_iteration_mean"] is not None:
                ax_es.axhline(p["early_stop_iteration_mean"], color=colour, lw=1, ls="-.", label=label)
            continue
        pts = sorted(pts, key=lambda q: -q["weights_remaining"])
        x = [q["weights_remaining"] for q in pts]
        style = styles.get(method) or ("x--" if method.endswith(pai_mod.CHECKS) else "d-")
        ax_acc.plot(x, [q["test_acc_mean"] for q in pts], style, color=colour, label=label, ms=4)
        if any(q["seeds"] > 1 for q in pts):
            ax_acc.fill_between(x, [q["test_acc_min"] for q in pts], [q["test_acc_max"] for q in pts],
                                color=colour, alpha=0.15)
        es = [(q["weights_remaining"], q) for q in pts if q["early_stop_iteration_mean"] is not None]
        if es:
            ax_es.plot([e[0] for e in es], [e[1]["early_stop_iteration_mean"] for e in es], styles.get(method, "o-"),
                       color=colour, label=label, ms=4)
            if any(q["seeds"] > 1 for _, q in es):
                ax_es.fill_between([e[0] for e in es], [e[1]["early_stop_iteration_min"] for e in es],
                                   [e[1]["early_stop_iteration_max"] for e in es], color=colour, alpha=0.15)
    for ax in (ax_acc, ax_es):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%), log scale")
        ax.grid(True, which="both", alpha=0.3)
        ticks = [100, 70, 50, 30, 20, 10, 5, 2, 1]
        lo = min((a["weights_remaining"] for a in agg), default=1)
        ax.set_xticks([t for t in ticks if t >= lo * 0.9])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_acc.set_ylabel("final test accuracy (%)")
    ax_acc.set_title("accuracy (lines: mean; shade: min-max over seeds)")
    ax_es.set_ylabel("early-stop iteration (min. validation loss)")
    ax_es.set_title("early-stop iteration (IMP every --val-every its; train runs per epoch)")
    accs = [a["test_acc_mean"] for a in agg if a["test_acc_mean"] is not None]
    if accs:  # zoom on the interesting range, but never hide a point
        ax_acc.set_ylim(max(min(accs) - 1.0, min(a["test_acc_min"] for a in agg) - 1.0), max(accs) + 1.0)
    ax_acc.legend(fontsize=8, loc="lower left")
    ax_es.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    save_figure(fig, out / "plot.png", dpi=120)


def main(argv=None) -> int:
    """python -m supermask.compare: plan the runs, run the missing ones (unless --no-train), write the table and
    plot; returns the exit code."""
    args = parser().parse_args(argv)
    validate(args)
    jobs = plan(args)  # validates every sub-run's flags before anything runs
    out = Path(args.out)
    check_out(out, [j.out.name for j in jobs], args.force)
    todo = [j for j in jobs if not j.done()]
    if todo and not args.no_train:
        print(f"{len(jobs)} runs, {len(todo)} to compute or finish, under {args.runs_dir}/")
        for job in tqdm(todo, desc="compare", disable=args.no_progress, dynamic_ncols=True):
            tqdm.write(f"[compare] {job.method} width {job.width:g} {job.setting or ''} seed {job.seed} -> {job.out}")
            job.run()
    elif todo:
        print(f"--no-train: {len(todo)} of {len(jobs)} runs are missing or unfinished; shown as far as they go")
    rows = [row for job in jobs for row in job.rows()]
    if not rows:
        raise UsageError(f"no finished runs to compare under {args.runs_dir}/ (drop --no-train to compute them)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(write_error(out, e)) from None
    agg = aggregate(rows)
    title = (f"{args.model} on {args.dataset}, {args.epochs} epochs, seeds {','.join(map(str, args.seed_list))}")
    write_table(agg, out, title)
    write_plot(agg, out, title)
    write_json(out / RECORD, {"command": "compare", "runs": [j.out.name for j in jobs]})  # last: the record
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'plot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main,
                      interrupted="interrupted; run the same command again: finished runs are reused, the "
                                  "interrupted one continues from its last finished epoch"))
