"""Every bad input of every command: exit code 2, exactly one line on stderr, no traceback, and
every file that existed before unchanged (SHA-256 before and after), no run stored as finished.

Table-driven: a new numeric flag gets its cases by adding a row to NUMERIC_FLAGS (and
test_every_numeric_flag_has_rows fails until it has one); any other bad input is a row of CASES.
Commands run in-process (main(argv) through run_main, argparse's SystemExit caught), a few through
the real `python -m` command line (SUBPROCESS_CASES).
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from supermask import analyze, compare, export, instability
from supermask import imp as imp_mod
from supermask import train as train_mod
from supermask.cli import run_main
from supermask.storage import load_checkpoint, save_checkpoint

TINY = ["--dataset", "synthetic", "--epochs", "1", "--width", "0.25", "--val-size", "200", "--no-progress"]
IMP_TINY = [*TINY, "--rounds", "1", "--val-every", "0"]
COMMANDS = {
    "train": ("python -m supermask.train", train_mod.main, train_mod.parser),
    "imp": (imp_mod.PROG, imp_mod.main, imp_mod.parser),
    "compare": (compare.PROG, compare.main, compare.parser),
    "export": (export.PROG, export.main, export.parser),
    "analyze": (analyze.PROG, analyze.main, analyze.parser),
    "instability": (instability.PROG, instability.main, instability.parser),
}
# The argv each command's flag rows start from: valid, fast, writing only under the case's folder.
BASE_ARGV = {
    "train": [*TINY, "--out", "{root}/new"],
    "imp": [*IMP_TINY, "--out", "{root}/new"],
    "compare": ["--dataset", "synthetic", "--epochs", "1", "--ks", "0.5", "--widths", "0.25", "--imp-widths", "0.25",
                "--rounds", "1", "--controls", "", "--val-size", "200", "--no-progress", "--runs-dir", "{root}/cruns",
                "--out", "{root}/cmp"],
    "instability": [*TINY, "--rewind-iters", "0", "--points", "3", "--runs-dir", "{root}/iruns",
                    "--out", "{root}/inst"],
}
TRAINING = ("train", "imp", "compare", "instability")

# Numeric flags: (flag, commands that have it, bad values). Non-finite, wrong sign, out of range,
# not an integer where an integer is meant, not a number.
NUMERIC_FLAGS = [
    ("--width", ("train", "imp", "instability"), ["0", "-1", "nan", "inf"]),
    ("--val-size", TRAINING, ["-1", "1.5", "x"]),
    ("--seed", ("train", "imp", "instability"), ["-1", "1.5", "nan", str(2**40)]),
    ("--epochs", TRAINING, ["0", "-3", "nan", "2.5"]),
    ("--batch-size", TRAINING, ["0", "-1", "inf"]),
    ("--lr", TRAINING, ["0", "-0.1", "nan", "inf", "-inf"]),
    ("--momentum", TRAINING, ["-1", "nan", "1.5", "inf"]),
    ("--weight-decay", TRAINING, ["-1", "nan", "inf"]),
    ("--milestones", TRAINING, ["-1", "1,x", "1.5"]),
    ("--gamma", TRAINING, ["0", "nan", "-1"]),
    ("--warmup-epochs", TRAINING, ["-1", "nan", "inf"]),
    ("--label-smoothing", TRAINING, ["-0.1", "1", "nan"]),
    ("--threads", TRAINING, ["-1", "1.5", "10000"]),
    ("--workers", TRAINING, ["-1", "nan", "10000"]),
    ("--k", ("train", "instability"), ["0", "1.5", "nan", "-0.5", "inf"]),
    ("--score-init-constant", ("train",), ["nan", "inf", "-inf"]),
    ("--rounds", ("imp", "compare"), ["-1", "100", "nan"]),
    ("--prune-rate", ("imp", "compare"), ["0", "1", "nan", "-0.2"]),
    ("--output-prune-rate", ("imp",), ["1", "-0.1", "nan"]),
    ("--rewind-iter", ("imp", "compare"), ["-1", "1.5"]),
    ("--val-every", ("imp", "compare"), ["-1", "nan"]),
    ("--seeds", ("compare",), ["-1", "1,x", "nan"]),
    ("--ks", ("compare",), ["0", "1.5", "nan", "0.5,inf", "0.5,1.5", "0.1,0,0.5"]),  # a k out of (0, 1] in the list
    ("--widths", ("compare",), ["0", "nan", "inf", "1,0", "0.5,-1"]),  # a width <= 0 in the list
    ("--imp-widths", ("compare",), ["-1", "nan", "1,0"]),
    ("--rewind-iters", ("instability",), ["-1", "0,x", "1.5"]),
    ("--points", ("instability",), ["1", "0", "nan"]),
    ("--data-seeds", ("instability",), ["-1,2", "1,x", str(2**40)]),
    ("--round", ("instability",), ["-1", "1.5", "100"]),  # IMP rounds are 0 to 99 (desc.ROUND_FIELD)
]


@dataclass
class Case:
    id: str
    command: str
    argv: list[str]  # "{root}" etc. are filled in with the case's folder
    expect: str  # a fragment the one line must hold
    setup: Callable[[Path], None] | None = None  # damage the case's copy of the fixtures
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # e.g. a full disk
    compare_runs: bool = False  # copy in the finished comparison (cruns/, cmp/) too

    def __str__(self):
        return self.id


def flag_cases() -> list[Case]:
    cases = []
    for flag, commands, values in NUMERIC_FLAGS:
        for command in commands:
            for value in values:
                cases.append(Case(f"{command} {flag} {value}", command, [*BASE_ARGV[command], flag, value],
                                  f"argument {flag}:"))
    return cases


# ---------------------------------------------------------------------------------------------
# Fixture files: tiny runs of every kind, a compact file and a tiny MNIST in IDX format.


def idx_bytes(t: torch.Tensor) -> bytes:
    return struct.pack(">HBB", 0, 8, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape) + t.numpy().tobytes()


IDX = {"train-images-idx3-ubyte.gz": "ti", "train-labels-idx1-ubyte.gz": "tl",
       "t10k-images-idx3-ubyte.gz": "si", "t10k-labels-idx1-ubyte.gz": "sl"}


def write_tiny_mnist(folder: Path, n_train=60, n_test=20, **override):
    g = torch.Generator().manual_seed(0)
    tensors = {"ti": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
               "tl": torch.randint(0, 10, (n_train,), generator=g).to(torch.uint8),
               "si": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
               "sl": torch.randint(0, 10, (n_test,), generator=g).to(torch.uint8), **override}
    folder.mkdir(parents=True, exist_ok=True)
    for name, key in IDX.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(tensors[key]), mtime=0))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    assert train_mod.main([*TINY, "--seed", "3", "--out", str(root / "ep")]) == 0
    assert train_mod.main([*TINY, "--seed", "4", "--out", str(root / "ep2")]) == 0
    assert train_mod.main([*TINY, "--width", "0.5", "--out", str(root / "wide")]) == 0
    assert imp_mod.main([*IMP_TINY, "--out", str(root / "imp")]) == 0
    assert run_main(export.PROG, export.main, [str(root / "ep"), "--compact", "--out", str(root / "ep.smask")]) == 0
    write_tiny_mnist(root / "data" / "mnist")
    assert train_mod.main(["--dataset", "mnist", "--data-dir", str(root / "data"), "--epochs", "1", "--width", "0.25",
                           "--val-size", "10", "--no-progress", "--out", str(root / "mn")]) == 0  # a run on real files
    for lock in root.rglob(".lock"):  # lock bookkeeping (the pid of the last writer), not a run's content
        lock.unlink()
    return root


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A finished comparison made by BASE_ARGV["compare"] (cruns/ and cmp/)."""
    root = tmp_path_factory.mktemp("compared")
    argv = [a.format(root=root) for a in BASE_ARGV["compare"]]
    assert run_main(compare.PROG, compare.main, argv) == 0
    for lock in root.rglob(".lock"):
        lock.unlink()
    return root


def snapshot(root: Path) -> dict[str, str]:
    """{path: SHA-256 of a file, or "folder"}: every file and folder below root (locks aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*")) if p.name != ".lock"}


def run_case(case: Case, root: Path, capsys, monkeypatch) -> tuple[int, str]:
    prog, main, _ = COMMANDS[case.command]
    argv = [a.format(root=root) for a in case.argv]
    if case.patch:
        case.patch(monkeypatch)
    capsys.readouterr()
    try:
        code = run_main(prog, main, argv)
    except SystemExit as e:  # argparse's errors (cli.Parser: one line, exit 2)
        code = e.code
    finally:
        monkeypatch.undo()
    return code, capsys.readouterr().err


def check_clean(code, err, before, root, expect, writes_nothing=False):
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert expect in err, err
    after = snapshot(root)
    changed = [f for f in before if after.get(f) != before[f]]
    assert not changed, f"changed or removed: {changed}"
    new = set(after) - set(before)
    assert not [f for f in new if f.endswith("results.json")], f"stored as finished: {new}"
    if writes_nothing:  # export and analyze write one output, after every input has been read
        assert not new, f"written on bad input: {sorted(new)}"
    temps = [p for p in root.rglob(".*") if p.is_file() and p.name != ".lock"]
    assert not temps, f"temporary files left: {temps}"


def copy_base(base: Path, root: Path):
    for p in base.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, root / p.name)


# ---------------------------------------------------------------------------------------------
# Damage


def truncate(rel: str, keep: float = 0.5):
    def setup(root: Path):
        p = root / rel
        data = p.read_bytes()
        p.write_bytes(data[:int(len(data) * keep)])
    return setup


def flip_byte(rel: str, at: float = 0.5):
    def setup(root: Path):
        p = root / rel
        data = bytearray(p.read_bytes())
        data[int(len(data) * at)] ^= 0xFF
        p.write_bytes(bytes(data))
    return setup


def write(rel: str, content: bytes):
    def setup(root: Path):
        (root / rel).write_bytes(content)
    return setup


def chain(*steps):
    def setup(root: Path):
        for s in steps:
            s(root)
    return setup


def unlink(rel: str):
    return lambda root: (root / rel).unlink()


def checkpoint_without(rel: str, key: str):
    def setup(root: Path):
        state = load_checkpoint(root / rel)
        del state[key]
        save_checkpoint(root / rel, state)  # a valid checksum: the entry is what is missing
    return setup


def swap_model(rel: str, other: str):
    """rel's checkpoint with the model of another run (of another width)."""
    def setup(root: Path):
        state = load_checkpoint(root / rel)
        state["model"] = load_checkpoint(root / other)["model"]
        save_checkpoint(root / rel, state)
    return setup


def copy_file(src: str, dst: str):
    return lambda root: shutil.copyfile(root / src, root / dst)


def mnist(**override):
    return lambda root: write_tiny_mnist(root / "data" / "mnist", **override)


def full_disk(after: int = 0):
    """os.fsync fails with ENOSPC from its (after+1)-th call on (atomic writes: storage.atomic_write)."""
    def patch(mp: pytest.MonkeyPatch):
        real, calls = os.fsync, [0]

        def fsync(fd):
            calls[0] += 1
            if calls[0] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd)
        mp.setattr(os, "fsync", fsync)
    return patch


def full_disk_at(name: str):
    """os.fsync fails with ENOSPC for the atomic write of the file called name (.<name>.<random>.tmp)."""
    def patch(mp: pytest.MonkeyPatch):
        real = os.fsync

        def fsync(fd):
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd)
        mp.setattr(os, "fsync", fsync)
    return patch


def fashion_labels_as_mnist(root: Path):
    """Fashion-MNIST's training labels (Debian's file) in the tiny MNIST folder."""
    src = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
    if not src.is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    images = root / TRAIN_IMG
    shutil.copyfile(src, root / TRAIN_LAB)
    write_tiny_mnist(root / "data" / "mnist", n_train=60000, ti=torch.zeros(60000, 28, 28, dtype=torch.uint8))
    shutil.copyfile(src, root / TRAIN_LAB)
    assert images.is_file()


def read_only(name: str):
    """A read-only file system below every folder called name (os.open for writing, os.mkdir: EROFS)."""
    def patch(mp: pytest.MonkeyPatch):
        real_open, real_mkdir = os.open, os.mkdir

        def inside(path) -> bool:
            return f"/{name}/" in os.fspath(path)

        def fake_open(path, flags, *a, **k):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real_open(path, flags, *a, **k)

        def fake_mkdir(path, *a, **k):
            if inside(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real_mkdir(path, *a, **k)
        mp.setattr(os, "open", fake_open)
        mp.setattr(os, "mkdir", fake_mkdir)
    return patch


def trained_copies(root: Path):
    """The copies of BASE_ARGV["instability"], trained by an analysis into another folder (inst0)."""
    argv = [a.format(root=root).replace("/inst", "/inst0") for a in BASE_ARGV["instability"]]
    assert run_main(instability.PROG, instability.main, argv) == 0


def finished_analysis_then(*damage):
    """A finished analysis of BASE_ARGV["instability"] (inst/, iruns/), then damage to it."""
    def setup(root: Path):
        argv = [a.format(root=root) for a in BASE_ARGV["instability"]]
        assert run_main(instability.PROG, instability.main, argv) == 0
        for d in damage:
            d(root)
    return setup


EP = [*TINY, "--seed", "3", "--out", "{root}/ep"]  # the command that made ep: it finds its run
IMP = [*IMP_TINY, "--out", "{root}/imp"]
MNIST = ["--dataset", "mnist", "--data-dir", "{root}/data", "--epochs", "1", "--width", "0.25", "--val-size", "10",
         "--no-progress", "--out", "{root}/new"]
TRAIN_IMG = "data/mnist/train-images-idx3-ubyte.gz"
TRAIN_LAB = "data/mnist/train-labels-idx1-ubyte.gz"
TEST_IMG = "data/mnist/t10k-images-idx3-ubyte.gz"
LIST_JSON = b"[1, 2, 3]\n"
# "billion laughs": 9 levels of 10 aliases each, 10**9 entries once expanded
BOMB_YAML = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)) + "epochs: *a8\n"
NO_RESULTS = unlink("ep/results.json")  # an unfinished run, resumable from its checkpoint
OTHER_CKPT = copy_file("wide/checkpoint.pt", "ep/checkpoint.pt")  # another run's (width 0.5) checkpoint

CASES = [
    # 2. numbers that pass the flags' checks but make training diverge / flags that do not combine
    Case("train diverges", "train", [*TINY, "--dense", "--lr", "1e30", "--out", "{root}/new"], "training loss became"),
    Case("imp diverges", "imp", [*IMP_TINY, "--lr", "1e30", "--out", "{root}/new"], "training loss became"),
    Case("train nesterov without momentum", "train", [*BASE_ARGV["train"], "--nesterov", "--momentum", "0"],
         "--nesterov needs a momentum"),
    Case("imp nesterov without momentum", "imp", [*BASE_ARGV["imp"], "--nesterov", "--momentum", "0"],
         "--nesterov needs a momentum"),
    Case("train warmup beyond epochs", "train", [*BASE_ARGV["train"], "--warmup-epochs", "5"], "--warmup-epochs"),
    Case("imp rewind-iter beyond training", "imp", [*BASE_ARGV["imp"], "--rewind-iter", "100000"], "--rewind-iter"),
    Case("train val-size beyond data", "train", [*MNIST, "--val-size", "60"], "--val-size must be in [0, 59]"),
    Case("train multistep without milestones", "train", [*BASE_ARGV["train"], "--schedule", "multistep"],
         "--milestones"),
    Case("compare stored results.json truncated", "compare", BASE_ARGV["compare"], "results.json is corrupted",
         lambda root: truncate(str(next((root / "cruns").glob("fc_w0.25_synthetic_k0.5_*")) / "results.json"))(root),
         compare_runs=True),
    Case("compare stored IMP results.json not an object", "compare", [*BASE_ARGV["compare"], "--no-train"],
         "holds a JSON list",
         lambda root: write(str(next((root / "cruns").glob("imp_*")) / "results.json"), LIST_JSON)(root),
         compare_runs=True),
    Case("compare stored run's config.json not an object", "compare", BASE_ARGV["compare"], "holds a JSON list",
         lambda root: (next((root / "cruns").glob("fc_w0.25_synthetic_dense_*")) / "results.json").unlink() or
         write(str(next((root / "cruns").glob("fc_w0.25_synthetic_dense_*")) / "config.json"), LIST_JSON)(root),
         compare_runs=True),
    Case("compare empty seeds", "compare", [*BASE_ARGV["compare"], "--seeds", ","], "--seeds is empty"),
    Case("compare no widths at all", "compare", [*BASE_ARGV["compare"], "--widths", "", "--imp-widths", ""],
         "nothing to compare"),
    Case("compare empty ks", "compare", [*BASE_ARGV["compare"], "--ks", ""], "--ks is empty"),
    # compare passes every training flag to its runs: the combinations train refuses, it refuses
    Case("compare multistep without milestones", "compare", [*BASE_ARGV["compare"], "--schedule", "multistep"],
         "--schedule multistep needs --milestones"),
    Case("compare nesterov without momentum", "compare", [*BASE_ARGV["compare"], "--nesterov", "--momentum", "0"],
         "--nesterov needs a momentum"),
    Case("compare warmup beyond epochs", "compare", [*BASE_ARGV["compare"], "--warmup-epochs", "5"],
         "--warmup-epochs must be in [0, --epochs]"),
    # 3. data files
    Case("data truncated gz", "train", MNIST, "train-images-idx3-ubyte.gz: bad gzip file", truncate(TRAIN_IMG)),
    Case("data flipped byte in gz", "train", MNIST, "train-images-idx3-ubyte.gz: bad gzip file", flip_byte(TRAIN_IMG)),
    Case("data text named gz", "train", MNIST, "train-labels-idx1-ubyte.gz: bad gzip file",
         write(TRAIN_LAB, b"this is not gzip\n")),
    Case("data empty gzip", "train", MNIST, "t10k-images-idx3-ubyte.gz: not an IDX file",
         write(TEST_IMG, gzip.compress(b""))),
    Case("data empty file named gz", "train", MNIST, "t10k-images-idx3-ubyte.gz", write(TEST_IMG, b"")),
    Case("data labels where images belong", "train", MNIST, "train-images-idx3-ubyte.gz: wrong dimensions",
         copy_file(TRAIN_LAB, TRAIN_IMG)),
    Case("data images where labels belong", "train", MNIST, "train-labels-idx1-ubyte.gz: wrong dimensions",
         copy_file(TRAIN_IMG, TRAIN_LAB)),
    Case("data image and label counts differ", "train", MNIST, "counts differ",
         mnist(tl=torch.zeros(40, dtype=torch.uint8))),
    Case("data test counts differ", "train", MNIST, "t10k-images-idx3-ubyte.gz holds 20 images",
         mnist(sl=torch.zeros(10, dtype=torch.uint8))),
    Case("data wrong IDX magic", "train", MNIST, "wrong IDX magic", write(TRAIN_IMG, gzip.compress(b"\x01\x02" * 50))),
    Case("data IDX shorter than its header says", "train", MNIST, "truncated or too long",
         write(TRAIN_IMG, gzip.compress(idx_bytes(torch.zeros(60, 28, 28, dtype=torch.uint8))[:-100]))),
    Case("data images not 28x28", "train", MNIST, "expected 28x28",
         mnist(ti=torch.zeros(60, 14, 14, dtype=torch.uint8))),
    Case("data label out of range", "train", MNIST, "label 12 is out of range",
         mnist(tl=torch.full((60,), 12, dtype=torch.uint8))),
    Case("imp data truncated gz", "imp", [*MNIST, "--rounds", "1"], "bad gzip file", truncate(TRAIN_IMG)),
    Case("compare data flipped byte", "compare",
         [*BASE_ARGV["compare"][2:], "--dataset", "mnist", "--data-dir", "{root}/data", "--val-size", "10"],
         "bad gzip file", flip_byte(TRAIN_IMG)),
    # 4. run-folder files
    Case("train config.json not an object", "train", EP, "holds a JSON list", write("ep/config.json", LIST_JSON)),
    Case("train config.json truncated", "train", EP, "config.json is corrupted", truncate("ep/config.json")),
    Case("evaluate config.json not an object", "train", ["--evaluate", "{root}/ep"], "holds a JSON list",
         write("ep/config.json", LIST_JSON)),
    Case("export config.json not an object", "export", ["{root}/ep", "--out", "{root}/x.pt2"], "holds a JSON list",
         write("ep/config.json", LIST_JSON)),
    Case("analyze config.json not an object", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/an"],
         "holds a JSON list", write("ep2/config.json", LIST_JSON)),
    Case("imp config.json not an object", "imp", IMP, "holds a JSON list", write("imp/config.json", LIST_JSON)),
    Case("imp round config.json not an object", "imp", IMP, "holds a JSON list",
         write("imp/round_01/config.json", LIST_JSON)),
    Case("train results.json truncated", "train", EP, "results.json is corrupted", truncate("ep/results.json")),
    Case("train results.json not an object", "train", EP, "holds a JSON str", write("ep/results.json", b'"done"')),
    Case("evaluate results.json truncated", "train", ["--evaluate", "{root}/ep"], "results.json is corrupted",
         truncate("ep/results.json")),
    Case("imp round results.json truncated", "imp", IMP, "results.json is corrupted",
         truncate("imp/round_01/results.json")),
    Case("imp round 0 results.json truncated", "imp", IMP, "results.json is corrupted",
         truncate("imp/round_00/results.json", 0.3)),
    Case("train resume checkpoint without model", "train", [*EP, "--resume"], "no 'model' entry",
         chain(NO_RESULTS, checkpoint_without("ep/checkpoint.pt", "model"))),
    Case("train resume checkpoint without optimizer", "train", [*EP, "--resume"], "no 'optimizer' entry",
         chain(NO_RESULTS, checkpoint_without("ep/checkpoint.pt", "optimizer"))),
    Case("evaluate checkpoint without model", "train", ["--evaluate", "{root}/ep"], "no 'model' entry",
         checkpoint_without("ep/checkpoint.pt", "model")),
    Case("export checkpoint without model", "export", ["{root}/ep", "--out", "{root}/x.pt2"], "no 'model' entry",
         checkpoint_without("ep/checkpoint.pt", "model")),
    Case("analyze checkpoint without model", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/an"],
         "no 'model' entry", checkpoint_without("ep/checkpoint.pt", "model")),
    Case("imp round checkpoint without masks", "imp", IMP, "no 'masks' entry",
         checkpoint_without("imp/round_01/checkpoint.pt", "masks")),
    Case("imp resume round checkpoint without model", "imp", IMP, "no 'model' entry",
         chain(unlink("imp/round_01/results.json"), unlink("imp/results.json"),
               checkpoint_without("imp/round_01/checkpoint.pt", "model"))),
    Case("train resume another run's checkpoint", "train", [*EP, "--resume"], "does not fit this run",
         chain(NO_RESULTS, OTHER_CKPT)),
    Case("evaluate another run's checkpoint", "train", ["--evaluate", "{root}/ep"], "does not fit", OTHER_CKPT),
    Case("export another run's checkpoint", "export", ["{root}/ep", "--out", "{root}/x.pt2"], "does not fit",
         OTHER_CKPT),
    Case("analyze another run's checkpoint", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/an"],
         "does not fit", OTHER_CKPT),
    Case("imp resume another run's checkpoint", "imp", IMP, "does not fit this run",
         chain(unlink("imp/round_01/results.json"), unlink("imp/results.json"),
               lambda root: swap_model("imp/round_01/checkpoint.pt", "wide/checkpoint.pt")(root))),
    Case("imp init.pt of another run", "imp", IMP, "init.pt does not fit this run's network",
         chain(lambda root: shutil.rmtree(root / "imp/round_01"), unlink("imp/results.json"),
               swap_model("imp/init.pt", "wide/checkpoint.pt"))),
    Case("imp previous round's checkpoint of another run", "imp", IMP, "round_00/checkpoint.pt does not fit",
         chain(lambda root: shutil.rmtree(root / "imp/round_01"), unlink("imp/results.json"),
               swap_model("imp/round_00/checkpoint.pt", "wide/checkpoint.pt"))),
    Case("train resume checkpoint flipped byte", "train", [*EP, "--resume"], "checkpoint",
         chain(NO_RESULTS, flip_byte("ep/checkpoint.pt"))),
    Case("train resume checkpoint flipped tensor byte", "train", [*EP, "--resume"], "checksum does not match",
         chain(NO_RESULTS, lambda root: flip_tensor_byte(root / "ep/checkpoint.pt"))),
    Case("evaluate checkpoint flipped tensor byte", "train", ["--evaluate", "{root}/ep"], "checksum does not match",
         lambda root: flip_tensor_byte(root / "ep/checkpoint.pt")),
    Case("export checkpoint flipped tensor byte", "export", ["{root}/ep", "--compact", "--out", "{root}/x.smask"],
         "checksum does not match", lambda root: flip_tensor_byte(root / "ep/checkpoint.pt")),
    Case("analyze checkpoint flipped tensor byte", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/an"],
         "checksum does not match", lambda root: flip_tensor_byte(root / "ep2/checkpoint.pt")),
    Case("imp init.pt flipped tensor byte", "imp", IMP, "checksum does not match",
         lambda root: flip_tensor_byte(root / "imp/init.pt")),
    Case("imp round checkpoint flipped tensor byte", "imp", IMP, "checksum does not match",
         lambda root: flip_tensor_byte(root / "imp/round_01/checkpoint.pt")),
    Case("train resume checkpoint garbage", "train", [*EP, "--resume"], "corrupted or unreadable",
         chain(NO_RESULTS, write("ep/checkpoint.pt", b"garbage"))),
    Case("train resume checkpoint not a dict", "train", [*EP, "--resume"], "no dict inside",
         chain(NO_RESULTS, lambda root: torch.save([1, 2], root / "ep/checkpoint.pt"))),
    Case("train resume checkpoint truncated", "train", [*EP, "--resume"], "corrupted",
         chain(NO_RESULTS, truncate("ep/checkpoint.pt"))),
    # 5d. a full disk
    Case("train full disk at config.json", "train", BASE_ARGV["train"], "no space left", patch=full_disk(0)),
    Case("train full disk at the checkpoint", "train", BASE_ARGV["train"], "no space left", patch=full_disk(1)),
    Case("imp full disk at init.pt", "imp", BASE_ARGV["imp"], "no space left", patch=full_disk(1)),
    Case("train resume full disk", "train", [*EP, "--resume"], "no space left", NO_RESULTS, full_disk(0)),
    Case("export compact full disk", "export", ["{root}/ep", "--compact", "--out", "{root}/x.smask"], "no space left",
         patch=full_disk(0)),
    Case("export deployable full disk", "export", ["{root}/ep", "--out", "{root}/x.pt2"], "no space left",
         patch=full_disk(0)),
    Case("analyze full disk", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/an"], "no space left",
         patch=full_disk(0)),
    Case("compare full disk at the table", "compare", BASE_ARGV["compare"], "no space left",
         patch=full_disk_at("table.md"), compare_runs=True),
    Case("compare full disk at the csv", "compare", BASE_ARGV["compare"], "no space left",
         patch=full_disk_at("table.csv"), compare_runs=True),
    Case("compare full disk at the plot", "compare", BASE_ARGV["compare"], "no space left",
         patch=full_disk_at("plot.png"), compare_runs=True),
    Case("instability full disk at the table", "instability", BASE_ARGV["instability"], "no space left",
         trained_copies, full_disk_at("table.md")),
    Case("instability full disk at the plot", "instability", BASE_ARGV["instability"], "no space left",
         trained_copies, full_disk_at("plot.png")),
    Case("instability stored path truncated", "instability", BASE_ARGV["instability"], "corrupted (not valid JSON",
         finished_analysis_then(truncate("inst/path_k000000.json"))),
    Case("analyze full disk at the report", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/an"],
         "no space left", patch=full_disk(5)),
    # 6. output that would destroy input; the output's suffix
    Case("export compact onto itself", "export",
         ["{root}/ep.smask", "--compact", "--out", "{root}/ep.smask", "--force"],
         "is one of the inputs"),
    Case("export compact to pt2 onto itself", "export", ["{root}/ep.smask", "--out", "{root}/ep.smask", "--force"],
         "named *.pt2"),
    Case("export onto the checkpoint", "export", ["{root}/ep", "--out", "{root}/ep/checkpoint.pt", "--force"],
         "named *.pt2"),
    Case("export onto config.json", "export", ["{root}/ep", "--compact", "--out", "{root}/ep/config.json", "--force"],
         "named *.smask"),
    Case("export compact named pt2", "export", ["{root}/ep", "--compact", "--out", "{root}/x.pt2"], "drop --compact"),
    Case("export deployable named smask", "export", ["{root}/ep", "--out", "{root}/x.smask"], "add --compact"),
    Case("export existing out without force", "export", ["{root}/ep", "--compact", "--out", "{root}/ep.smask"],
         "--force"),
    Case("export onto a folder", "export", ["{root}/ep", "--out", "{root}/ep2.pt2"], "is a folder",
         lambda root: (root / "ep2.pt2").mkdir()),
    Case("export out is the current folder", "export", ["{root}/ep", "--out", ""], "is a folder"),
    Case("export out is a folder without suffix", "export", ["{root}/ep", "--out", "{root}/ep2"], "is a folder"),
    Case("analyze into an input run", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/ep", "--force"],
         "inside the input run"),
    Case("analyze into a folder inside an input run", "analyze",
         ["{root}/ep", "{root}/imp", "--out", "{root}/imp/round_01/an"], "inside the input run"),
    # other bad inputs of export and analyze
    Case("export missing run", "export", ["{root}/nothing", "--out", "{root}/x.pt2"], "not a folder"),
    Case("export whole IMP run", "export", ["{root}/imp", "--out", "{root}/x.pt2"], "whole IMP run"),
    Case("export compact of an IMP round", "export", ["{root}/imp/round_01", "--compact", "--out", "{root}/x.smask"],
         "--compact needs a supermask"),
    Case("export out folder missing", "export", ["{root}/ep", "--out", "{root}/no/x.pt2"], "does not exist"),
    Case("export compact file truncated", "export", ["{root}/ep.smask", "--out", "{root}/x.pt2"],
         "not a valid compact", truncate("ep.smask")),
    # export --evaluate reads the test set before it writes: bad data leaves no --out behind
    Case("export evaluate truncated test images", "export",
         ["{root}/mn", "--evaluate", "--data-dir", "{root}/data", "--out", "{root}/x.pt2"], "t10k-images-idx3-ubyte.gz",
         truncate(TEST_IMG)),
    Case("export compact evaluate missing data", "export",
         ["{root}/mn", "--compact", "--evaluate", "--data-dir", "{root}/nodata", "--out", "{root}/x.smask"], "mnist"),
    Case("analyze truncated results.json", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/an"],
         "corrupted (not valid JSON", truncate("ep/results.json")),
    Case("analyze results.json not an object", "analyze", ["{root}/ep", "{root}/imp", "--out", "{root}/an"],
         "holds a JSON list", write("imp/round_01/results.json", LIST_JSON)),
    Case("analyze one mask", "analyze", ["{root}/ep", "--out", "{root}/an"], "two or more"),
    Case("analyze missing run", "analyze", ["{root}/ep", "{root}/nothing", "--out", "{root}/an"], "not a folder"),
    Case("analyze out is a file", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/ep.smask"],
         "not a folder"),
    # issue #24, kind 1: integrity that covers the whole file
    Case("export smask whose config says seed 4", "export", ["{root}/ep.smask", "--out", "{root}/x.pt2"],
         "checksum mismatch", lambda root: edit_smask_config(root / "ep.smask", seed=4)),
    Case("export smask whose input shape changed", "export", ["{root}/ep.smask", "--out", "{root}/x.pt2"],
         "checksum mismatch", lambda root: edit_smask_meta(root / "ep.smask", input_shape="[1, 28, 27]")),
    # kind 2: a run's files belong together; a finished run's results.json carries its config and keys
    Case("train another run's results.json", "train", EP, "another run's (its config differs: seed)",
         copy_file("ep2/results.json", "ep/results.json")),
    Case("train results.json empty object", "train", EP, "names no config", write("ep/results.json", b"{}")),
    Case("train results.json test_acc high", "train", EP, "'test_acc'",
         lambda root: edit_json(root / "ep/results.json", test_acc="high")),
    Case("evaluate another run's results.json", "train", ["--evaluate", "{root}/ep"], "another run's",
         copy_file("ep2/results.json", "ep/results.json")),
    Case("analyze results.json empty object", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/an"],
         "names no config", write("ep2/results.json", b"{}")),
    Case("imp round holding another round's results.json", "imp", IMP, "another run's (its config differs: round",
         copy_file("imp/round_00/results.json", "imp/round_01/results.json")),
    Case("compare stored results.json empty object", "compare", BASE_ARGV["compare"], "names no config",
         lambda root: write(str(next((root / "cruns").glob("fc_w0.25_synthetic_k0.5_*")) / "results.json"),
                            b"{}")(root), compare_runs=True),
    Case("compare stored IMP results.json rounds missing", "compare", [*BASE_ARGV["compare"], "--no-train"],
         "'rounds'", lambda root: edit_json(next((root / "cruns").glob("imp_*")) / "results.json", rounds=None),
         compare_runs=True),
    # kind 3: values read from files go through the checks of the flag they stand for
    Case("export config.json width a string", "export", ["{root}/ep", "--out", "{root}/x.pt2"], "'width'",
         lambda root: edit_json(root / "ep/config.json", width="0.25")),
    Case("evaluate config.json k a list", "train", ["--evaluate", "{root}/ep"], "'k'",
         lambda root: edit_json(root / "ep/config.json", k=[0.5])),
    Case("analyze config.json model a list", "analyze", ["{root}/ep", "{root}/ep2", "--out", "{root}/an"], "'model'",
         lambda root: edit_json(root / "ep2/config.json", model=["fc"])),
    Case("imp config.json rounds a string", "imp", IMP, "'rounds'", lambda root: edit_json(root / "imp/config.json",
                                                                                           rounds="5")),
    # kind 5: output places checked before any work
    Case("compare read-only --out trains nothing", "compare", BASE_ARGV["compare"], "cannot write to --out",
         lambda root: (root / "cmp").mkdir(), read_only("cmp")),
    Case("compare read-only --runs-dir trains nothing", "compare", BASE_ARGV["compare"], "cannot write to --runs-dir",
         lambda root: (root / "cruns").mkdir(), read_only("cruns")),
    Case("instability read-only --out", "instability", BASE_ARGV["instability"], "cannot write to --out",
         lambda root: (root / "inst").mkdir(), read_only("inst")),
    Case("instability read-only --runs-dir", "instability", BASE_ARGV["instability"], "cannot write to --runs-dir",
         lambda root: (root / "iruns").mkdir(), read_only("iruns")),
    Case("compare --out holding another comparison", "compare", [*BASE_ARGV["compare"], "--ks", "0.3", "--no-train"],
         "holds another comparison; pass --force", compare_runs=True),
    Case("compare --out holding files of its own", "compare", BASE_ARGV["compare"],
         "files not written by this comparison", lambda root: (root / "cmp").mkdir() or
         (root / "cmp" / "table.md").write_text("the committed table\n")),
    # kind 8: the data a run uses is the data it names
    Case("train --dataset mnist on Fashion-MNIST's files", "train", MNIST, "holds fashion-mnist's training labels",
         fashion_labels_as_mnist),
    Case("train misspelled --data-dir does not fall back silently", "train",
         [MNIST[0], "fashion-mnist", "--data-dir", "{root}/dta", *MNIST[4:]], "does not exist (misspelled?)",
         lambda root: None if Path("/usr/share/datasets/fashion-mnist").is_dir() else pytest.skip("no Debian data")),
    # kind 4: sizes bounded before they are read or allocated
    Case("train --config /dev/zero", "train", [*BASE_ARGV["train"], "--config", "/dev/zero"], "larger than"),
    Case("train --config YAML alias bomb", "train", [*BASE_ARGV["train"], "--config", "{root}/bomb.yaml"],
         "uses a YAML alias", lambda root: (root / "bomb.yaml").write_text(BOMB_YAML)),
    Case("train --width 1000", "train", [*BASE_ARGV["train"], "--width", "1000"], "GiB available"),
    Case("imp --width 1000", "imp", [*BASE_ARGV["imp"], "--width", "1000"], "GiB available"),
    Case("instability --width 1000", "instability", [*BASE_ARGV["instability"], "--width", "1000"], "GiB available"),
    Case("data IDX header declaring 2**32 images", "train", MNIST, "more than the",
         write(TRAIN_IMG, gzip.compress(struct.pack(">HBBIII", 0, 8, 3, 2**32 - 1, 28, 28)))),
    Case("imp config.json rounds 1e15", "imp", IMP, "'rounds'",
         lambda root: (root / "imp/config.json").write_text(
             (root / "imp/config.json").read_text().replace('"rounds": 1', '"rounds": 1e15'))),
]


def edit_json(path: Path, **values):
    """path's JSON object with values set (None: the key removed)."""
    obj = json.loads(path.read_text())
    for k, v in values.items():
        obj.pop(k) if v is None else obj.__setitem__(k, v)
    path.write_text(json.dumps(obj))


def edit_smask_meta(path: Path, **values):
    """A compact file with metadata fields replaced, its tensors and checksum untouched."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"].update(values)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def edit_smask_config(path: Path, **values):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    config = json.loads(json.loads(data[8:8 + n])["__metadata__"]["config"])
    edit_smask_meta(path, config=json.dumps({**config, **values}, sort_keys=True, separators=(",", ":")))


def flip_tensor_byte(path: Path):
    """Flip one byte inside the largest tensor's data in a torch.save zip (the zip stays readable)."""
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    (name_len, extra_len) = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


ALL_CASES = flag_cases() + CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_bad_input(case: Case, base, tmp_path, capsys, monkeypatch, request):
    root = tmp_path / "case"
    root.mkdir()
    copy_base(base, root)
    if case.compare_runs:
        copy_base(request.getfixturevalue("compared"), root)
    if case.setup:
        case.setup(root)
    before = snapshot(root)
    code, err = run_case(case, root, capsys, monkeypatch)
    # (a full disk may stop analyze between two of its files: each is whole, the folder is not)
    check_clean(code, err, before, root, case.expect,
                writes_nothing=case.command in ("export", "analyze") and case.patch is None)


def test_there_are_enough_cases_of_every_kind_and_command():
    assert len(ALL_CASES) >= 100
    assert {c.command for c in ALL_CASES} == set(COMMANDS)
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES)


def test_every_numeric_flag_has_rows():
    """A numeric flag added to any command without a row in NUMERIC_FLAGS fails here; so does a
    numeric flag parsed by plain int/float (no range check)."""
    covered = {(flag, command) for flag, commands, _ in NUMERIC_FLAGS for command in commands}
    for command, (_, _, make_parser) in COMMANDS.items():
        for action in make_parser()._actions:
            flag = next((s for s in action.option_strings if s.startswith("--")), None)
            if flag is None or action.type is None:
                continue
            assert action.type not in (int, float), f"{command} {flag}: plain {action.type.__name__}, no range check"
            if action.type.__module__ == "supermask.cli":  # a cli.number
                assert (flag, command) in covered, f"{command} {flag} has no row in NUMERIC_FLAGS"


# The real command line: the same checks through `python -m`, a fresh process each.
SUBPROCESS_CASES = [
    Case("cli train --lr nan", "train", [*BASE_ARGV["train"], "--lr", "nan"], "argument --lr:"),
    Case("cli imp --momentum -1", "imp", [*BASE_ARGV["imp"], "--momentum", "-1"], "argument --momentum:"),
    Case("cli export onto itself", "export",
         ["{root}/ep.smask", "--compact", "--out", "{root}/ep.smask", "--force"], "is one of the inputs"),
    Case("cli train truncated results.json", "train", EP, "results.json is corrupted", truncate("ep/results.json")),
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=str)
def test_bad_input_real_command_line(case: Case, base, tmp_path):
    root = tmp_path / "case"
    root.mkdir()
    copy_base(base, root)
    if case.setup:
        case.setup(root)
    before = snapshot(root)
    module = {"train": "supermask.train", "imp": "supermask.imp", "export": "supermask.export"}[case.command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", module, *[a.format(root=root) for a in case.argv]],
                          capture_output=True, text=True, env=env, timeout=300)
    check_clean(proc.returncode, proc.stderr, before, root, case.expect)


def test_the_divergence_error_leaves_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """A run that diverges in its second epoch keeps epoch 1's checkpoint and metrics, unfinished."""
    import supermask.training as training

    out = tmp_path / "run"
    real_lr, calls = training.learning_rate, [0]

    def lr_that_explodes_in_epoch_2(cfg, step, total, per_epoch=1):
        calls[0] += 1
        return real_lr(cfg, step, total, per_epoch) * (1e30 if step >= per_epoch else 1.0)

    monkeypatch.setattr(training, "learning_rate", lr_that_explodes_in_epoch_2)
    code = run_main("train", train_mod.main, [*TINY, "--epochs", "2", "--dense", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "training loss became" in err and "epoch 2" in err and err.count("\n") == 1
    assert not (out / "results.json").exists()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
