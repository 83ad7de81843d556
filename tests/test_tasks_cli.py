"""python -m supermask.tasks: a run and its rerun (nothing recomputed), and every bad input in the
table-driven style of test_bad_inputs.py: exit code 2, exactly one line on stderr, no traceback,
every file that existed before unchanged (SHA-256), no run stored as finished, no temporary file."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from supermask import tasks
from supermask.cli import run_main
from supermask.storage import exclusive, load_checkpoint, save_checkpoint

TINY = ["--dataset", "synthetic", "--tasks", "3", "--epochs", "1", "--width", "0.25", "--no-progress",
        "--threads", "1"]
NEW = [*TINY, "--out", "{root}/new"]
DONE = [*TINY, "--out", "{root}/done"]  # the command that made done/: it finds its run
PART = [*TINY, "--out", "{root}/part"]  # done/ less task 2 and the results: an interrupted run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    assert run_main(tasks.PROG, tasks.main, [a.format(root=root) for a in DONE]) == 0
    part = root / "part"
    part.mkdir()
    for name in ("config.json", "task_000.pt", "task_001.pt"):
        shutil.copy2(root / "done" / name, part / name)
    return root


def test_a_run_then_its_rerun_recomputes_nothing(base, tmp_path, capsys):
    shutil.copytree(base / "done", tmp_path / "done")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert run_main(tasks.PROG, tasks.main, [a.format(root=tmp_path) for a in DONE]) == 0
    out = capsys.readouterr().out
    assert "already holds this finished task sequence (nothing recomputed)" in out
    assert "mean test accuracy with the task given" in out and "bytes per task" in out
    assert snapshot(tmp_path) == before


def test_the_command_line_runs(base, tmp_path):
    """The real `python -m supermask.tasks`: --help, and a finished run (only read)."""
    shutil.copytree(base / "done", tmp_path / "done")
    before = snapshot(tmp_path)
    runs = [subprocess.run([sys.executable, "-m", "supermask.tasks", *argv], capture_output=True, text=True,
                           timeout=300) for argv in (["--help"], [a.format(root=tmp_path) for a in DONE])]
    assert runs[0].returncode == 0 and "--benchmark" in runs[0].stdout and "--baselines" in runs[0].stdout
    entries = re.split(r"\n(?=  -)", runs[0].stdout.split("options:", 1)[1].strip("\n"))
    assert all("default" in e for e in entries if not e.lstrip().startswith("-h, --help")), runs[0].stdout
    assert runs[1].returncode == 0, runs[1].stderr
    assert "nothing recomputed" in runs[1].stdout
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Bad inputs


@dataclass
class Case:
    id: str
    argv: list[str]  # "{root}" is the case's copy of the fixtures
    expect: str  # a fragment the one line must hold
    setup: Callable[[Path], None] | None = None  # damage the case's copy
    locked: str | None = None  # a folder another process holds while the command runs

    def __str__(self):
        return self.id


NUMERIC_FLAGS = [
    ("--tasks", ["1", "0", "-2", "x", "2.5", "1001"]),
    ("--epochs", ["0", "-1", "nan", "1.5"]),
    ("--width", ["0", "-1", "nan", "inf"]),
    ("--k", ["0", "1.5", "nan", "-0.5"]),
    ("--seed", ["-1", "1.5", str(2**40)]),
    ("--baselines", ["-1", "x", "nan"]),
    ("--threads", ["-1", "1.5", "10000"]),
]


def flag_cases() -> list[Case]:
    return [Case(f"{flag} {value}", [*NEW, flag, value], f"argument {flag}:")
            for flag, values in NUMERIC_FLAGS for value in values]


def truncate(rel: str):
    def setup(root: Path):
        p = root / rel
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return setup


def flip_byte(rel: str):
    def setup(root: Path):
        p = root / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    return setup


def write(rel: str, content: bytes):
    return lambda root: (root / rel).write_bytes(content)


def mkdir_with_file(rel: str):
    def setup(root: Path):
        (root / rel).mkdir()
        (root / rel / "notes.txt").write_text("mine\n")
    return setup


def edit_task(rel: str, **entries):
    """A task file with some entries replaced (its checksum rewritten: valid, but wrong inside)."""
    def setup(root: Path):
        state = load_checkpoint(root / rel)
        state.update(entries)
        save_checkpoint(root / rel, state)
    return setup


def no_fashion(root: Path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")


FOREIGN_RESULTS = (b'{"config": {"command": "tasks"}, "matrix": [], "final_acc": [], "mean_acc": 0, '
                   b'"inference": {}, "bytes_per_task": 0, "baselines": {}}\n')

CASES = [
    *flag_cases(),
    Case("unknown benchmark", [*NEW, "--benchmark", "rotated"], "argument --benchmark:"),
    Case("dataset it does not take", [*NEW, "--dataset", "cifar10"], "argument --dataset:"),
    Case("split with 6 tasks", [*NEW, "--benchmark", "split", "--tasks", "6"], "at most 5 tasks"),
    Case("baselines for every task", [*NEW, "--baselines", "3"], "--baselines must be in [0, 2]"),
    Case("out is a file", [*TINY, "--out", "{root}/afile"], "is not a folder", write("afile", b"x\n")),
    Case("out a foreign non-empty folder", [*TINY, "--out", "{root}/mine"], "holds no task sequence",
         mkdir_with_file("mine")),
    Case("finished run, other seed", [*TINY, "--seed", "1", "--out", "{root}/done"], "another configuration (seed"),
    Case("unfinished run, other epochs", [*PART, "--epochs", "2"], "another configuration (epochs"),
    Case("unfinished run, other benchmark", [*PART, "--benchmark", "split"], "another configuration (benchmark"),
    Case("config.json truncated", PART, "config.json is corrupted", truncate("part/config.json")),
    Case("task file truncated", PART, "task_001.pt is corrupted or unreadable", truncate("part/task_001.pt")),
    Case("task file flipped byte", PART, "task_001.pt is corrupted", flip_byte("part/task_001.pt")),
    Case("task file without masks", PART, "has no 'masks' entry",
         lambda root: _drop(root / "part/task_001.pt", "masks")),
    Case("task file with another task's row", PART, "does not hold task 1's accuracy row",
         edit_task("part/task_001.pt", row=[50.0])),
    Case("task file of another network", PART, "task_001.pt does not fit this network",
         edit_task("part/task_001.pt", masks={"1": torch.zeros(3, dtype=torch.uint8)})),
    Case("results.json truncated", DONE, "results.json is corrupted", truncate("done/results.json")),
    Case("results.json not an object", DONE, "holds a JSON list", write("done/results.json", b"[1, 2]\n")),
    Case("results.json another run's", DONE, "is not this run's results (its config differs)",
         write("done/results.json", FOREIGN_RESULTS)),
    Case("unfinished run held by another process", PART, "being written by another process", locked="part"),
    Case("data dir misspelled", [*NEW, "--dataset", "fashion-mnist", "--data-dir", "{root}/nope"],
         "does not exist (misspelled?)", no_fashion),
]


def _drop(path: Path, key: str):
    state = load_checkpoint(path)
    del state[key]
    save_checkpoint(path, state)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*")) if p.name != ".lock"}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case, base, tmp_path, capsys):
    for p in base.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp_path / p.name)
    if case.setup:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    argv = [a.format(root=tmp_path) for a in case.argv]
    try:
        if case.locked:
            with exclusive(tmp_path / case.locked):
                code = run_main(tasks.PROG, tasks.main, argv)
        else:
            code = run_main(tasks.PROG, tasks.main, argv)
    except SystemExit as e:  # argparse's errors (cli.Parser: one line, exit 2)
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert case.expect in err, err
    after = snapshot(tmp_path)
    assert not [f for f in before if after.get(f) != before[f]], "changed or removed"
    new = set(after) - set(before)
    assert not [f for f in new if f.endswith(("results.json", ".pt"))], f"stored: {new}"
    assert not [p for p in tmp_path.rglob(".*") if p.is_file() and p.name != ".lock"], "temporary files left"
