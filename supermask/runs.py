"""The run list: python -m supermask.runs [DIR] [--sort KEY] [--where KEY=VALUE ...] [--json | --csv].

Finds the run folders under DIR (those of supermask.train and supermask.imp, with IMP rounds) and
says what each computes, how far it got, its test accuracy and its state. The folders themselves
are written and read by supermask.storage.
"""
from __future__ import annotations

import csv
import json
import sys
import zipfile
from pathlib import Path

from . import desc, storage
from .cli import Parser, run_main
from .errors import UsageError

RUN_FILES = ("config.json", "checkpoint.pt", "metrics.jsonl", "results.json")
COLUMNS = ("name", "command", "model", "width", "k_or_round", "dataset", "seed", "epochs", "test_acc", "state")


def _read_json(path: Path):
    """The JSON in path; None when there is no such file; raises ValueError when it is unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(path.name) from None


def _metrics_rows(path: Path) -> list[dict]:
    """The complete rows of metrics.jsonl (a line cut short by a crash is not counted)."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def describe_run(run_dir: Path, root: Path) -> dict:
    """One row of the run list: the COLUMNS, plus "config" (config.json, {} when unreadable) and
    "problem" (why a broken run is broken, else None).

    state: "finished" (results.json carrying this run's config and every required key with values
    of the right type, storage.results_problem; for an IMP run every planned round finished; for
    an instability analysis its instability.json), "unfinished" (config.json but not finished
    yet: resume it with --resume, or rerun the command), or "broken" (config.json missing,
    corrupted or holding a value its flag refuses (desc.config_problem), results.json corrupted
    or another run's, or a checkpoint.pt that is not a complete torch.save file (a zip archive),
    e.g. truncated by a full disk). A damaged folder is one broken row, never an error."""
    run_dir = Path(run_dir)
    row = dict.fromkeys(COLUMNS)
    row.update(name=run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name, config={},
               problem=None)
    try:
        config = _read_json(run_dir / "config.json")
        results = _read_json(run_dir / "results.json")
    except ValueError as e:
        return {**row, "state": "broken", "problem": f"{e} is corrupted"}
    if not isinstance(config, dict):
        problem = "no config.json" if config is None else "config.json is not an object"
        return {**row, "state": "broken", "problem": problem}
    row["config"] = config
    command = config.get("command")
    if command == "imp" and "round" in config:  # a round folder (its config is the IMP run's plus "round")
        command = "imp-round"
    row.update(command=command, model=config.get("model"), width=config.get("width"),
               dataset=config.get("dataset"), seed=config.get("seed"))
    problem = desc.config_problem(config)
    problem = f"config.json: {problem}" if problem else None
    if problem is None and results is not None:
        why = storage.results_problem(results, config)
        problem = f"results.json: {why}" if why else None
    ckpt = run_dir / "checkpoint.pt"
    if problem is None and ckpt.is_file() and not zipfile.is_zipfile(ckpt):
        problem = "checkpoint.pt is truncated or corrupted"
    if problem:
        return {**row, "state": "broken", "problem": problem}
    if command == "imp":
        return _imp_row(row, config, results)
    if command == "instability":
        return _analysis_row(row, run_dir, config)
    return _training_row(row, run_dir, config, results, command)


def _imp_row(row: dict, config: dict, results: dict | None) -> dict:
    """A whole IMP run: rounds finished of planned, the last round's test accuracy."""
    planned = config.get("rounds", 0)
    first = 1 if config.get("control") else 0
    done = results["rounds"] if results is not None else []
    finished = {r["round"] for r in done} >= set(range(first, planned + 1))
    row.update(k_or_round=f"rounds {len(done)}/{planned + 1 - first}",
               epochs=f"{sum(r['epochs'] for r in done)}/{(planned + 1 - first) * config.get('epochs', 0)}",
               test_acc=done[-1]["test_acc"] if done else None, state="finished" if finished else "unfinished")
    return row


def _analysis_row(row: dict, run_dir: Path, config: dict) -> dict:
    """An instability analysis (its mode: dense, edge-popup or ticket): finished once instability.json
    holds this analysis' config and a row per rewind iteration."""
    try:
        record = _read_json(run_dir / "instability.json")
    except ValueError:
        return {**row, "state": "broken", "problem": "instability.json is corrupted"}
    row["k_or_round"] = config.get("mode")
    if record is None:
        return {**row, "state": "unfinished"}
    if not isinstance(record, dict) or record.get("config") != config or not isinstance(record.get("rows"), list):
        return {**row, "state": "broken", "problem": "instability.json is not this analysis' record"}
    return {**row, "state": "finished"}


def _training_row(row: dict, run_dir: Path, config: dict, results: dict | None, command) -> dict:
    """A train run, an IMP round or an instability copy: epochs done, test accuracy."""
    metrics = _metrics_rows(run_dir / "metrics.jsonl")
    if command == "imp-round":
        row["k_or_round"] = f"round {config.get('round')}"
    elif command == "instability-copy":
        row["k_or_round"] = f"copy k{config.get('rewind_iteration')} d{config.get('data_seed')}"
    else:
        row["k_or_round"] = "dense" if config.get("dense") else config.get("k")
    last = metrics[-1].get("test_acc") if metrics else None
    if results is not None:
        return {**row, "epochs": f"{results['epochs']}/{config.get('epochs', '?')}", "test_acc": results["test_acc"],
                "state": "finished"}
    return {**row, "epochs": f"{len(metrics)}/{config.get('epochs', '?')}",
            "test_acc": last if type(last) in (int, float) else None, "state": "unfinished"}


def find_runs(root: Path) -> list[Path]:
    """Every folder under root (root included) holding one of a run's files (RUN_FILES), sorted."""
    root = Path(root)
    found = {p.parent for name in RUN_FILES for p in root.rglob(name)}
    return sorted(found)


def _value(text: str):
    """A --where value as JSON when it parses (0.5, true, null, "x"), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _field(row: dict, key: str):
    """A column of the row, or else a key of its config (MISSING when neither has it)."""
    if key in row and key not in ("config", "problem"):
        return row[key]
    return row["config"].get(key, _MISSING)


_MISSING = object()


def _sort_key(value):
    """Numbers before strings before missing values, each in their own order."""
    if value is _MISSING or value is None:
        return (2, 0, "")
    if isinstance(value, bool | int | float):
        return (0, float(value), "")
    text = str(value)
    if "/" in text and text.split("/")[0].isdigit():  # epochs "3/15": by epochs done
        return (0, float(text.split("/")[0]), text)
    return (1, 0, text)


def list_runs(root: Path, where: list[str] = (), sort: str = "name") -> list[dict]:
    """describe_run of every run under root, filtered by where (["key=value", ...]: a column or any
    config key equal to value, numbers compared as numbers) and sorted by a column or config key.
    Raises UsageError for a malformed filter or a key that no run has."""
    rows = [describe_run(d, Path(root)) for d in find_runs(root)]
    for cond in where:
        key, sep, text = cond.partition("=")
        if not sep or not key:
            raise UsageError(f"--where expects KEY=VALUE, got {cond!r}")
        if rows and all(_field(r, key) is _MISSING for r in rows):
            raise UsageError(f"--where {key}: no run has a column or config key {key!r}")
        wanted = _value(text)
        rows = [r for r in rows if _field(r, key) == wanted or str(_field(r, key)) == text]
    if rows and sort != "name" and all(_field(r, sort) is _MISSING for r in rows):
        raise UsageError(f"--sort {sort}: no run has a column or config key {sort!r}")
    return sorted(rows, key=lambda r: (_sort_key(_field(r, sort)), r["name"]))


def format_table(rows: list[dict]) -> str:
    """The run list as an aligned text table (one line per run; the reason a broken run is broken
    after it)."""
    def cell(key, value):
        if value is None:
            return "-"
        if key == "test_acc":
            return f"{value:.2f}"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    table = [list(COLUMNS)] + [[cell(k, r[k]) for k in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    for i, r in enumerate(rows, start=1):
        if r["problem"]:
            lines[i] += f"  ({r['problem']})"
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m supermask.runs [DIR] [--sort KEY] [--where KEY=VALUE ...] [--json | --csv]."""

    p = Parser(prog="python -m supermask.runs",
               description="List the runs under a folder (the run folders of supermask.train and supermask.imp, "
                           "with IMP rounds): what each computes, how far it got, its test accuracy and its "
                           "state (finished, unfinished or broken).")
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="the folder to look in")
    p.add_argument("--sort", default="name", metavar="KEY", help="sort by a column or any config key")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs whose column or config key has this value (e.g. k=0.5, state=finished); "
                        "repeat to combine")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list (each run with its full config)")
    fmt.add_argument("--csv", action="store_true", help="print CSV (the table's columns)")
    args = p.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    rows = list_runs(root, args.where, args.sort)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=[*COLUMNS, "problem"], extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif rows:
        print(format_table(rows))
    else:
        print(f"no runs under {root}" + (" matching the --where filters" if args.where else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main("python -m supermask.runs", main))
