"""python -m supermask.compare: runs stored under their config names, reused, table and plot."""
import csv

import pytest

from supermask.errors import UsageError
import torch

from supermask import compare, training
from supermask import train as train_cli
from supermask.cli import run_main

ARGS = ["--dataset", "synthetic", "--widths", "0.05", "--imp-widths", "0.05", "--ks", "0.5", "--epochs", "1",
        "--rounds", "1", "--val-every", "5", "--seeds", "0", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def train_calls(monkeypatch):
    real, seen = training.train, []

    def spy(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train", spy)  # what supermask.imp calls
    monkeypatch.setattr(train_cli, "train", spy)  # supermask.train's own import of it
    return seen


def test_compare_runs_once_then_reuses(tmp_path, train_calls):
    runs, out = tmp_path / "runs", tmp_path / "cmp"
    argv = [*ARGS, "--runs-dir", str(runs), "--out", str(out)]
    assert compare.main(argv) == 0
    # dense + edge-popup (train), IMP ticket rounds 0-1, reinit and random-mask round 1
    assert len(train_calls) == 2 + 2 + 1 + 1
    names = sorted(p.name for p in runs.iterdir())
    assert sum(n.startswith("imp_") for n in names) == 3 and sum(not n.startswith("imp_") for n in names) == 2
    table = (out / "table.md").read_text()
    for method in compare.METHOD_ORDER:
        assert f"| {method} |" in table
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(compare.METHOD_ORDER)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "plot.png").unlink()

    train_calls.clear()
    assert compare.main(argv) == 0
    assert train_calls == [], "a stored run was recomputed"
    assert (out / "plot.png").is_file()
    # A grown sweep computes only what is new; its tables replace the old ones only with --force
    # (issue #24: --out holds another comparison).
    with pytest.raises(UsageError, match="holds another comparison; pass --force"):
        compare.main([*argv, "--ks", "0.5,0.3"])
    assert train_calls == []
    assert compare.main([*argv, "--ks", "0.5,0.3", "--force"]) == 0
    assert len(train_calls) == 1
    assert "k=0.3" in (out / "table.md").read_text()


def test_no_train_reads_only_what_is_stored(tmp_path, train_calls, capsys):
    runs = tmp_path / "runs"
    code = run_main(compare.PROG, compare.main, [*ARGS, "--runs-dir", str(runs), "--out", str(tmp_path / "o"),
                                                 "--no-train"])
    assert code == 2 and "no finished runs" in capsys.readouterr().err
    assert train_calls == []


@pytest.mark.parametrize("extra,message", [
    (["--ks", "0.5,1.5"], "--ks"),
    (["--ks", "a"], "--ks"),
    (["--controls", "shuffle"], "unknown control"),
    (["--widths", "0"], "widths"),
    (["--model", "vgg"], "unknown model"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, train_calls, extra, message):
    argv = [*ARGS, "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), *extra]
    try:  # argparse's range checks exit from parse_args (one line, exit 2: cli.Parser)
        code = run_main(compare.PROG, compare.main, argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert train_calls == [] and not (tmp_path / "runs").exists()
