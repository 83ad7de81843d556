"""python -m supermask.runs: the run list over a folder holding a finished, an unfinished and a
broken run (and an IMP run with its rounds), its filters, sorting, JSON and CSV, and bad input."""
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supermask import imp as imp_mod
from supermask import runs as runs_mod
from supermask import train as train_mod
from supermask.cli import run_main

FAST = ["--dataset", "synthetic", "--no-progress", "--width", "0.25", "--no-tensorboard"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert run_main("train", train_mod.main, FAST + ["--epochs", "1", "--k", "0.3", "--out", str(root / "done")]) == 0
    # unfinished: stopped (Ctrl-C) after the first of three epochs was checkpointed
    import supermask.training as training
    real_save = training.save_checkpoint

    def interrupted_save(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    training.save_checkpoint = interrupted_save
    try:
        assert run_main("train", train_mod.main, FAST + ["--epochs", "3", "--seed", "1", "--out",
                                                          str(root / "stopped")]) == 130
    finally:
        training.save_checkpoint = real_save
    # broken: a copy of the finished run whose checkpoint a full disk cut short
    shutil.copytree(root / "done", root / "truncated")
    (root / "truncated" / "checkpoint.pt").write_bytes((root / "done" / "checkpoint.pt").read_bytes()[:500])
    # broken: a folder with a run's files but a corrupted config.json
    shutil.copytree(root / "done", root / "deep" / "badconfig")
    (root / "deep" / "badconfig" / "config.json").write_text('{"command": "tr')
    assert run_main("imp", imp_mod.main, FAST + ["--epochs", "1", "--rounds", "1", "--out", str(root / "imp")]) == 0
    assert not list(root.rglob(".lock"))  # no run folder keeps the lock of the process that wrote it
    return root


def listing(capsys, *argv):
    capsys.readouterr()
    assert run_main("python -m supermask.runs", runs_mod.main, list(argv)) == 0
    return capsys.readouterr().out


def test_table_lists_every_run_with_its_state(runs_dir, capsys):
    out = listing(capsys, str(runs_dir))
    lines = out.splitlines()
    assert lines[0].split() == list(runs_mod.COLUMNS)
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"done", "stopped", "truncated", "deep/badconfig", "imp", "imp/round_00", "imp/round_01"}
    assert rows["done"].split()[1:] == ["train", "fc", "0.25", "0.3", "synthetic", "0", "1/1",
                                        rows["done"].split()[8], "finished"]
    assert rows["stopped"].split()[7] == "1/3" and rows["stopped"].split()[9] == "unfinished"
    assert rows["truncated"].split()[9] == "broken" and "checkpoint.pt is truncated" in rows["truncated"]
    assert "broken" in rows["deep/badconfig"] and "config.json is corrupted" in rows["deep/badconfig"]
    assert rows["imp"].split()[4:6] == ["rounds", "2/2"] and rows["imp"].endswith("finished")
    assert rows["imp/round_01"].split()[1] == "imp-round" and "round 1" in rows["imp/round_01"]
    # the test accuracy shown is results.json's
    done = json.loads((runs_dir / "done" / "results.json").read_text())
    assert rows["done"].split()[8] == f"{done['test_acc']:.2f}"


def test_json_holds_each_runs_config_and_state(runs_dir, capsys):
    rows = {r["name"]: r for r in json.loads(listing(capsys, str(runs_dir), "--json"))}
    assert {n: r["state"] for n, r in rows.items()} == {
        "done": "finished", "stopped": "unfinished", "truncated": "broken", "deep/badconfig": "broken",
        "imp": "finished", "imp/round_00": "finished", "imp/round_01": "finished"}
    assert rows["done"]["config"] == json.loads((runs_dir / "done" / "config.json").read_text())
    assert rows["stopped"]["epochs"] == "1/3"
    metrics = json.loads((runs_dir / "stopped" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows["stopped"]["test_acc"] == metrics["test_acc"]  # the last finished epoch's


def test_where_filters_on_any_config_key_and_columns(runs_dir, capsys):
    names = lambda out: [r["name"] for r in json.loads(out)]  # noqa: E731
    assert names(listing(capsys, str(runs_dir), "--json", "--where", "k=0.3")) == ["done", "truncated"]
    assert names(listing(capsys, str(runs_dir), "--json", "--where", "seed=1")) == ["stopped"]
    assert names(listing(capsys, str(runs_dir), "--json", "--where", "state=broken")) == ["deep/badconfig",
                                                                                          "truncated"]
    assert names(listing(capsys, str(runs_dir), "--json", "--where", "prune_rate=0.2",
                         "--where", "command=imp-round")) == ["imp/round_00", "imp/round_01"]
    assert "no runs under" in listing(capsys, str(runs_dir), "--where", "k=0.9")


def test_sort_and_csv(runs_dir, capsys):
    rows = list(csv.DictReader(io.StringIO(listing(capsys, str(runs_dir), "--csv", "--sort", "seed"))))
    assert rows[0].keys() == {*runs_mod.COLUMNS, "problem"}
    seeds = [r["seed"] for r in rows]
    assert seeds[-1] == "" and "1" in seeds  # the run without a readable config sorts last
    assert seeds.index("1") == len([s for s in seeds if s == "0"])  # after every seed-0 run


@pytest.mark.parametrize("argv, message", [
    (["--where", "k"], "--where expects KEY=VALUE"),
    (["--where", "kk=0.5"], "no run has a column or config key 'kk'"),
    (["--sort", "nope"], "no run has a column or config key 'nope'"),
    (["--json", "--csv"], "not allowed with argument"),
])
def test_bad_input_is_one_line_exit_2(runs_dir, capsys, argv, message):
    capsys.readouterr()
    code = run_main("python -m supermask.runs", runs_mod.main, [str(runs_dir), *argv]) \
        if argv != ["--json", "--csv"] else _exit_code(lambda: runs_mod.main([str(runs_dir), *argv]))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def _exit_code(call):
    with pytest.raises(SystemExit) as e:
        call()
    return e.value.code


def test_module_runs_from_the_command_line(runs_dir, tmp_path):
    cmd = [sys.executable, "-W", "error", "-m", "supermask.runs", str(runs_dir), "--where", "state=unfinished"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == ["stopped"]
    missing = subprocess.run([*cmd[:5], str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parents[1])
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "is not a folder" in missing.stderr


def _edit(path: Path, **values):
    obj = json.loads(path.read_text())
    obj.update(values)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("damage, problem", [
    (lambda d: _edit(d / "results.json", test_acc="high"), "results.json: missing or wrong-typed 'test_acc'"),
    (lambda d: (d / "results.json").write_text("{}"), "results.json: it names no config"),
    (lambda d: _edit(d / "results.json", config={**json.loads((d / "config.json").read_text()), "seed": 9}),
     "results.json: it is another run's (its config differs: seed)"),
    (lambda d: _edit(d / "config.json", epochs="1"), "config.json: 'epochs' = '1': not an integer"),
    (lambda d: _edit(d / "config.json", k=[0.3]), "config.json: 'k'"),
    (lambda d: (d / "config.json").write_text("[1]"), "config.json is not an object"),
])
def test_a_damaged_run_is_listed_broken_with_its_reason_and_hides_no_other(runs_dir, tmp_path, capsys, damage,
                                                                          problem):
    """Issue #24: values of the wrong type in a run's files make that run `broken` (with the reason), never
    a traceback that hides every run."""
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "done", root / "a_damaged")
    shutil.copytree(runs_dir / "done", root / "b_good")
    damage(root / "a_damaged")
    rows = {r["name"]: r for r in json.loads(listing(capsys, str(root), "--json"))}
    assert rows["a_damaged"]["state"] == "broken" and problem in rows["a_damaged"]["problem"], rows["a_damaged"]
    assert rows["b_good"]["state"] == "finished"
    table = listing(capsys, str(root))
    assert problem in table and "b_good" in table


def test_an_imp_run_with_rounds_1e15_is_broken_not_a_hang(runs_dir, tmp_path, capsys):
    shutil.copytree(runs_dir / "imp", tmp_path / "imp")
    cfg = tmp_path / "imp" / "config.json"
    cfg.write_text(cfg.read_text().replace('"rounds": 1', '"rounds": 1e15'))
    rows = {r["name"]: r for r in json.loads(listing(capsys, str(tmp_path), "--json"))}
    assert rows["imp"]["state"] == "broken" and "'rounds'" in rows["imp"]["problem"]


def test_json_into_a_closed_pipe_is_no_traceback(runs_dir):
    """`runs --json | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.run(f"{sys.executable} -m supermask.runs {runs_dir} --json | head -1", shell=True,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout == "[\n" and proc.stderr == "", proc.stderr


def test_instability_analyses_are_listed_finished_with_their_mode(runs_dir, tmp_path, capsys):
    """Issue #24: a finished analysis is `finished` (not `unfinished`), a ticket analysis is not `dense`."""
    from supermask import instability

    root = tmp_path / "runs"
    syn = [*FAST, "--epochs", "1", "--val-size", "200", "--rewind-iters", "0", "--points", "3",
           "--runs-dir", str(root)]
    assert run_main(instability.PROG, instability.main, [*syn, "--out", str(root / "a_dense")]) == 0
    assert run_main(instability.PROG, instability.main, [*syn, "--ticket", str(runs_dir / "imp"), "--round", "1",
                                                         "--out", str(root / "b_ticket")]) == 0
    rows = {r["name"]: r for r in json.loads(listing(capsys, str(root), "--json"))}
    dense = rows["a_dense"]
    assert (dense["state"], dense["k_or_round"]) == ("finished", "dense"), dense["problem"]
    assert (rows["b_ticket"]["state"], rows["b_ticket"]["k_or_round"]) == ("finished", "ticket")
    copies = [r for r in rows.values() if r["command"] == "instability-copy"]
    assert copies and all(r["state"] == "finished" and r["k_or_round"].startswith("copy k0") for r in copies)
