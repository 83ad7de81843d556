"""A comparison of edge-popup supermasks, lottery tickets (IMP, with controls), pruning at
initialisation and dense training: the library half of python -m supermask.compare.

plan turns a comparison's description (the compare command's values: networks, seeds, ks, widths,
IMP settings, training) into Jobs, one per run, each a run description (desc) checked once and
named as supermask.train or supermask.imp name that run, so a run either made is reused; Job.run
runs (or resumes) it through train_run or lottery; aggregate takes the finished runs' rows to mean,
standard deviation, min and max over seeds; write_table / write_plot / write_record write the
comparison's table.md, table.csv, plot.png and comparison.json (RECORD), check_out guards --out.
"""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from . import desc, lottery, train_run
from . import pai as pai_mod
from .errors import UsageError
from .runlog import markdown_table, pyplot, save_figure
from .storage import atomic_write, read_json_object, read_results, write_json

# The comparison's values every run takes as they are: each training field (desc.TRAINING_FIELDS,
# so a field added there reaches compare's runs by itself) and where and how fast it runs.
SHARED_FIELDS = tuple(f.name for f in (*desc.TRAINING_FIELDS, *desc.RUNTIME_FIELDS))
METHOD_ORDER = ("dense", "edge-popup", "IMP ticket", "IMP reinit", "IMP random-mask")
# Pruning at initialisation: "PaI <method>" and "PaI <method> <check>", after METHOD_ORDER.
PAI_ORDER = tuple(f"PaI {m}{c}" for m in pai_mod.METHODS for c in ("", *(f" {c}" for c in pai_mod.CHECKS)))


def method_rank(method: str) -> int:
    """The plot and table order of a method (METHOD_ORDER, then pruning at init by PAI_ORDER, then the rest)."""
    order = METHOD_ORDER + PAI_ORDER
    return order.index(method) if method in order else len(order)


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


def _common(args, seed: int, width: float) -> dict:
    """The description fields every run of the comparison at this seed and width shares: the
    network, data, seed and SHARED_FIELDS (training, where it runs). Width (and k, in plan) as ":g"
    prints them, as the runs were named when compare passed them to the commands as flags."""
    return {"model": args.model, "width": float(f"{width:g}"), "dataset": args.dataset, "data_dir": args.data_dir,
            "val_size": args.val_size, "seed": seed, **{name: getattr(args, name) for name in SHARED_FIELDS}}


class Job:
    """One run of the comparison: its description (a train run's, or an IMP run's with its kind
    "imp"), checked once; its folder (runs_dir/<its name>); whether it is finished."""

    def __init__(self, method: str, width: float, setting, seed: int, kind: str, values: dict, runs_dir: Path,
                 rounds: int = 0):
        self.method, self.width, self.setting, self.seed, self.kind = method, width, setting, seed, kind
        self.rounds = rounds
        if kind == "train":
            self.v = desc.defaults(desc.MODEL_FIELDS, desc.TRAIN_FIELDS, desc.TRAINING_FIELDS, desc.RUNTIME_FIELDS,
                                   **values)
            desc.check_train(self.v)
            self.out = train_run.default_out(desc.train_identity(self.v), runs_dir)
        else:
            self.v = desc.defaults(desc.MODEL_FIELDS, desc.IMP_FIELDS, desc.TRAINING_FIELDS, desc.RUNTIME_FIELDS,
                                   **values)
            desc.check_imp(self.v)
            self.out = lottery.default_out(desc.imp_identity(self.v), runs_dir)

    def done(self) -> bool:
        """Whether the run is finished (for IMP: every round asked for)."""
        if self.kind == "train":
            return (self.out / "results.json").is_file()
        first = 1 if self.method != "IMP ticket" else 0
        return all((self.out / f"round_{r:02d}" / "results.json").is_file() for r in range(first, self.rounds + 1))

    def run(self, device, backend: str, log=print):
        """Run (or resume) it on device: train_run.run with the mask backend (cli.resolve_backend's
        answer for auto), or lottery.run_description (a control's ticket run first, reused)."""
        if self.kind == "train":
            train_run.run(self.v, device, backend, self.out, resume=None, log=log)
        else:
            lottery.run_description(self.v, device, self.out, log=log)

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
            jobs.append(Job("dense", w, "dense", seed, "train", {**base, "dense": True}, runs))
            for k in args.k_list:
                k_g = float(f"{k:g}")
                ep = {**base, "k": k_g, "init": args.init, "scale_fan": args.scale_fan}
                jobs.append(Job("edge-popup", w, f"k={k:g}", seed, "train", ep, runs))
                for m in args.pai_list:  # the same sparsity, weights trained from a mask chosen at init
                    pai = {**base, "dense": True, "prune_at_init": m, "k": k_g}
                    jobs.append(Job(f"PaI {m}", w, f"k={k:g}", seed, "train", pai, runs))
                    for c in args.pai_check_list:
                        jobs.append(Job(f"PaI {m} {c}", w, f"k={k:g}", seed, "train", {**pai, "pai_check": c}, runs))
        for w in args.imp_width_list:
            base = {**_common(args, seed, w), "rounds": args.rounds, "prune_rate": args.prune_rate,
                    "scope": args.scope, "rewind_iter": args.rewind_iter, "val_every": args.val_every}
            jobs.append(Job("IMP ticket", w, None, seed, "imp", base, runs, args.rounds))
            for c in args.control_list:
                jobs.append(Job(f"IMP {c}", w, None, seed, "imp", {**base, "control": c}, runs, args.rounds))
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
    columns = ["method", "width", "setting", "weights remaining (%):", "weights kept:", "test acc (%):",
               "best test acc (%):", "early-stop iteration:", "s/epoch:", "seeds:"]
    rows = []
    for a in agg:
        n = a["seeds"]
        it = "-" if a["early_stop_iteration_mean"] is None else _pm(a["early_stop_iteration_mean"],
                                                                      a["early_stop_iteration_sd"], 0, n)
        rows.append([a["method"], f"{a['width']:g}", a["setting"], f"{a['weights_remaining']:.1f}",
                     str(a["weights_kept"]), _pm(a["test_acc_mean"], a["test_acc_sd"], 2, n),
                     _pm(a["best_test_acc_mean"], a["best_test_acc_sd"], 2, n), it,
                     f"{a['seconds_per_epoch_mean']:.2f}", str(n)])
    atomic_write(out / "table.md", markdown_table(title, columns, rows).encode())
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


def write_record(out: Path, jobs: list[Job], rows: list[dict], title: str) -> None:
    """table.md, table.csv and plot.png of the rows (aggregated) in out, then RECORD (the runs they
    were made from): last, once the table and plot are there."""
    agg = aggregate(rows)
    write_table(agg, out, title)
    write_plot(agg, out, title)
    write_json(out / RECORD, {"command": "compare", "runs": [j.out.name for j in jobs]})
