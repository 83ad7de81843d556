"""python -m supermask.imp: the storage contract, exact rewinding, controls, resume, bad input."""
import json
import math
import subprocess
import sys

import pytest
import torch

from supermask import desc
from supermask import data as data_mod
from supermask import imp, lottery, pruning, training
from supermask.cli import run_main

BASE = ["--dataset", "synthetic", "--width", "0.05", "--epochs", "2", "--rounds", "2", "--val-every", "5",
        "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def calls(monkeypatch):
    """Every training.train call imp makes: (round folder, resume epoch or None, starting weights)."""
    real = training.train
    seen = []

    def spy(model, dataset, cfg, device, out=None, resume=None, *args, **kwargs):
        seen.append((out.name if out else None, resume["epoch"] if resume else None,
                     {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return real(model, dataset, cfg, device, out, resume, *args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    return seen


def ckpt(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    # init.pt / rewind.pt hold {"model": state dict, "sha256": ...}; checkpoint.pt the training state
    return state["model"] if str(path).endswith(("init.pt", "rewind.pt")) else state


def test_storage_contract_and_nothing_recomputed(tmp_path, calls):
    out = tmp_path / "ticket"
    assert imp.main([*BASE, "--out", str(out)]) == 0
    assert [c[0] for c in calls] == ["round_00", "round_01", "round_02"]
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "imp" and config["rounds"] == 2 and config["init"] == "kaiming_normal"
    results = json.loads((out / "results.json").read_text())
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("weights_remaining", "test_acc", "best_test_acc", "val_acc", "early_stop_iteration",
                "seconds_per_epoch"):
        assert all(r[key] is not None for r in rows), key
    assert rows[0]["weights_remaining"] == 100.0
    assert 79 < rows[1]["weights_remaining"] < 81 and 63 < rows[2]["weights_remaining"] < 65
    assert rows[0]["early_stop_iteration"] % 5 == 0  # validation every 5 iterations, not per epoch
    init = ckpt(out / "init.pt")
    prev = None
    for r in range(3):
        rdir = out / f"round_{r:02d}"
        for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "results.json"):
            assert (rdir / name).is_file()
        c = ckpt(rdir / "checkpoint.pt")
        masks = c["masks"]
        dense = lottery._dense_model(config, data_mod.load("synthetic"))
        assert set(masks) == {n for n, _ in pruning.prunable_layers(dense)}
        for name, m in masks.items():
            assert m.dtype == torch.bool
            assert (c["model"][f"{name}.weight"][~m] == 0).all(), "a pruned weight is not zero after training"
            if prev is not None:
                assert not (m & ~prev[name]).any(), "masks must be nested"
        # Round r starts from the initial weights, masked, bit for bit (no rewind iteration).
        start = calls[r][2]
        for name, m in masks.items():
            w0 = init[f"{name}.weight"]
            assert torch.equal(start[f"{name}.weight"], torch.where(m, w0, torch.zeros_like(w0)))
        prev = masks
    # The pruned weights of round 1 are the smallest-magnitude survivors of round 0's trained weights.
    trained = lottery._dense_model(config, data_mod.load("synthetic"))
    trained.load_state_dict(ckpt(out / "round_00" / "checkpoint.pt")["model"])
    expected = pruning.magnitude_masks(trained, None, 0.2, "layer")
    for name, m in ckpt(out / "round_01" / "checkpoint.pt")["masks"].items():
        assert torch.equal(m, expected[name])

    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    calls.clear()
    assert imp.main([*BASE, "--out", str(out)]) == 0
    assert calls == [], "a finished round was recomputed"
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    assert all(before.get(k) == v for k, v in after.items() if k != "results.json")
    # A larger --rounds extends the same run by exactly the missing round.
    argv = list(BASE)
    argv[argv.index("--rounds") + 1] = "3"
    assert imp.main([*argv, "--out", str(out)]) == 0
    assert [c[0] for c in calls] == ["round_03"]
    assert len(json.loads((out / "results.json").read_text())["rounds"]) == 4


def test_interrupted_round_resumes_and_matches(tmp_path, calls, monkeypatch):
    ref = tmp_path / "ref"
    assert imp.main([*BASE, "--rounds", "1", "--out", str(ref)]) == 0
    real = training.train  # the fixture's spy around the real one
    steps_per_epoch = 20  # 2500 synthetic training examples / 128

    def crash_in_second_epoch(model, dataset, cfg, device, out=None, resume=None, after_step=None, *a, **k):
        count = [0]

        def step(m):
            after_step(m)
            count[0] += 1
            if out.name == "round_01" and count[0] == steps_per_epoch + 3:
                raise KeyboardInterrupt

        return real(model, dataset, cfg, device, out, resume, step, *a, **k)

    out = tmp_path / "run"
    monkeypatch.setattr(training, "train", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        imp.main([*BASE, "--rounds", "1", "--out", str(out)])
    assert not (out / "round_01" / "results.json").exists()
    monkeypatch.setattr(training, "train", real)  # the fixture's spy
    calls.clear()
    assert imp.main([*BASE, "--rounds", "1", "--out", str(out)]) == 0
    assert [(c[0], c[1]) for c in calls] == [("round_01", 1)], "round 0 redone or round 1 not resumed"
    for r in ("round_00", "round_01"):
        a, b = ckpt(ref / r / "checkpoint.pt")["model"], ckpt(out / r / "checkpoint.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), f"{r} differs from an uninterrupted run"


def test_rewind_iteration_is_exact(tmp_path, calls):
    out = tmp_path / "late"
    assert imp.main([*BASE, "--rounds", "1", "--rewind-iter", "7", "--out", str(out)]) == 0
    rewind = ckpt(out / "rewind.pt")
    # Replay round 0 alone and capture the weights after 7 iterations.
    config = json.loads((out / "config.json").read_text())
    ds = data_mod.load("synthetic")
    model = lottery._dense_model(config, ds)
    captured, count = {}, [0]

    def after_step(m):
        count[0] += 1
        if count[0] == 7:
            captured.update({k: v.detach().clone() for k, v in m.state_dict().items()})

    training.train(model, ds, desc.training_config(config), torch.device("cpu"), progress=False,
                   after_step=after_step, log=lambda *_: None)
    assert all(torch.equal(rewind[k], captured[k]) for k in captured)
    assert not all(torch.equal(rewind[k], ckpt(out / "init.pt")[k]) for k in rewind)
    masks = ckpt(out / "round_01" / "checkpoint.pt")["masks"]
    start = calls[1][2]
    for name, m in masks.items():
        w = rewind[f"{name}.weight"]
        assert torch.equal(start[f"{name}.weight"], torch.where(m, w, torch.zeros_like(w)))
    # Round 1 trains from iteration 7 to the end (open_lth's rewinding), round 0 from 0.
    cfg = desc.training_config(config)
    total = cfg.epochs * math.ceil(len(ds.train_y) / cfg.batch_size)
    r0, r1 = (json.loads((out / f"round_0{r}" / "results.json").read_text()) for r in (0, 1))
    assert (r0["start_iteration"], r0["iterations"]) == (0, total)
    assert (r1["start_iteration"], r1["iterations"]) == (7, total - 7)
    assert json.loads((out / "round_01" / "config.json").read_text())["start_iteration"] == 7


def test_start_step_continues_the_batches_and_the_schedule(monkeypatch):
    # train(start_step=K) trains exactly iterations K..T-1: the batches of an uninterrupted run from
    # K on (the first epoch entered part way) and the learning rates of those iterations.
    ds = data_mod.load("synthetic")
    cfg = training.TrainConfig(epochs=2, batch_size=256, lr=0.05, schedule="cosine", seed=3)
    tensors = {"train_x": ds.train_x, "train_y": ds.train_y}
    stream = [xb for e in range(cfg.epochs)
              for xb, _, _ in training._epoch_batches(ds, tensors, cfg, e, torch.device("cpu"))]
    per_epoch, total = len(stream) // cfg.epochs, len(stream)
    k = per_epoch + 3  # inside the second epoch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    seen, steps = [], []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
    real_lr = training.learning_rate
    monkeypatch.setattr(training, "learning_rate", lambda c, step, *a: steps.append(step) or real_lr(c, step, *a))
    results = training.train(model, ds, cfg, torch.device("cpu"), progress=False, log=lambda *_: None, start_step=k)
    assert len(seen) == total - k and all(torch.equal(a, b) for a, b in zip(seen, stream[k:]))
    # the trained iterations' learning rates, then the epoch row's (its last iteration's)
    assert steps == [*range(k, total), total - 1]
    assert results["start_iteration"] == k and results["iterations"] == total - k and results["epochs"] == 1
    with pytest.raises(ValueError, match="start_step"):
        training.train(model, ds, cfg, torch.device("cpu"), progress=False, log=lambda *_: None, start_step=total)


def test_an_imp_run_being_written_by_another_process_is_left_alone(tmp_path, calls, capsys):
    from supermask.storage import exclusive
    out = tmp_path / "ticket"
    argv = [*BASE, "--epochs", "1", "--out", str(out)]
    assert imp.main([*argv, "--rounds", "1"]) == 0
    with exclusive(out):  # another process is extending it
        assert run_main("imp", imp.main, [*argv, "--rounds", "2"]) == 2
        assert "is being written by another process" in capsys.readouterr().err
        assert not (out / "round_02").exists()
    assert imp.main([*argv, "--rounds", "2"]) == 0
    assert [c[0] for c in calls] == ["round_00", "round_01", "round_02"]  # nothing recomputed


def test_a_finished_imp_run_on_read_only_storage_is_read(tmp_path, calls, capsys, monkeypatch):
    """Issue #24: the same command on a finished IMP run whose folder cannot be written (a read-only
    file system: no lock file, no write) reads it and reports it; extending it still needs to write."""
    import errno

    from supermask.errors import UsageError
    out = tmp_path / "ticket"
    argv = [*BASE, "--epochs", "1", "--out", str(out)]
    assert imp.main([*argv, "--rounds", "1"]) == 0
    capsys.readouterr()

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    def no_lock(run_dir):
        raise UsageError(f"cannot write to {run_dir}: Read-only file system")

    monkeypatch.setattr(lottery, "exclusive", no_lock)
    monkeypatch.setattr(lottery, "write_json", read_only)
    for rounds in ("1", "0"):  # the whole run, and fewer rounds than it holds
        assert run_main("imp", imp.main, [*argv, "--rounds", rounds]) == 0
        assert "round" in capsys.readouterr().out
    assert run_main("imp", imp.main, [*argv, "--rounds", "2"]) == 2  # more rounds: must write
    assert "Read-only file system" in capsys.readouterr().err
    assert [c[0] for c in calls] == ["round_00", "round_01"]  # nothing recomputed


def test_controls_share_the_ticket_sparsity(tmp_path, calls):
    argv = [*BASE, "--epochs", "1"]
    ticket = tmp_path / "ticket"
    assert imp.main([*argv, "--out", str(ticket)]) == 0
    init = ckpt(ticket / "init.pt")
    for control in ("reinit", "random-mask"):
        calls.clear()
        out = tmp_path / control
        assert imp.main([*argv, "--control", control, "--out", str(out), "--ticket", str(ticket)]) == 0
        assert [c[0] for c in calls] == ["round_01", "round_02"], "the ticket was recomputed or round 0 run"
        rows = json.loads((out / "results.json").read_text())["rounds"]
        assert [r["round"] for r in rows] == [1, 2]
        for r, call in zip((1, 2), calls):
            t = ckpt(ticket / f"round_{r:02d}" / "checkpoint.pt")["masks"]
            c = ckpt(out / f"round_{r:02d}" / "checkpoint.pt")["masks"]
            assert pruning.sparsity(c)["layers"] == pruning.sparsity(t)["layers"]
            same = all(torch.equal(c[n], t[n]) for n in t)
            assert same == (control == "reinit")
            start = call[2]
            for n, m in c.items():
                w = start[f"{n}.weight"]
                assert (w[~m] == 0).all()
                original = torch.equal(w[m], init[f"{n}.weight"][m])
                assert original == (control == "random-mask")
    # Without --ticket, a control runs (or reuses) the ticket beside it, named from the flags.
    calls.clear()
    runs = tmp_path / "runs"
    assert imp.main([*argv, "--control", "reinit", "--out", str(runs / "ctl")]) == 0
    ticket_dirs = [p for p in runs.iterdir() if p.name != "ctl"]
    assert len(ticket_dirs) == 1 and ticket_dirs[0].name.startswith("imp_fc_w0.05_synthetic_s0_")
    assert [c[0] for c in calls] == ["round_00", "round_01", "round_02", "round_01", "round_02"]


@pytest.mark.parametrize("argv,message", [
    (["--prune-rate", "1.5"], "--prune-rate"),
    (["--rounds", "-1"], "--rounds"),
    (["--model", "mlp"], "unknown model"),
    (["--rewind-iter", "100000"], "--rewind-iter"),
    (["--ticket", "x"], "--ticket"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    try:  # argparse's range checks exit from parse_args (one line, exit 2: cli.Parser)
        code = run_main(imp.PROG, imp.main, [*BASE, *argv, "--out", str(out)])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith(imp.PROG)
    assert not out.exists() or not any(out.iterdir())


def test_other_config_is_never_overwritten(tmp_path, capsys, calls):
    out = tmp_path / "o"
    assert imp.main([*BASE, "--rounds", "0", "--epochs", "1", "--out", str(out)]) == 0
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run_main(imp.PROG, imp.main, [*BASE, "--rounds", "0", "--epochs", "1", "--lr", "0.05",
                                         "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr" in err
    assert snapshot == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    assert run_main(imp.PROG, imp.main, [*BASE, "--out", str(tmp_path / "junk")]) == 2


def test_cli_argparse_error_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "supermask.imp", "--scope", "neuron"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--scope" in r.stderr


def test_an_imp_call_reads_its_config_json_once(tmp_path, calls, monkeypatch):
    """run_imp reads the run's config.json once, whether the run is new, extended or finished (it used to read it
    again to see whether the run was finished, again to extend it, and again for every results.json it wrote);
    results.json's config is still what config.json holds."""
    out = tmp_path / "ticket"
    argv = [*BASE, "--epochs", "1", "--out", str(out)]
    real = lottery.read_json_object
    reads = []

    def counted(path, *a, **k):
        reads.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(lottery, "read_json_object", counted)
    # (rounds asked for, rounds trained, reads of config.json): new (none to read), extended, finished
    for rounds, trained, n in (("1", ["round_00", "round_01"], 0), ("2", ["round_02"], 1), ("2", [], 1)):
        reads.clear()
        calls.clear()
        assert imp.main([*argv, "--rounds", rounds]) == 0
        assert [c[0] for c in calls] == trained
        assert reads.count(out / "config.json") == n
        stored = json.loads((out / "config.json").read_text())
        assert stored["rounds"] == int(rounds)
        assert json.loads((out / "results.json").read_text())["config"] == stored
