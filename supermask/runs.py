"""Run directories: named after their configuration, written atomically, never overwritten.

A run lives in one folder holding config.json, checkpoint.pt (every epoch), metrics.jsonl and,
once finished, results.json. The default folder name is derived from the hyperparameters (as in
open_lth), so the same command finds its finished run instead of recomputing it. While a process
writes a run it holds the folder's lock (.lock), so a second one cannot write there too.
"""
from __future__ import annotations

import contextlib
import hashlib
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


def atomic_write(path: Path, data) -> None:
    """Write path all at once: to a temporary file beside it, flushed to disk, then renamed over it,
    so a reader (or a crash) sees the old file or the new one, never half of one. data is bytes, or
    a callable that writes the file at the temporary path it is given (torch.save, a compiler...).
    The file gets an ordinary file's permissions (0666 less the umask, like open()), not the 0600
    of tempfile.mkstemp. The temporary file is named .<name>.<random>.tmp and removed on failure.
    The one atomic writer of the package: JSON, checkpoints, exported models and compiled kernels."""
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj):
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: Path, state: dict):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    if not Path(path).is_file():
        raise UsageError(f"no checkpoint to resume from at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file is a user-facing error)
        raise UsageError(f"checkpoint {path} is corrupted or unreadable ({type(e).__name__}); "
                         "delete the run folder or choose another --out") from None


def read_run_config(run_dir: Path) -> dict:
    """config.json of a run folder; UsageError (one line) when there is none or it is unreadable."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a folder")
    if not cfg_path.is_file():
        raise UsageError(f"{run_dir} holds no run (no config.json)")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{cfg_path} is corrupted") from None


def prepare_run_dir(out: Path, config: dict, resume: bool) -> str:
    """Check that out may hold this run; returns 'new', 'resume' or 'done'. Writes config.json for
    a new run. Raises UsageError instead of overwriting anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        try:
            stored = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{cfg_path} is corrupted; choose another --out") from None
        if stored != config:
            changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
            raise UsageError(f"{out} holds a run with another configuration ({', '.join(changed)} differ); "
                             "choose another --out")
        if (out / "results.json").is_file():
            return "done"
        if not resume:
            raise UsageError(f"{out} holds an unfinished run of this configuration; pass --resume to continue it")
        load_checkpoint(out / "checkpoint.pt")  # fail now, with one line, if it is unreadable
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
