"""python -m supermask.instability: the error barrier, exact end points, tickets, edge-popup,
stability to pruning, stored runs, and every bad input."""
import json
from pathlib import Path

import pytest
import torch

from supermask import desc
from supermask import data as data_mod
from supermask import imp as imp_mod
from supermask import instability as inst
from supermask import stability
from supermask.cli import run_main

needs_fashion = pytest.mark.skipif(not data_mod._find_idx(data_mod.DEBIAN_FASHION_MNIST),
                                   reason="Debian's dataset-fashion-mnist is not installed")
# Real data, a small network, one epoch (430 iterations at batch 128): a few seconds per copy.
FM = ["--dataset", "fashion-mnist", "--width", "0.25", "--epochs", "1", "--no-progress", "--threads", "1"]
SYN = ["--dataset", "synthetic", "--width", "0.25", "--epochs", "2", "--no-progress", "--threads", "1"]


def run(argv):
    try:
        return run_main(inst.PROG, inst.main, argv)
    except SystemExit as e:  # argparse's one-line error for a flag's value
        return e.code


def files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_error_barrier_and_interpolation_by_hand():
    assert stability.error_barrier([10.0, 15.0, 12.0]) == 15.0 - 11.0
    assert stability.error_barrier([12.0, 11.0, 10.0]) == 1.0  # an end point is the maximum: max - mean
    a = {"w": torch.tensor([1.0, -2.0, 0.1]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 2.0, 0.7]), "n": torch.tensor(5)}
    assert torch.equal(stability.interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(stability.interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.equal(stability.interpolate(a, b, 0.5)["w"], torch.tensor([2.0, 0.0, 0.4]))
    assert stability.interpolate(a, b, 0.5)["n"] == 3  # integer buffers are not interpolated


def test_stability_to_pruning_by_hand():
    masks = {"l": torch.tensor([[True, False], [True, True]])}
    ticket = {"l.weight": torch.tensor([[1.0, 0.0], [2.0, 2.0]])}
    dense = {"l.weight": torch.tensor([[4.0, 9.0], [2.0, -2.0]])}
    got = stability.stability_to_pruning(ticket, dense, masks)
    # kept entries: (1-4, 2-2, 2+2) -> sqrt(9 + 0 + 16) = 5; dense kept norm sqrt(16 + 4 + 4) = sqrt(24)
    assert got["l2_distance"] == pytest.approx(5.0)
    assert got["normalised"] == pytest.approx(5.0 / 24 ** 0.5)


@needs_fashion
def test_same_data_order_gives_barrier_zero_and_copies_are_bit_identical(tmp_path):
    args = inst.parser().parse_args(FM)
    inst.validate(args)
    config = desc.instability_identity(args)
    dataset = data_mod.load("fashion-mnist", "data", 5000)
    device = torch.device("cpu")
    _, states = stability.rewind_states(config, [0], dataset, device, tmp_path / "r0", "torch", False)
    # two copies trained independently (two runs folders) with the same data order
    a, b = (stability.train_copy(config, 0, 7, states[0], None, dataset, device, tmp_path / d, "torch", False,
                            log=lambda *_: None) for d in ("ra", "rb"))
    sa, sb = (torch.load(c / "checkpoint.pt", weights_only=True)["model"] for c in (a, b))
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    path = stability.error_path(config, sa, sb, dataset, device, 5, "torch")
    errors = [p["test_error"] for p in path]
    assert stability.error_barrier(errors) == 0.0 and len(set(errors)) == 1
    # and through the command line
    out = tmp_path / "same"
    assert run(FM + ["--data-seeds", "3,3", "--points", "4", "--runs-dir", str(tmp_path / "runs"),
                     "--out", str(out)]) == 0
    row = json.loads((out / "instability.json").read_text())["rows"][0]
    assert row["barrier"] == 0.0 and row["stable"]


@needs_fashion
def test_end_points_reproduce_the_copies_accuracies_and_runs_are_never_recomputed(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = FM + ["--rewind-iters", "0,100", "--points", "5", "--runs-dir", str(runs), "--out", str(out)]
    assert run(argv) == 0
    result = json.loads((out / "instability.json").read_text())
    assert [r["rewind_iteration"] for r in result["rows"]] == [0, 100]
    for row in result["rows"]:
        accs = [json.loads((Path(c) / "results.json").read_text())["test_acc"] for c in row["copies"]]
        assert row["test_error"][0] == 100.0 - accs[0] and row["test_error"][-1] == 100.0 - accs[1]
        assert row["alpha"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert row["barrier"] == max(row["test_error"]) - (row["test_error"][0] + row["test_error"][-1]) / 2
        assert accs[0] != accs[1] or row["copies"][0] != row["copies"][1]  # two data orders, two runs
        cfg = json.loads((Path(row["copies"][1]) / "config.json").read_text())
        assert cfg["rewind_iteration"] == row["rewind_iteration"] and cfg["data_seed"] == 2
        res = json.loads((Path(row["copies"][1]) / "results.json").read_text())
        assert res["start_iteration"] == row["rewind_iteration"] and res["iterations"] == 430 - row["rewind_iteration"]
    assert {"instability.json", "table.md", "plot.png"} <= {p.name for p in out.iterdir()}
    before = files(runs)
    assert run(argv) == 0  # the same command: nothing trained or rewritten
    assert files(runs) == before
    # a rewind iteration more: only its copies and state are added
    assert run(FM + ["--rewind-iters", "0,50,100", "--points", "5", "--runs-dir", str(runs), "--out", str(out)]) == 0
    after = files(runs)
    assert all(after[p] == v for p, v in before.items())
    assert len([p for p in after if p.name == "results.json"]) == 6
    # the rewind state at 50 is the one a single pass to 100 passes through: the k=100 copies stand
    rows = json.loads((out / "instability.json").read_text())["rows"]
    assert [r["rewind_iteration"] for r in rows] == [0, 50, 100]


def _imp_ticket(tmp_path) -> Path:
    ticket = tmp_path / "imp"
    assert run_main(imp_mod.PROG, imp_mod.main, SYN + ["--rounds", "2", "--out", str(ticket)]) == 0
    return ticket


def test_ticket_copies_share_the_mask_and_stability_to_pruning_is_reported(tmp_path):
    ticket = _imp_ticket(tmp_path)
    runs, out = tmp_path / "runs", tmp_path / "out"
    assert run(SYN + ["--ticket", str(ticket), "--round", "2", "--rewind-iters", "0,10", "--points", "3",
                      "--runs-dir", str(runs), "--out", str(out)]) == 0
    masks = torch.load(ticket / "round_02" / "checkpoint.pt", weights_only=True)["masks"]
    rows = json.loads((out / "instability.json").read_text())["rows"]
    for row in rows:
        for c in row["copies"]:
            state = torch.load(Path(c) / "checkpoint.pt", weights_only=True)
            assert all(torch.equal(state["masks"][n], masks[n]) for n in masks)
            for n, m in masks.items():
                assert bool((state["model"][f"{n}.weight"][~m] == 0).all())
        dense = torch.load(Path(row["dense_copy"]) / "checkpoint.pt", weights_only=True)["model"]
        ticket_final = torch.load(Path(row["copies"][0]) / "checkpoint.pt", weights_only=True)["model"]
        assert row["stability_to_pruning"] == stability.stability_to_pruning(ticket_final, dense, masks)
        assert row["stability_to_pruning"]["l2_distance"] > 0
        assert "dense" in Path(row["dense_copy"]).name and "_m" not in Path(row["dense_copy"]).name
    # the dense copy is the one the dense analysis trains (shared, not recomputed)
    before = files(runs)
    assert run(SYN + ["--rewind-iters", "0", "--points", "3", "--runs-dir", str(runs),
                      "--out", str(tmp_path / "d")]) == 0
    new = [p for p in files(runs) if p not in before and p.name == "results.json"]
    assert len(new) == 1  # only the copy with the second data order


def test_edge_popup_interpolates_scores_and_end_points_are_exact(tmp_path):
    out = tmp_path / "ep"
    assert run(SYN + ["--edge-popup", "--k", "0.3", "--rewind-iters", "0,20", "--points", "4",
                      "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    for row in json.loads((out / "instability.json").read_text())["rows"]:
        assert row["test_error"][0] == 100.0 - row["copies_test_acc"][0]
        assert row["test_error"][-1] == 100.0 - row["copies_test_acc"][1]
        states = [torch.load(Path(c) / "checkpoint.pt", weights_only=True)["model"] for c in row["copies"]]
        scores = [n for n in states[0] if n.endswith(".scores")]
        assert scores and any(not torch.equal(states[0][n], states[1][n]) for n in scores)
        weights = [n for n in states[0] if n.endswith(".weight")]
        assert all(torch.equal(states[0][n], states[1][n]) for n in weights)  # fixed random weights


BAD = [
    (["--rewind-iters", "80"], "is not before the end of training (40 iterations"),
    (["--rewind-iters", "0,40"], "is not before the end of training"),
    (["--rewind-iters", "-5"], "argument --rewind-iters: expected an integer >= 0"),
    (["--rewind-iters", "a,b"], "argument --rewind-iters: expected an integer"),
    (["--points", "1"], "argument --points: expected an integer >= 2"),
    (["--data-seeds", "1"], "--data-seeds takes two seeds"),
    (["--round", "1"], "--round needs --ticket"),
    (["--ticket", "TICKET"], "--ticket needs --round"),
    (["--ticket", "TICKET", "--round", "2", "--width", "0.5"], "ticket of another architecture"),
    (["--ticket", "TICKET", "--round", "2", "--model", "conv2"], "ticket of another architecture"),
    (["--ticket", "TICKET", "--round", "2", "--seed", "4"], "another initialisation (seed 0, not 4)"),
    (["--ticket", "TICKET", "--round", "3"], "has no finished round 3"),
    (["--ticket", "TICKET", "--round", "1", "--edge-popup"], "choose one"),
    (["--ticket", "NOWHERE", "--round", "1"], "--ticket: "),
    (["--edge-popup", "--k", "0"], "argument --k: expected a number in (0, 1]"),
    (["--edge-popup", "--k", "1.5"], "argument --k: expected a number in (0, 1]"),
    (["--model", "vgg99"], "unknown model"),
]


@pytest.fixture(scope="module")
def shared_ticket(tmp_path_factory):
    return _imp_ticket(tmp_path_factory.mktemp("ticket"))


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, shared_ticket, extra, message):
    extra = [str(shared_ticket) if a == "TICKET" else str(tmp_path / "nowhere") if a == "NOWHERE" else a
             for a in extra]
    out, runs = tmp_path / "out", tmp_path / "runs"
    capsys.readouterr()
    code = run(SYN + ["--runs-dir", str(runs), "--out", str(out)] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not runs.exists()


def test_out_of_another_analysis_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(SYN + ["--points", "3", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    before = files(out)
    capsys.readouterr()
    assert run(SYN + ["--points", "4", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another configuration (points differ)" in err and len(err.strip().splitlines()) == 1
    assert files(out) == before


def test_batchnorm_statistics_are_re_estimated_at_every_point(tmp_path):
    out = tmp_path / "bn"
    argv = ["--dataset", "synthetic", "--model", "resnet18", "--width", "0.0625", "--epochs", "1", "--no-progress",
            "--threads", "1", "--points", "3", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]
    assert run(argv) == 0
    row = json.loads((out / "instability.json").read_text())["rows"][0]
    args = inst.parser().parse_args(argv)
    inst.validate(args)
    config = desc.instability_identity(args)
    dataset = data_mod.load("synthetic")
    a, b = (torch.load(Path(c) / "checkpoint.pt", weights_only=True)["model"] for c in row["copies"])
    mid = stability.interpolate(a, b, 0.5)
    model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
    model.load_state_dict(mid)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    with torch.no_grad():  # by hand: fresh statistics, one pass over the training set in train mode
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for i in range(0, len(dataset.train_y), 128):
            model(dataset.train_x[i:i + 128])
        model.eval()
        acc = 100.0 * (model(dataset.test_x).argmax(1) == dataset.test_y).sum().item() / len(dataset.test_y)
    assert row["test_error"][1] == 100.0 - acc
    # the interpolated running statistics themselves are not what is evaluated
    assert any(not torch.allclose(m.running_mean, mid[f"{n}.running_mean"]) for n, m in model.named_modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_a_stored_path_is_reused_only_when_computed_from_these_copies(tmp_path, capsys):
    """Issue #24: path_k*.json computed from other copies (retrained since, or a file from elsewhere) is
    computed again, not printed as if reproduced; one computed from these copies is reused."""
    argv = [*SYN, "--epochs", "1", "--rewind-iters", "0", "--points", "3", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "a")]
    assert run(argv) == 0
    path_file = tmp_path / "a" / "path_k000000.json"
    row = json.loads(path_file.read_text())
    assert len(row["copies_sha256"]) == 2
    for stale in ({**row, "barrier": 99.0, "copies_sha256": ["0" * 64] * 2},
                  {k: v for k, v in {**row, "barrier": 99.0}.items() if k != "copies_sha256"}):
        path_file.write_text(json.dumps(stale))
        assert run(argv) == 0
        assert json.loads(path_file.read_text()) == row  # computed again from the copies
    capsys.readouterr()
    assert run(argv) == 0
    assert json.loads(path_file.read_text()) == row and "0 s for paths" in capsys.readouterr().out  # reused
