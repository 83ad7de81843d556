"""Kill train and imp at every point where a run's files could disagree, resume, and get exactly
the run that was never interrupted: results, scores / weights, masks and metrics.jsonl, with no
temporary file left.

The kill is a real process death (os._exit in a child process, no cleanup, no finally blocks),
placed exactly by a driver script that wraps one library function in the child only:
- "lr:N": the N-th call of training.learning_rate (once per step): mid-epoch, e.g. before the
  first checkpoint;
- "save:N": the N-th checkpoint.pt save, before it writes: after the epoch's metrics row, before
  its checkpoint (metrics.jsonl one row ahead of checkpoint.pt);
- "rename:N": inside the N-th checkpoint.pt save, its temporary file written, before the rename.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from supermask import imp as imp_mod
from supermask import train as train_mod
from supermask.cli import run_main
from supermask.storage import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--width", "0.25", "--val-size", "200", "--no-progress", "--threads", "1",
        "--backend", "torch"]
TRAIN = [*TINY, "--epochs", "3"]
IMP = [a for a in TINY if a not in ("--backend", "torch")] + ["--epochs", "2", "--rounds", "1", "--val-every", "0"]
STEPS = 22  # iterations per epoch: (3000 - 200) / 128, rounded up; learning_rate is called STEPS + 1 times an epoch
MAIN = {"train": train_mod.main, "imp": imp_mod.main}

DRIVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import supermask.training as training
    from supermask import imp, train
    from supermask.cli import run_main

    point, n = sys.argv[1].split(":")
    command, argv, calls = sys.argv[2], sys.argv[3:], [0]

    def count():
        calls[0] += 1
        if calls[0] == int(n):
            os._exit(137)  # a kill: no exception, no finally, nothing flushed or cleaned

    if point == "lr":
        real_lr = training.learning_rate
        def learning_rate(*a, **k):
            count()
            return real_lr(*a, **k)
        training.learning_rate = learning_rate
    elif point == "save":
        real_save = training.save_checkpoint
        def save_checkpoint(path, state):
            if Path(path).name == "checkpoint.pt":
                count()
            return real_save(path, state)
        training.save_checkpoint = save_checkpoint
    elif point == "rename":
        real_replace = os.replace
        def replace(src, dst, *a, **k):
            if Path(dst).name == "checkpoint.pt":
                count()
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    sys.exit(run_main(command, {{"train": train, "imp": imp}}[command].main, argv))
""")


def kill_at(tmp_path: Path, command: str, point: str, argv: list[str]) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(driver), point, command, *argv], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 137, (proc.returncode, proc.stderr[-2000:])


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def results(path: Path) -> dict:
    res = json.loads(path.read_text())
    res.pop("seconds_per_epoch", None)
    for row in res.get("rounds", []):
        row.pop("seconds_per_epoch", None)
    res.pop("config", None) if "rounds" in res else None  # (IMP: the same flags, checked by config.json)
    return res


def assert_equal(a, b, where=""):
    """Nested dicts / lists of tensors and numbers: equal exactly (tensors bit for bit)."""
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in b:
            assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(b, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def same_checkpoint(a: Path, b: Path):
    """The same training state: weights and scores, masks, optimizer (momentum buffers), epoch,
    validation curve and RNG state (the metrics rows inside are compared without their seconds)."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for key in ("metrics", "epoch_seconds"):
        ca.pop(key, None), cb.pop(key, None)
    if "masks" in cb:  # IMP neither seeds nor draws from torch's global RNG: its state is the process's
        ca.pop("rng"), cb.pop("rng")
    assert_equal(ca, cb, str(a))


def assert_same_run(run: Path, reference: Path, rounds: list[str]):
    for sub in rounds:
        r, ref = run / sub, reference / sub
        assert results(r / "results.json") == results(ref / "results.json"), sub
        assert metrics(r) == metrics(ref), sub
        same_checkpoint(r / "checkpoint.pt", ref / "checkpoint.pt")
    if rounds != [""]:
        assert results(run / "results.json") == results(reference / "results.json")
    temps = [p for p in run.rglob(".*") if p.name != ".lock"]
    assert not temps, f"temporary files left: {temps}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs, in a fresh process each like the killed ones."""
    root = tmp_path_factory.mktemp("reference")
    for command, argv in (("train", TRAIN), ("imp", IMP)):
        proc = subprocess.run([sys.executable, "-m", f"supermask.{command}", *argv, "--out", str(root / command)],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root


TRAIN_KILLS = [
    ("before the first checkpoint, plain command", "lr:10", []),
    ("before the first checkpoint, --resume", f"lr:{STEPS - 3}", ["--resume"]),
    ("inside the second checkpoint save", "rename:2", ["--resume"]),
    ("between the second metrics row and its checkpoint", "save:2", ["--resume"]),
]


@pytest.mark.parametrize("what,point,again", TRAIN_KILLS, ids=[k[0] for k in TRAIN_KILLS])
def test_train_killed_then_resumed_equals_the_uninterrupted_run(reference, tmp_path, what, point, again):
    out = tmp_path / "run"
    kill_at(tmp_path, "train", point, [*TRAIN, "--out", str(out)])
    if point.startswith("rename"):
        assert list(out.glob(".checkpoint.pt.*")), "the kill inside the save leaves its temporary file"
        assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    if point.startswith("save"):
        assert len(metrics(out)) == load_checkpoint(out / "checkpoint.pt")["epoch"] + 1  # the window
    if point.startswith("lr"):
        assert not (out / "checkpoint.pt").exists()
    assert run_main("train", train_mod.main, [*TRAIN, "--out", str(out), *again]) == 0
    assert_same_run(out, reference / "train", [""])


IMP_KILLS = [
    ("round 0 before its first checkpoint", "lr:10"),
    ("round 1 before its first checkpoint", f"lr:{2 * (STEPS + 1) + 5}"),
    ("inside round 1's first checkpoint save", "rename:3"),
    ("between round 1's second metrics row and its checkpoint", "save:4"),
]


@pytest.mark.parametrize("what,point", IMP_KILLS, ids=[k[0] for k in IMP_KILLS])
def test_imp_killed_then_resumed_equals_the_uninterrupted_run(reference, tmp_path, what, point):
    out = tmp_path / "run"
    kill_at(tmp_path, "imp", point, [*IMP, "--out", str(out)])
    if point == "save:4":
        assert len(metrics(out / "round_01")) == 2 and load_checkpoint(out / "round_01" / "checkpoint.pt")["epoch"] == 1
    if point.startswith("rename"):
        assert list((out / "round_01").glob(".checkpoint.pt.*"))
    assert run_main(imp_mod.PROG, imp_mod.main, [*IMP, "--out", str(out)]) == 0  # the same command resumes
    assert_same_run(out, reference / "imp", ["round_00", "round_01"])
    assert load_checkpoint(out / "init.pt")["model"].keys() == load_checkpoint(reference / "imp" / "init.pt")["model"].keys()


def test_ctrl_c_before_the_first_checkpoint_claims_none(tmp_path, capsys, monkeypatch):
    """Ctrl-C in epoch 1: the message (the one `python -m supermask.train` prints) claims no
    checkpoint, and --resume starts the run again."""
    import supermask.training as training

    out = tmp_path / "run"
    real_lr = training.learning_rate

    def interrupted(cfg, step, *a):
        if step == 5:
            raise KeyboardInterrupt
        return real_lr(cfg, step, *a)

    monkeypatch.setattr(training, "learning_rate", interrupted)
    argv = [*TRAIN, "--epochs", "1", "--out", str(out)]
    assert run_main("train", train_mod.main, argv, interrupted=train_mod.INTERRUPTED) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpointed" not in err and "starts again" in err
    assert not (out / "checkpoint.pt").exists()
    monkeypatch.setattr(training, "learning_rate", real_lr)
    assert run_main("train", train_mod.main, [*argv, "--resume"]) == 0
    assert [m["epoch"] for m in metrics(out)] == [1]
