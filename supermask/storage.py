"""Run storage: run folders named after their configuration, written atomically, never overwritten.

A run lives in one folder holding config.json, checkpoint.pt (every epoch), metrics.jsonl and,
once finished, results.json. The default folder name is derived from the hyperparameters (as in
open_lth), so the same command finds its finished run instead of recomputing it. While a process
writes a run it holds the folder's lock (.lock), so a second one cannot write there too.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import NamedTuple

import filelock
import torch

from .errors import UsageError, write_error


def config_hash(config: dict, ignore=()) -> str:
    """The first 10 hex digits of the SHA-256 of config (less the keys in ignore) as sorted JSON:
    the suffix of a run's folder name, so the same configuration finds the same folder."""
    relevant = {k: v for k, v in sorted(config.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


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
        with contextlib.suppress(OSError):  # a read-only file system: the cleanup must not bury the real error
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UsageError(write_error(path, e)) from None
        raise


def check_writable(folder: Path, what: str = "--out") -> None:
    """UsageError (one line) unless files can be written in folder: the folder, or where it does not
    exist yet its nearest existing parent (where it will be created), must be a folder in which a
    probe file can be created (then removed). For checking an output place before any work; leaves
    nothing behind."""
    folder = Path(folder)
    place = folder
    while not place.exists() and place.parent != place:
        place = place.parent
    if not place.is_dir():
        raise UsageError(f"{what} {folder}: {place} exists and is not a folder")
    probe = place / f".write-probe.{uuid.uuid4().hex[:12]}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise UsageError(f"cannot write to {what} {folder}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


MAX_TEXT_BYTES = 1 << 20  # a config file (YAML, JSON) of this tool is a few KB


def read_bounded_text(path: Path, what: str = "", limit: int = MAX_TEXT_BYTES) -> str:
    """The text of path, read up to limit bytes (never more: /dev/zero, a huge file); UsageError
    (one line, naming what, e.g. "--config") when it is larger, unreadable or not UTF-8."""
    path = Path(path)
    name = f"{what} {path}".strip()
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"{name}: {e.strerror or e}") from None
    if len(data) > limit:
        raise UsageError(f"{name} is larger than {limit} bytes: not a config file of this tool")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{name} is not UTF-8 text") from None


def load_yaml_bounded(path: Path, what: str = "--config", limit: int = MAX_TEXT_BYTES):
    """yaml.safe_load of read_bounded_text(path), refusing aliases (*name: a few lines that expand
    into billions of entries, the "billion laughs" bomb) with a one-line UsageError; other YAML
    errors are yaml.YAMLError as from yaml.safe_load."""
    import yaml  # noqa: PLC0415

    class _NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise UsageError(f"{what} {path} uses a YAML alias (*{self.peek_event().anchor}); write the values "
                                 "out instead")
            return super().compose_node(parent, index)

    return yaml.load(read_bounded_text(path, what, limit), Loader=_NoAliases)  # noqa: S506 (a SafeLoader)


def json_safe(obj):
    """obj with every non-finite float (NaN, inf: not JSON) as None (JSON null), in dicts, lists and tuples."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """obj as indented, key-sorted JSON in path, written atomically (atomic_write); a NaN or inf (a
    validation accuracy with --val-size 0) is written as null, so the file is standard JSON."""
    atomic_write(path, (json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


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


def _percent(v) -> bool:
    return type(v) in (int, float) and 0 <= v <= 100


def _count(v) -> bool:
    return type(v) is int and v >= 0


def _seconds(v) -> bool:
    return v is None or (type(v) in (int, float) and 0 <= v < float("inf"))


# What a finished training run's results.json holds (training.train, evaluate_untrained): key -> check.
RESULT_CHECKS = {
    "test_acc": _percent, "best_test_acc": _percent,
    "val_acc": lambda v: v is None or _percent(v), "best_val_acc": lambda v: v is None or _percent(v),
    "epochs": _count, "iterations": _count, "params_total": _count, "params_kept": _count,
    "weights_remaining": _percent, "seconds_per_epoch": _seconds,
    "early_stop_iteration": lambda v: v is None or _count(v),
}
# One row of a whole IMP run's results.json ("rounds": a list of them, imp._round_row).
ROUND_CHECKS = {"round": _count, "test_acc": _percent, "best_test_acc": _percent, "weights_remaining": _percent,
                "epochs": _count, "seconds_per_epoch": _seconds, "val_acc": lambda v: v is None or _percent(v),
                "early_stop_iteration": lambda v: v is None or _count(v)}


def _bad_keys(obj: dict, checks: dict) -> list[str]:
    return [k for k, ok in checks.items() if k not in obj or not ok(obj[k])]


def results_problem(results, config: dict | None) -> str | None:
    """Why results (a results.json's content) is not the results of the run whose config.json is
    config, or None when it is: it must be an object carrying the same "config" and every required
    key with a value of the right type and range (RESULT_CHECKS; for a whole IMP run "rounds", a
    list of ROUND_CHECKS rows). config None: only the keys and types are checked."""
    if not isinstance(results, dict):
        return f"it holds a JSON {type(results).__name__}, not an object"
    if "config" not in results:
        return "it names no config (another tool's, or written by an older supermask)"
    if config is not None and results["config"] != config:
        stored = results["config"] if isinstance(results["config"], dict) else {}
        differ = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
        return f"it is another run's (its config differs: {', '.join(differ[:4]) or 'not an object'})"
    kind = results["config"].get("command") if isinstance(results["config"], dict) else None
    if kind == "imp" and "round" not in results["config"]:
        rows = results.get("rounds")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return "its 'rounds' is missing or not a list of rounds"
        bad = sorted({k for r in rows for k in _bad_keys(r, ROUND_CHECKS)})
    else:
        bad = _bad_keys(results, RESULT_CHECKS)
    return f"missing or wrong-typed {', '.join(repr(k) for k in bad[:4])}" if bad else None


def read_results(run_dir: Path, config: dict | None, hint: str = "") -> dict:
    """results.json of the finished run in run_dir whose config.json is config: a UsageError (one
    line, then hint) when it is unreadable or results_problem finds it is not this run's."""
    path = Path(run_dir) / "results.json"
    results = read_json_object(path, hint)
    problem = results_problem(results, config)
    if problem:
        raise UsageError(f"{path} does not hold this run's results: {problem}{hint or '; delete it'}")
    return results


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


def _redo_hint(out: Path) -> str:
    """What to do about the results.json of out that is not its run's."""
    if (out / "checkpoint.pt").is_file():
        return f"; delete it and run the same command with --resume to write it again from {out / 'checkpoint.pt'}"
    return "; delete the run folder to run it again"


class Opened(NamedTuple):
    """What opening a training run folder found: state ("new", "resume" or "done"), the checkpoint
    to continue from (open_run, for "resume"; else None) and a note for the user, or None: the
    library never prints, the command says it (on stderr)."""

    state: str
    checkpoint: dict | None = None
    note: str | None = None


def prepare_run_dir(out: Path, config: dict, resume: bool) -> Opened:
    """Check that out may hold this run; returns its state, 'new', 'resume' or 'done' (no
    checkpoint read). Writes config.json for a new run. With resume, a missing or empty out (a run
    stopped before it wrote its config, e.g. Ctrl-C while torch loads) starts the run, with a note
    that says so. Raises UsageError instead of overwriting anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        check_same_config(out, read_json_object(cfg_path, "; choose another --out"), config)
        if (out / "results.json").is_file():
            read_results(out, config, _redo_hint(out))
            return Opened("done")
        if not (out / "checkpoint.pt").is_file():
            return Opened("new")  # stopped before its first checkpoint: nothing to continue, start it again
        if not resume:
            raise UsageError(f"{out} holds an unfinished run of this configuration; pass --resume to continue it")
        return Opened("resume")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty folder that holds no run of this tool; choose another")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(cfg_path, config)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
    # e.g. Ctrl-C before the run wrote its config: what --resume was advised for
    note = f"note: {out} held no run yet (stopped before it started): starting it" if resume else None
    return Opened("new", note=note)


def open_run(out: Path, config: dict, resume: bool | None, held: contextlib.ExitStack | None = None,
             require: tuple = ()) -> Opened:
    """The one way to open a training run folder: prepare_run_dir (the same configuration, or a new
    folder), then, unless the run is done and when held is given, the folder's lock (exclusive,
    entered into held; a run finished by another process meanwhile is then "done") and the removal
    of a killed writer's temporary files. Returns Opened(state, checkpoint, note): "new", "resume"
    or "done", the checkpoint to continue from (load_checkpoint(..., require)) for "resume", else
    None, and prepare_run_dir's note.

    resume None: continue whatever the folder holds (IMP rounds, instability copies), as
    resume=True when it holds a config.json. A run stopped before its first checkpoint starts
    again ("new"). Raises UsageError instead of overwriting anything."""
    out = Path(out)
    if resume is None:
        resume = (out / "config.json").is_file()
    state, _, note = prepare_run_dir(out, config, resume)
    if state != "done" and held is not None:
        held.enter_context(exclusive(out))
        if (out / "results.json").is_file():  # finished by another process a moment ago
            state = "done"
        else:
            remove_temp_files(out)  # left by a process killed while writing (we hold the folder now)
    return Opened(state, load_checkpoint(out / "checkpoint.pt", require) if state == "resume" else None, note)


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
