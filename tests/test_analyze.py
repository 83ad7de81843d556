"""supermask.analyze: mask overlap against chance, weight movement of IMP tickets, report and figures."""
import json

import pytest
import torch
from helpers import TINY, command

from supermask import analyze
from supermask import imp as imp_mod
from supermask import train as train_mod

cli = command(analyze)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        assert train_mod.main([*TINY, "--k", "0.8", "--seed", str(seed), "--out", str(root / f"ep{seed}")]) == 0
    assert train_mod.main([*TINY, "--width", "0.3", "--out", str(root / "wide")]) == 0
    (root / "dense").mkdir()  # a dense run is refused from its config alone
    config = json.loads((root / "ep0" / "config.json").read_text())
    (root / "dense" / "config.json").write_text(json.dumps({**config, "dense": True}))
    assert imp_mod.main([*TINY, "--rounds", "2", "--val-every", "0", "--out", str(root / "imp")]) == 0
    return root


def test_iou_of_a_mask_with_itself_is_one_and_random_masks_match_chance():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200_000, generator=g) < 0.3
    assert analyze.iou(a, a) == 1.0
    for p, q in ((0.3, 0.3), (0.5, 0.2), (0.8, 0.512), (0.05, 0.9)):
        a, b = torch.rand(200_000, generator=g) < p, torch.rand(200_000, generator=g) < q
        assert analyze.iou(a, b) == pytest.approx(analyze.chance_iou(p, q), abs=0.005)
    assert analyze.chance_iou(1.0, 0.4) == pytest.approx(0.4)
    ov = analyze.overlap({"x": a, "y": a[:1000]}, {"x": a, "y": ~a[:1000]})
    assert ov["layers"]["x"]["iou"] == 1.0 and ov["layers"]["y"]["iou"] == 0.0


def test_analysis_of_synthetic_runs_writes_report_and_figures(runs, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert cli(runs / "ep0", runs / "ep1", runs / "imp", "--out", out) == 0
    report = (out / "report.md").read_text()
    for name in ("sparsity.png", "overlap.png", "overlap_vs_rounds.png", "movement.png", "scores.png",
                 "kept_weights.png"):
        assert (out / name).stat().st_size > 1000
        assert f"({name})" in report
    data = json.loads((out / "analysis.json").read_text())
    relations = {p["relation"] for p in data["pairs"]}
    assert relations == {"edge-popup vs edge-popup", "edge-popup vs IMP (closest density)"}
    # IMP at 2 rounds (64% of the hidden layers) is the closest to edge-popup's k = 0.8? No: round 1 (80%).
    matched = [p for p in data["pairs"] if p["relation"].startswith("edge-popup vs IMP")]
    assert all(p["b"].endswith("r01") for p in matched)
    # Same seed: edge-popup's signed-constant weights have the signs of IMP's Kaiming-normal init.
    by_a = {p["a"]: p for p in matched}
    assert by_a["ep w0.25 k0.8 s0"]["init_sign_agreement"] == 1.0
    assert 0.45 < by_a["ep w0.25 k0.8 s1"]["init_sign_agreement"] < 0.55
    for p in data["pairs"]:
        for v in [*p["layers"].values(), p["overall"]]:
            assert 0 <= v["iou"] <= 1 and 0 < v["chance"] <= 1
    moves = [m for m in data["movement"] if m["layer"] == "all"]
    assert [m["round"] for m in moves] == [1, 2]
    assert all(m["move_kept"] > 0 and m["move_pruned"] > 0 for m in moves)
    assert "| 1 |" in report and "IoU / chance" in report


def test_movement_matches_a_direct_computation(runs):
    tickets, imp_runs = analyze.load([runs / "imp"])
    r0, r1 = imp_runs[0].rounds[0], imp_runs[0].rounds[1]
    rows = {m["layer"]: m for m in analyze.movement(imp_runs) if m["round"] == 1}
    for name, mask in r1.masks.items():
        delta = (r0.weights[name] - r0.init[name]).abs()
        assert rows[name]["move_kept"] == pytest.approx(delta[mask].mean().item())
        assert rows[name]["move_pruned"] == pytest.approx(delta[~mask].mean().item())
        assert rows[name]["n_kept"] + rows[name]["n_pruned"] == mask.numel()
    assert [t.round for t in tickets] == [1, 2]


def test_an_imp_round_folder_and_mismatched_widths(runs, tmp_path):
    out = tmp_path / "a"
    assert cli(runs / "ep0", runs / "wide", runs / "imp" / "round_02", "--out", out) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert [m["label"] for m in data["masks"]] == ["ep w0.25 k0.8 s0", "ep w0.3 k0.5 s0", "imp w0.25 s0 r02"]
    # Width 0.3 shares no layer shape with width 0.25: those pairs are skipped with a note.
    for p in data["pairs"]:
        for name in p["layers"]:
            assert name in ("1", "3", "5")
    assert all("no layer of the same shape" in s for s in data["skipped"])


def test_bad_inputs_one_line_exit_2(runs, tmp_path, capsys):
    def check(code, *fragments):
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        for f in fragments:
            assert f in err, err

    check(cli(runs / "ep0", "--out", tmp_path / "x"), "two or more")
    check(cli(runs / "ep0", runs / "dense", "--out", tmp_path / "x"), "dense")
    check(cli(runs / "ep0", tmp_path / "missing", "--out", tmp_path / "x"), "missing")
    check(cli(runs / "ep0", tmp_path, "--out", tmp_path / "x"), "no config.json")
    assert not (tmp_path / "x").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "report.md").write_text("mine")
    check(cli(runs / "ep0", runs / "ep1", "--out", full), "--force")
    assert (full / "report.md").read_text() == "mine"
    check(cli(runs / "ep0"), "--out")
