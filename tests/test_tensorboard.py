"""TensorBoard event files and curves.png of a run: written by train and by every IMP round, read
back with tensorboard's own EventAccumulator; --no-tensorboard; a run without tensorboard installed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from supermask import imp as imp_mod
from supermask import train as train_mod
from supermask.cli import run_main

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

FAST = ["--dataset", "synthetic", "--epochs", "2", "--no-progress", "--width", "0.25"]
SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "loss/test": "test_loss",
           "accuracy/train": "train_acc", "accuracy/val": "val_acc", "accuracy/test": "test_acc", "lr": "lr"}


def read_events(folder: Path):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def check_run_folder(folder: Path, histogram_kind: str):
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert list(folder.glob("events.out.tfevents.*"))
    acc = read_events(folder)
    tags = acc.Tags()
    for tag, key in SCALARS.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [m["epoch"] for m in metrics]
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6)  # float32
    kept = sorted(t for t in tags["scalars"] if t.startswith("kept_fraction/"))
    # fc: three Linear layers, named as in the model (nn.Sequential indices)
    assert kept == ["kept_fraction/1", "kept_fraction/3", "kept_fraction/5"]
    assert sorted(tags["histograms"]) == [f"{histogram_kind}/{n}" for n in ("1", "3", "5")]
    for tag in tags["histograms"]:
        assert [e.step for e in acc.Histograms(tag)] == [m["epoch"] for m in metrics]
    png = folder / "curves.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return acc


def test_train_run_logs_scalars_histograms_and_curves(tmp_path):
    out = tmp_path / "run"
    assert run_main("train", train_mod.main, FAST + ["--k", "0.3", "--out", str(out)]) == 0
    acc = check_run_folder(out, "scores")
    # per-layer top-k: each layer keeps round(0.3 n) of its n weights
    for e in acc.Scalars("kept_fraction/1"):
        assert e.value == pytest.approx(0.3, abs=1e-3)


def test_every_imp_round_logs(tmp_path):
    out = tmp_path / "imp"
    assert run_main("imp", imp_mod.main, FAST + ["--rounds", "1", "--out", str(out)]) == 0
    for r, kept_1 in ((0, 1.0), (1, 0.8)):  # round 1 pruned 20% of the first layer's weights
        acc = check_run_folder(out / f"round_{r:02d}", "weights")
        assert acc.Scalars("kept_fraction/1")[-1].value == pytest.approx(kept_1, abs=1e-3)


def test_no_tensorboard_writes_no_event_files_but_curves(tmp_path):
    out = tmp_path / "run"
    assert run_main("train", train_mod.main, FAST + ["--epochs", "1", "--no-tensorboard", "--out", str(out)]) == 0
    assert not list(out.glob("events.out.tfevents.*"))
    assert (out / "curves.png").stat().st_size > 1000


def test_without_the_tensorboard_package_the_run_says_so_once_and_trains(tmp_path):
    # A process in which importing tensorboard fails, as it does when the package is not installed.
    code = ("import sys; sys.modules['tensorboard'] = None; sys.modules['torch.utils.tensorboard'] = None\n"
            "from supermask import train; from supermask.cli import run_main\n"
            f"sys.exit(run_main('train', train.main, {FAST + ['--out', str(tmp_path / 'run')]!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("tensorboard is not installed: not logging to TensorBoard") == 1, done.stderr
    assert (tmp_path / "run" / "results.json").is_file()
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("flag", [[], ["--no-tensorboard"]])
def test_instability_copies_log_to_tensorboard(tmp_path, flag):
    """Every copy trained by supermask.instability is a run folder with its event files (dense net:
    weight histograms), unless --no-tensorboard."""
    from supermask import instability  # noqa: PLC0415
    argv = [*FAST, "--rewind-iters", "0", "--points", "3", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "inst"), *flag]
    assert run_main(instability.PROG, instability.main, argv) == 0
    copies = sorted((tmp_path / "runs").glob("instability_copy_*"))
    assert len(copies) == 2
    for folder in copies:
        if flag:
            assert not list(folder.glob("events.out.tfevents.*"))
        else:
            acc = read_events(folder)
            metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            assert [e.value for e in acc.Scalars("accuracy/test")] == pytest.approx(
                [m["test_acc"] for m in metrics], rel=1e-6)
