"""Run directories: named after their configuration, written atomically, never overwritten.

A run lives in one folder holding config.json, checkpoint.pt (every epoch), metrics.jsonl and,
once finished, results.json. The default folder name is derived from the hyperparameters (as in
open_lth), so the same command finds its finished run instead of recomputing it. While a process
writes a run it holds the folder's lock (.lock), so a second one cannot write there too.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import uuid
from pathlib import Path

import filelock
import torch


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


def config_hash(config: dict, ignore=()) -> str:
    relevant = {k: v for k, v in sorted(config.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


def write_error(path: Path, e: OSError) -> str:
    """The one-line message for a failed write: a full disk says so."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device to write {path} ({e.strerror or e}); free some and run again"
    return f"cannot write {path}: {e.strerror or e}"


def atomic_write(path: Path, data) -> None:
    """Write path all at once: to a temporary file beside it, flushed to disk, then renamed over it,
    so a reader (or a crash) sees the old file or the new one, never half of one. data is bytes, or
    a callable that writes the file at the temporary path it is given (torch.save, a compiler...).
    The file gets an ordinary file's permissions (0666 less the umask, like open()), not the 0600
    of tempfile.mkstemp. The temporary file is named .<name>.<random>.tmp and removed on failure
    (remove_temp_files clears those a killed process left). The one atomic writer of the package:
    JSON, checkpoints, exported models, figures and compiled kernels.

    Raises UsageError (one line, "no space left ..." for a full disk) when the write fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 & ~umask
        with os.fdopen(fd, "wb") as f:
            if not callable(data):
                f.write(data)
        if callable(data):
            data(tmp)
        with open(tmp, "rb+") as f:  # what the callable wrote is on disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UsageError(write_error(path, e)) from None
        raise


def write_json(path: Path, obj):
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files (".<name>.XXXX") that a process killed during an atomic write
    left in run_dir; returns them. Call it only while holding run_dir (exclusive): a live writer's
    temporary file must not go."""
    names = ("checkpoint.pt", "results.json", "config.json", "metrics.jsonl", "init.pt", "rewind.pt")
    gone = [p for name in names for p in Path(run_dir).glob(f".{name}.*") if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


CHECKSUM_KEY = "sha256"  # beside "model" etc. in every checkpoint: the SHA-256 of its content


def content_digest(obj) -> str:
    """SHA-256 of a checkpoint's content (tensors: dtype, shape and bytes; dicts in key order;
    numbers by repr), the same before torch.save and after torch.load. Where a byte flip lands
    in the file does not matter: if it changed a value, the digest differs."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"D%d" % len(x))
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, list | tuple):  # pickle keeps tuples, but do not depend on it
            h.update(b"L%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r}".encode())

    walk(obj)
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict):
    """torch.save(state) atomically, with the SHA-256 of its content under CHECKSUM_KEY (checked by
    load_checkpoint). Serialised in memory first, so a full disk is a one-line UsageError from
    atomic_write, never a half-written file or a C++ traceback."""
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    buf = io.BytesIO()
    torch.save({**state, CHECKSUM_KEY: content_digest(state)}, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: Path, require: tuple = ()) -> dict:
    """A checkpoint written by save_checkpoint, its checksum verified and removed; UsageError (one
    line) when it is missing, unreadable, not a dict, fails its checksum or lacks an entry of
    require. (A checkpoint without a checksum, from before checksums, is read unchecked.)"""
    if not Path(path).is_file():
        raise UsageError(f"no checkpoint to resume from at {path}")
    hint = "delete the run folder or choose another --out"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file is a user-facing error)
        raise UsageError(f"checkpoint {path} is corrupted or unreadable ({type(e).__name__}); {hint}") from None
    if not isinstance(state, dict):
        raise UsageError(f"checkpoint {path} is not a checkpoint of this tool (no dict inside); {hint}")
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is not None and stored != content_digest(state):
        raise UsageError(f"checkpoint {path} is corrupted (its SHA-256 checksum does not match); {hint}")
    missing = [k for k in require if k not in state]
    if missing:
        raise UsageError(f"checkpoint {path} has no {', '.join(repr(k) for k in missing)} entry "
                         f"(not a checkpoint of this run); {hint}")
    return state


def read_json_object(path: Path, what: str = "") -> dict:
    """A JSON file that must hold an object (config.json, results.json); UsageError (one line) when
    it is unreadable, truncated or holds something else."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        why = "unreadable" if isinstance(e, OSError) else "corrupted (not valid JSON: truncated?)"
        raise UsageError(f"{path} is {why}{what}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} is corrupted (it holds a JSON {type(obj).__name__}, not an object){what}")
    return obj


def read_run_config(run_dir: Path) -> dict:
    """config.json of a run folder; UsageError (one line) when there is none or it is unreadable."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a folder")
    if not cfg_path.is_file():
        raise UsageError(f"{run_dir} holds no run (no config.json)")
    return read_json_object(cfg_path)


def check_same_config(out: Path, stored: dict, config: dict, what: str = "a run") -> None:
    """Raise UsageError naming the keys that differ when the folder out (holding stored, its
    config.json) was made for another configuration than config: never mixed, never overwritten."""
    if stored != config:
        changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
        raise UsageError(f"{out} holds {what} with another configuration ({', '.join(changed)} differ); "
                         "choose another --out")


def prepare_run_dir(out: Path, config: dict, resume: bool) -> str:
    """Check that out may hold this run; returns 'new', 'resume' or 'done'. Writes config.json for
    a new run. Raises UsageError instead of overwriting anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        check_same_config(out, read_json_object(cfg_path, "; choose another --out"), config)
        if (out / "results.json").is_file():
            return "done"
        if not (out / "checkpoint.pt").is_file():
            return "new"  # stopped before its first checkpoint: nothing to continue, start it again
        if not resume:
            raise UsageError(f"{out} holds an unfinished run of this configuration; pass --resume to continue it")
        return "resume"
    if resume:
        raise UsageError(f"--resume given but {out} holds no run (no config.json)")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty folder that holds no run of this tool; choose another")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(cfg_path, config)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return "new"


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold run_dir for this process while the block writes there: a filelock.FileLock on
    run_dir/.lock (fcntl on POSIX, msvcrt on Windows), freed when the block ends or the process
    dies. A second process on the same run (two commands resuming it, two compare runs sharing it)
    gets a one-line UsageError instead of writing over the first one's files.

    The .lock file is removed when the block ends (while still locked, so that a process which
    opened the old file before its removal notices, below, and tries the new one): a finished run
    folder holds only the run's files."""
    run_dir = Path(run_dir)
    path = run_dir / ".lock"
    for _ in range(10):
        lock = filelock.FileLock(path, timeout=0, is_singleton=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise UsageError(f"{run_dir} is being written by another process; run this again when it has "
                             "ended (what it finished is not recomputed)") from None
        except OSError as e:
            raise UsageError(f"cannot write to {run_dir}: {e.strerror or e}") from None
        if _holds_current_file(lock, path):
            break
        lock.release()  # locked a .lock its holder removed as it finished: try the current one
    else:
        raise UsageError(f"{run_dir} is being written by another process; run this again when it has ended")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # Windows: the file is open (filelock removes it there)
            path.unlink()
        lock.release()


def _holds_current_file(lock: filelock.FileLock, path: Path) -> bool:
    """Whether the file lock holds is still the file at path (not one removed since it was opened)."""
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    if fd is None:  # another platform or filelock version: nothing to compare
        return True
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The run list: python -m supermask.runs [DIR]

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

    state: "finished" (results.json; for an IMP run every planned round finished), "unfinished"
    (config.json but not finished yet: resume it with --resume, or rerun the IMP command), or
    "broken" (config.json missing or corrupted, results.json corrupted, or a checkpoint.pt that is
    not a complete torch.save file (a zip archive), e.g. truncated by a full disk)."""
    import zipfile  # noqa: PLC0415

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
        return {**row, "state": "broken", "problem": "no config.json"}
    row["config"] = config
    command = config.get("command")
    if command == "imp" and "round" in config:  # a round folder (its config is the IMP run's plus "round")
        command = "imp-round"
    row.update(command=command, model=config.get("model"), width=config.get("width"),
               dataset=config.get("dataset"), seed=config.get("seed"))
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.is_file() and not zipfile.is_zipfile(ckpt):
        row.update(state="broken", problem="checkpoint.pt is truncated or corrupted")
    if command == "imp":
        planned = config.get("rounds", 0)
        first = 1 if config.get("control") else 0
        done = results.get("rounds", []) if isinstance(results, dict) else []
        finished = {r.get("round") for r in done} >= set(range(first, planned + 1))
        row.update(k_or_round=f"rounds {len(done)}/{planned + 1 - first}",
                   epochs=f"{sum(r.get('epochs') or 0 for r in done)}/{(planned + 1 - first) * config.get('epochs', 0)}",
                   test_acc=done[-1].get("test_acc") if done else None)
        row["state"] = row["state"] or ("finished" if finished else "unfinished")
        return row
    metrics = _metrics_rows(run_dir / "metrics.jsonl")
    if command == "imp-round":
        row["k_or_round"] = f"round {config.get('round')}"
    else:
        row["k_or_round"] = "dense" if config.get("dense") else config.get("k")
    epochs_done = results.get("epochs", len(metrics)) if isinstance(results, dict) else len(metrics)
    row["epochs"] = f"{epochs_done}/{config.get('epochs', '?')}"
    if isinstance(results, dict):
        row.update(test_acc=results.get("test_acc"), state=row["state"] or "finished")
    else:
        row.update(test_acc=metrics[-1].get("test_acc") if metrics else None, state=row["state"] or "unfinished")
    return row


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
    import csv  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from .cli import Parser  # noqa: PLC0415 (cli imports this module)

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
    import sys

    from . import runs  # the module itself, whose UsageError run_main catches (not this __main__'s copy)
    from .cli import run_main

    sys.exit(run_main("python -m supermask.runs", runs.main))
