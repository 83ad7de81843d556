"""Sizes taken from input are bounded before they are read or allocated (issue #24, kind 4): each
command runs in a subprocess whose address space is limited (RLIMIT_AS) to a few GiB over what
importing torch needs, and must end in one line on stderr, exit code 2, where reading or
allocating what the input asks for would need far more than the limit."""
from __future__ import annotations

import gzip
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 5 * 2**30  # importing supermask.train maps about 3.2 GiB (virtual) on Linux x86-64
TINY = ["--dataset", "synthetic", "--epochs", "1", "--width", "0.25", "--val-size", "200", "--no-progress"]


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def gzip_bomb(head: bytes, gib: int) -> bytes:
    """head, then gib GiB of zero bytes, as concatenated gzip members (gzip.open reads them as one
    stream): about 1 MB of file per GiB, made in well under a second."""
    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = zeros.compress(bytes(2**26)) + zeros.flush()  # 64 MiB of zeros
    return gzip.compress(head, mtime=0) + member * (16 * gib)


def idx(shape, body: bytes = b"") -> bytes:
    return struct.pack(">HBB", 0, 8, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + body


def mnist_with_bomb(folder: Path):
    folder.mkdir(parents=True)
    files = {"train-images-idx3-ubyte.gz": idx((60, 28, 28), bytes(60 * 784)),
             "t10k-images-idx3-ubyte.gz": idx((20, 28, 28), bytes(20 * 784)),
             "t10k-labels-idx1-ubyte.gz": idx((20,), bytes(20))}
    for name, data in files.items():
        (folder / name).write_bytes(gzip.compress(data, mtime=0))
    # labels: 60 declared, 8 GiB inflated
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip_bomb(idx((60,), bytes(60)), 8))


CASES = [
    ("--config /dev/zero", lambda root: [*TINY, "--config", "/dev/zero", "--out", str(root / "new")], "larger than"),
    ("gzip inflating to 8 GiB", lambda root: ["--dataset", "mnist", "--data-dir", str(root / "data"), "--epochs", "1",
                                              "--width", "0.25", "--val-size", "10", "--no-progress",
                                              "--out", str(root / "new")], "truncated or too long"),
    ("--width 1000 (a 242 GB network)", lambda root: [*TINY[:4], "--width", "1000", *TINY[6:],
                                                      "--out", str(root / "new")], "GiB available"),
]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS as on Linux")
@pytest.mark.parametrize("name, argv, expect", CASES, ids=[c[0] for c in CASES])
def test_bounded_under_a_memory_limit(tmp_path, name, argv, expect):
    if "gzip" in name:
        mnist_with_bomb(tmp_path / "data" / "mnist")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "supermask.train", *argv(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300, preexec_fn=_limit)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expect in proc.stderr, proc.stderr
    assert not (tmp_path / "new").exists()  # nothing written
