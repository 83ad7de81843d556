"""The errors a user can cause, in one small module that imports nothing of the package.

Every command turns these into one line on stderr and exit code 2 (cli.run_main); library code
raises them wherever bad input is first seen. Subclasses of UsageError elsewhere say what failed
(training.DivergedError, compact.CompactFileError).
"""
from __future__ import annotations

import errno
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


class DataError(Exception):
    """The dataset cannot be found or read; the message says what was tried and what to do."""


def write_error(path: Path, e: OSError) -> str:
    """The one-line message for a failed write of path: a full disk (ENOSPC, EDQUOT) says so."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device to write {path} ({e.strerror or e}); free some and run again"
    return f"cannot write {path}: {e.strerror or e}"
