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
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no locking
    fcntl = None

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


def atomic_write_bytes(path: Path, data: bytes):
    """Write data to path through a temporary file in the same folder (".<name>.XXXX") and a
    rename: path holds the old or the new bytes, never a part. A failed write (a full disk)
    removes the temporary file and raises UsageError with one line."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise UsageError(write_error(path, e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UsageError(write_error(path, e)) from None
        raise


def write_json(path: Path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
    atomic_write_bytes, never a half-written file or a C++ traceback."""
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    buf = io.BytesIO()
    torch.save({**state, CHECKSUM_KEY: content_digest(state)}, buf)
    atomic_write_bytes(path, buf.getvalue())


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


def prepare_run_dir(out: Path, config: dict, resume: bool) -> str:
    """Check that out may hold this run; returns 'new', 'resume' or 'done'. Writes config.json for
    a new run. Raises UsageError instead of overwriting anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        stored = read_json_object(cfg_path, "; choose another --out")
        if stored != config:
            changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
            raise UsageError(f"{out} holds a run with another configuration ({', '.join(changed)} differ); "
                             "choose another --out")
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
    """Hold run_dir for this process while the block writes there: a lock on run_dir/.lock, freed
    when the block ends or the process dies. A second process on the same run (two commands
    resuming it, two compare runs sharing it) gets a one-line UsageError instead of writing over
    the first one's files."""
    run_dir = Path(run_dir)
    try:
        f = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held for the block)
    except OSError as e:
        raise UsageError(f"cannot write to {run_dir}: {e.strerror or e}") from None
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                pid = f.read().strip() or "?"
                raise UsageError(f"{run_dir} is being written by another process (pid {pid}); run this again "
                                 "when it has ended (what it finished is not recomputed)") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
