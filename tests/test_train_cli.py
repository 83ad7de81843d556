"""python -m supermask.train end to end on synthetic data, resume, and every bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from supermask import data as data_mod
from supermask import train as train_mod
from supermask.cli import run_main
from supermask.mask import num_kept

FAST = ["--dataset", "synthetic", "--epochs", "2", "--no-progress", "--width", "0.5"]


def run(argv):
    return run_main("python -m supermask.train", train_mod.main, argv)


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def test_end_to_end_on_synthetic_writes_results(tmp_path):
    out = tmp_path / "run"
    assert run(FAST + ["--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("test_acc", "best_test_acc", "val_acc", "epochs", "params_total", "params_kept",
                "seconds_per_epoch", "early_stop_iteration"):
        assert results[key] is not None, key
    assert results["epochs"] == 2 and results["test_acc"] > 60  # synthetic is learnable
    assert results["params_kept"] == sum(num_kept(n, 0.5) for n in (784 * 150, 150 * 50, 50 * 10))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads((out / "config.json").read_text())["k"] == 0.5
    # the same command again finds the finished run and recomputes nothing
    before = snapshot(out)
    assert run(FAST + ["--out", str(out)]) == 0
    assert snapshot(out) == before


def test_default_out_is_named_after_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(FAST + ["--epochs", "1"]) == 0
    assert run(FAST + ["--epochs", "1", "--k", "0.3"]) == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(names) == 2 and names[0].startswith("fc_w0.5_synthetic_k0.3_s0_")


def test_same_seed_same_results_and_dense_trains_weights(tmp_path):
    a, b, d = tmp_path / "a", tmp_path / "b", tmp_path / "d"
    for out in (a, b):
        assert run(FAST + ["--out", str(out)]) == 0
    ma, mb = ([{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in
               (o / "metrics.jsonl").read_text().splitlines()] for o in (a, b))
    assert ma == mb
    assert run(FAST + ["--dense", "--out", str(d)]) == 0
    res = json.loads((d / "results.json").read_text())
    assert res["params_kept"] == res["params_total"] and res["test_acc"] > 60


def test_resume_continues_exactly(tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    args = FAST + ["--epochs", "3"]
    assert run(args + ["--out", str(full)]) == 0
    import supermask.training as training
    real_save, saves = training.save_checkpoint, []

    def interrupted_save(path, state):
        real_save(path, state)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", interrupted_save)
    assert run(args + ["--out", str(part)]) == 130
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert not (part / "results.json").exists()
    assert run(args + ["--out", str(part)]) == 2  # unfinished run needs --resume
    assert run(args + ["--out", str(part), "--resume"]) == 0
    strip = lambda o: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                       for x in (o / "metrics.jsonl").read_text().splitlines()]
    assert strip(full) == strip(part) and len(strip(part)) == 3
    sf, sp = (torch.load(o / "checkpoint.pt", weights_only=True)["model"] for o in (full, part))
    assert all(torch.equal(sf[k], sp[k]) for k in sf)


def test_a_run_being_written_by_another_process_is_left_alone(tmp_path, monkeypatch, capsys):
    import supermask.training as training
    from supermask.storage import exclusive
    out, args = tmp_path / "run", FAST + ["--epochs", "3"]
    real_save = training.save_checkpoint

    def interrupted_save(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", interrupted_save)
    assert run(args + ["--out", str(out)]) == 130  # an unfinished run, one epoch in
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    capsys.readouterr()
    assert not (out / ".lock").exists()  # the lock file goes with the process that held it
    with exclusive(out):  # another process is resuming it (a second lock on the file conflicts too)
        before = snapshot(out)
        assert run(args + ["--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "is being written by another process;" in err and len(err.splitlines()) == 1
        assert snapshot(out) == before
    assert run(args + ["--out", str(out), "--resume"]) == 0  # free again: it resumes
    assert json.loads((out / "results.json").read_text())["epochs"] == 3
    assert not (out / ".lock").exists()
    # every file of the run has the permissions of a file opened for writing (metrics.jsonl)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if not p.name.startswith("events.out")}
    assert set(modes) == {"config.json", "checkpoint.pt", "curves.png", "metrics.jsonl", "results.json"}
    assert len(set(modes.values())) == 1, modes
    with exclusive(out):  # a finished run is only read: no lock needed
        assert run(args + ["--out", str(out)]) == 0


BAD_INPUTS = [
    (["--k", "0"], "argument --k: expected a number in (0, 1]"),
    (["--k", "1.5"], "argument --k: expected a number in (0, 1]"),
    (["--width", "0"], "argument --width: expected a number > 0"),
    (["--width", "-1"], "argument --width: expected a number > 0"),
    (["--model", "vgg99"], "unknown model"),
    (["--dataset", "imagenet1k"], "unknown dataset"),
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1"),
    (["--k", "abc"], "argument --k: expected a number in (0, 1]"),
    (["--optimizer", "lion"], "invalid choice"),
    # pruning at initialisation (supermask/pai.py)
    (["--dense", "--prune-at-init", "obd", "--k", "0.1"], "invalid choice"),
    (["--dense", "--prune-at-init", "snip", "--k", "0"], "argument --k: expected a number in (0, 1]"),
    (["--dense", "--prune-at-init", "snip", "--k", "1.5"], "argument --k: expected a number in (0, 1]"),
    (["--dense", "--prune-at-init", "snip", "--k", "-0.1"], "argument --k: expected a number in (0, 1]"),
    (["--dense", "--pai-check", "shuffle"], "--pai-check needs --prune-at-init"),
    (["--dense", "--prune-at-init", "snip", "--pai-check", "flip"], "invalid choice"),
    (["--dense", "--prune-at-init", "snip", "--topk", "row"], "invalid choice"),
    (["--dense", "--prune-at-init", "grasp", "--dataset", "imagenet"], "scores on a batch of an in-memory dataset"),
    (["--prune-at-init", "snip"], "add --dense"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    try:  # argparse's errors exit from parse_args; the others come back as run_main's code
        code = run(FAST + ["--out", str(out)] + extra)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_data_offline_names_paths_and_what_to_do(tmp_path, capsys, monkeypatch):
    import torchvision

    class Offline:  # as torchvision does offline: makes root/MNIST/raw, then fails to download
        def __init__(self, root, *a, **k):
            (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    out = tmp_path / "run"
    assert run(["--dataset", "mnist", "--data-dir", str(tmp_path / "nodata"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(tmp_path / "nodata" / "MNIST" / "raw") in err and "dataset-fashion-mnist" in err
    assert not out.exists()
    assert not (tmp_path / "nodata").exists()  # the folders the failed download made are gone
    # a data folder that was there before stays, with what it holds; only the new empty ones go
    (tmp_path / "data" / "other").mkdir(parents=True)
    assert run(["--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 2
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["other"]


@pytest.mark.parametrize("loss,acc,classes,expected", [
    (2.3026, 10.0, 10, True),     # ln 10 = 2.302585: no better than uniform, at chance
    (2.3025, 10.0, 10, False),    # a little below ln 10: learning something
    (3e23, 10.5, 10, True),       # blown up
    (2.5, 19.99, 10, True),       # below twice chance (20%)
    (2.5, 20.0, 10, False),
    (0.70, 50.0, 2, True),        # ln 2 = 0.6931
    (4.7, 0.5, 100, True),        # ln 100 = 4.6052, chance 1%
    (9.9, 0.0, 1, False),         # one class: nothing to learn
])
def test_not_learning_by_hand(loss, acc, classes, expected):
    from supermask.training import not_learning
    assert not_learning(loss, acc, classes) is expected


def test_a_run_that_does_not_learn_warns_once_and_finishes(tmp_path, capsys):
    # lr 5 blows the dense network up in epoch 1 (loss ~1e23, finite) and its ReLUs die: loss ln 10 after
    out = tmp_path / "run"
    assert run(["--dataset", "synthetic", "--dense", "--epochs", "2", "--lr", "5", "--width", "0.25",
                "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: epoch 1: training loss") and "not learning" in err[0], err
    assert json.loads((out / "results.json").read_text())["test_acc"] < 20
    assert run(FAST + ["--out", str(tmp_path / "learns")]) == 0
    assert capsys.readouterr().err == ""  # a run that learns: no warning


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run(FAST + ["--out", str(blocker / "run")]) == 2
    assert "cannot write to --out" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_out_holding_another_run_or_other_files_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(FAST + ["--epochs", "1", "--out", str(out)]) == 0
    before = snapshot(out)
    assert run(FAST + ["--epochs", "1", "--k", "0.3", "--out", str(out)]) == 2
    assert "another configuration (k differ)" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run(FAST + ["--out", str(other)]) == 2
    assert snapshot(out) == before and (other / "notes.txt").read_text() == "mine"


def test_resume_without_or_with_corrupted_checkpoint(tmp_path, capsys):
    # stopped before it wrote anything (Ctrl-C while torch loads): --resume, as advised, starts it
    assert run(FAST + ["--out", str(tmp_path / "none"), "--resume"]) == 0
    assert capsys.readouterr().err.count("held no run yet") == 1
    assert (tmp_path / "none" / "results.json").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run(FAST + ["--out", str(other), "--resume"]) == 2  # a folder of something else: never touched
    assert "holds no run of this tool" in capsys.readouterr().err and sorted(other.iterdir()) == [other / "notes.txt"]
    out = tmp_path / "run"
    assert run(FAST + ["--out", str(out)]) == 0
    (out / "results.json").unlink()
    (out / "checkpoint.pt").write_bytes(b"garbage")
    assert run(FAST + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and len(err.strip().splitlines()) == 1
    assert (out / "checkpoint.pt").read_bytes() == b"garbage"


def test_triton_backend_without_gpu_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "supermask.train", *FAST, "--backend", "triton",
                           "--device", "cpu", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "TRITON_INTERPRET=1" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not data_mod._find_idx(data_mod.DEBIAN_FASHION_MNIST),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_one_epoch_reaches_a_sensible_accuracy(tmp_path):
    out = tmp_path / "fm"
    assert run(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--width", "2.5", "--k", "0.5",
                "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test_acc"] > 80.0, results["test_acc"]  # chance is 10%; 15 epochs reach ~88%


def test_cpu_backend_trains_exactly_like_the_reference_path(tmp_path):
    from supermask import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.why_unavailable()}")
    results = {}
    for backend in ("torch", "cpu"):
        out = tmp_path / backend
        assert run(FAST + ["--backend", backend, "--out", str(out)]) == 0
        results[backend] = json.loads((out / "results.json").read_text())
    for key in ("test_acc", "test_acc5", "best_test_acc"):
        assert results["cpu"][key] == results["torch"][key], key
