"""The library's answers at its edges (issue #24, kinds 5 and 6): table-driven, each row a call
and the error it must raise (type and a fragment of the message), or the right answer."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from supermask import storage
from supermask.errors import UsageError


def test_atomic_write_cleanup_never_buries_the_real_error(tmp_path, monkeypatch):
    """A read-only file system: the write fails, and so does removing the temporary file; the
    error raised is the write's (one line), not the cleanup's."""
    def fail(*_a, **_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "fsync", fail)
    monkeypatch.setattr(Path, "unlink", fail)
    with pytest.raises(UsageError, match=r"cannot write .*x\.json: Read-only file system"):
        storage.atomic_write(tmp_path / "x.json", b"{}")


@pytest.mark.parametrize("make, what", [
    (lambda p: p / "new" / "deeper", None),  # created later under a writable parent: fine
    (lambda p: (p / "f").write_text("x") and p / "f" / "out", "is not a folder"),
])
def test_check_writable(tmp_path, make, what):
    folder = make(tmp_path)
    if what is None:
        storage.check_writable(folder)
        assert not folder.exists() and not list(tmp_path.glob(".write-probe*"))
    else:
        with pytest.raises(UsageError, match=what):
            storage.check_writable(folder)
