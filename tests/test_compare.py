"""python -m supermask.compare: runs stored under their config names, reused, table and plot."""
import argparse
import csv
import json

import pytest

from supermask.errors import UsageError
import torch

from supermask import compare, comparison, desc, instability, training
from supermask import imp as imp_cli
from supermask import train as train_cli
from supermask.cli import field_type, run_main

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

    monkeypatch.setattr(training, "train", spy)  # what train_run and lottery call
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
    for method in comparison.METHOD_ORDER:
        assert f"| {method} |" in table
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(comparison.METHOD_ORDER)
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


# Training flags that compare used to drop (issue #23): its runs take them as train and imp do.
MORE_TRAINING = ["--schedule", "multistep", "--milestones", "2,4", "--gamma", "0.2", "--warmup-epochs", "1",
                 "--label-smoothing", "0.1", "--nesterov", "--no-bn-decay"]


@pytest.mark.parametrize("training", [["--schedule", "none"], MORE_TRAINING], ids=["basic", "every-training-flag"])
def test_compare_names_its_runs_as_the_commands_do(tmp_path, training):
    """compare builds run descriptions, not argv: each planned run's folder is the one supermask.train or
    supermask.imp names from the same flags (a k or width given with more digits than ":g" prints included, as
    when compare passed them as flags), so the runs either made are found again."""
    argv = ["--dataset", "fashion-mnist", "--widths", "2.5", "--imp-widths", "0.5", "--ks", "0.1234567,1",
            "--seeds", "3", "--epochs", "7", "--lr", "0.05", "--momentum", "0.8", "--weight-decay", "5e-4",
            *training, "--batch-size", "64", "--val-size", "100", "--init", "kaiming_uniform",
            "--scale-fan", "--rounds", "3", "--prune-rate", "0.3", "--scope", "global", "--rewind-iter", "20",
            "--val-every", "0", "--pai", "snip", "--pai-checks", "reinit", "--runs-dir", str(tmp_path)]
    args = compare.parser().parse_args(argv)
    compare.validate(args)
    common = ["--dataset", "fashion-mnist", "--seed", "3", "--epochs", "7", "--lr", "0.05", "--momentum", "0.8",
              "--weight-decay", "5e-4", *training, "--batch-size", "64", "--val-size", "100"]
    train = [["--dense"], ["--k", "0.123457", "--init", "kaiming_uniform", "--scale-fan"],
             ["--dense", "--prune-at-init", "snip", "--k", "0.123457"],
             ["--dense", "--prune-at-init", "snip", "--k", "0.123457", "--pai-check", "reinit"],
             ["--k", "1", "--init", "kaiming_uniform", "--scale-fan"],
             ["--dense", "--prune-at-init", "snip", "--k", "1"],
             ["--dense", "--prune-at-init", "snip", "--k", "1", "--pai-check", "reinit"]]
    expected = []
    for extra in train:
        a = train_cli.parse_args([*common, "--width", "2.5", *extra])
        train_cli.validate(a)
        expected.append(desc.train_name(desc.train_identity(a)))
    imp = [*common, "--width", "0.5", "--rounds", "3", "--prune-rate", "0.3", "--scope", "global", "--rewind-iter",
           "20", "--val-every", "0"]
    for extra in ([], ["--control", "reinit"], ["--control", "random-mask"]):
        a = imp_cli.parser().parse_args([*imp, *extra])
        imp_cli.validate(a)
        expected.append(desc.imp_name(desc.imp_identity(a)))
    assert sorted(job.out.name for job in comparison.plan(args)) == sorted(expected)
    assert all(job.out.parent == tmp_path for job in comparison.plan(args))


def _other_value(f: desc.Field):
    """A value of training field f other than its default (and compare's), valid on its own: (value, flags)."""
    if f.kind is bool:
        return True, [f.flag]
    if f.choices:
        value = next(c for c in f.choices if c != f.default)
    elif f.kind is tuple:
        value = (1,)
    elif f.kind is int:
        value = f.default + 1
    else:
        value = f.default / 2 if f.default else 0.5
    return value, [f.flag, ",".join(map(str, value)) if f.kind is tuple else str(value)]


def test_every_training_field_reaches_every_run(tmp_path):
    """Each field of desc.TRAINING_FIELDS (one added later included) set away from its default on compare's
    command line is in every planned run's description and identity (its config.json): none is dropped."""
    fields = {f.name: _other_value(f) for f in desc.TRAINING_FIELDS}
    argv = [*ARGS, "--pai", "snip", "--runs-dir", str(tmp_path), *(a for _, flags in fields.values() for a in flags)]
    args = compare.parser().parse_args(argv)
    compare.validate(args)
    jobs = comparison.plan(args)
    assert {j.kind for j in jobs} == {"train", "imp"}
    for job in jobs:
        identity = desc.train_identity(job.v) if job.kind == "train" else desc.imp_identity(job.v)
        for name, (value, _) in fields.items():
            assert getattr(job.v, name) == value, (job.method, name)
            assert identity[name] == (list(value) if isinstance(value, tuple) else value), (job.method, name)


@pytest.mark.parametrize("extra,stored", [
    (["--epochs", "2", "--schedule", "multistep", "--milestones", "1", "--gamma", "0.5"],
     {"schedule": "multistep", "milestones": [1], "gamma": 0.5}),
    (["--label-smoothing", "0.2"], {"label_smoothing": 0.2}),
], ids=["multistep", "label-smoothing"])
def test_compare_trains_with_the_training_flags(tmp_path, monkeypatch, extra, stored):
    """compare --schedule multistep --milestones N (refused before: the milestones never reached the runs) and
    --label-smoothing x train every run with them: its config.json holds them and training.train gets them."""
    real, configs = training.train, []

    def spy(model, dataset, cfg, *args, **kwargs):
        configs.append(cfg)
        return real(model, dataset, cfg, *args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    runs = tmp_path / "runs"
    assert compare.main([*ARGS, "--controls", "", *extra, "--runs-dir", str(runs), "--out", str(tmp_path / "o")]) == 0
    folders = sorted(runs.iterdir())
    assert len(folders) == 3 and len(configs) == 2 + 2  # dense, edge-popup, IMP rounds 0 and 1
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        assert {key: config.get(key) for key in stored} == stored, folder.name
    for cfg in configs:
        assert {key: getattr(cfg, key) for key in stored} == {
            key: tuple(v) if isinstance(v, list) else v for key, v in stored.items()}


def _accepts(type_, text) -> bool:
    try:
        type_(text)
    except argparse.ArgumentTypeError:
        return False
    return True


@pytest.mark.parametrize("command,flag,field", [
    (compare, "--ks", desc.K_FIELD), (compare, "--widths", compare.WIDTH), (compare, "--imp-widths", compare.WIDTH),
    (compare, "--seeds", compare.SEED), (instability, "--rewind-iters", instability.REWIND_ITERATION),
    (instability, "--data-seeds", instability.DATA_SEED)])
def test_list_flags_take_their_fields_ranges(command, flag, field):
    """A list flag's item, first or after a valid one, is accepted exactly when the flag of its desc field
    accepts it alone (cli.field_type): its range is the field's, written once (issue #23)."""
    listed = next(a for a in command.parser()._actions if flag in a.option_strings).type
    one = field_type(field)
    for value in ["-1", "0", "0.1", "0.5", "1", "1.5", "2", "3", str(desc.SEED_MAX), str(2**40), "nan", "inf", "x"]:
        want = _accepts(one, value)
        assert _accepts(listed, value) == want and _accepts(listed, f"{field.default},{value}") == want, value
    assert listed(f"{field.default},{field.default}") == (field.default, field.default)
