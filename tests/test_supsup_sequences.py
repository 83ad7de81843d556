"""Task sequences on one MaskBank (issue #26, item 5; supermask.sequences, the library of
python -m supermask.tasks): earlier tasks bit-identical after later ones, a resumed run bit-identical
to an uninterrupted one, a finished run only read, the benchmarks' data."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from supermask import data as data_mod
from supermask import sequences as seq

CONFIG = seq.sequence_config("permuted", 3, 1, 0.25, 0.5, 0, "synthetic")


@pytest.fixture(scope="module")
def dataset():
    return data_mod.load("synthetic", val_size=seq.VAL_SIZE)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("seq") / "run"
    results = seq.run_sequence(CONFIG, out, dataset, progress=False, log=lambda *_: None)
    return out, results


def test_earlier_tasks_outputs_are_bit_identical_after_later_tasks(dataset):
    bank = seq.build_bank(CONFIG, dataset.input_shape)
    right_after, scores = {}, {}
    for t in range(CONFIG["tasks"]):
        seq.learn_task(bank, CONFIG, dataset, t, torch.device("cpu"), progress=False, log=lambda *_: None)
        x, _ = seq.task_split(CONFIG, dataset.test_x, dataset.test_y, t)
        bank.set_task(t)
        bank.eval()
        with torch.no_grad():
            right_after[t] = (x, bank(x))
        scores[t] = [p.detach().clone() for p in bank.task_parameters(t)]
    for t, (x, out) in right_after.items():
        bank.set_task(t)
        with torch.no_grad():
            assert torch.equal(bank(x), out), t
        assert all(torch.equal(a, b) for a, b in zip(bank.task_parameters(t), scores[t]))
    assert not torch.equal(right_after[0][1], right_after[1][1])  # different tasks, different outputs


def test_a_finished_sequence_has_every_output(finished):
    out, results = finished
    assert {p.name for p in out.iterdir()} >= {"config.json", "task_000.pt", "task_001.pt", "task_002.pt",
                                               "results.json", "matrix.csv", "table.md", "plot.png"}
    matrix = results["matrix"]
    assert [len(r) for r in matrix] == [1, 2, 3]
    for j in range(3):  # no forgetting: a task's accuracy never changes after it is learned
        assert {matrix[i][j] for i in range(j, 3)} == {matrix[j][j]}
    assert results["final_acc"] == matrix[-1] and results["max_forgetting"] == 0
    bank = seq.build_bank(CONFIG, (1, 28, 28))
    weights = sum(layer.weight.numel() for layer in bank._layers)
    assert results["weights"] == weights
    assert results["bytes_per_task"] == sum((layer.weight.numel() + 7) // 8 for layer in bank._layers)
    inference = results["inference"]
    assert inference["batches"] == 3 * (1000 // 128) and 0 <= inference["one-shot"] <= 1
    assert json.loads((out / "results.json").read_text())["matrix"] == matrix
    assert (out / "matrix.csv").read_text().splitlines()[0] == "after_task,task_0,task_1,task_2"


def test_a_resumed_sequence_is_bit_identical_to_an_uninterrupted_one(finished, tmp_path, dataset):
    out, results = finished
    part = tmp_path / "part"
    part.mkdir()
    for name in ("config.json", "task_000.pt", "task_001.pt"):  # killed while learning task 2
        shutil.copy2(out / name, part / name)
    logs = []
    resumed = seq.run_sequence(CONFIG, part, dataset, progress=False, log=logs.append)
    assert any("2 of 3 tasks already learned" in line for line in logs)
    for key in results:
        if key != "seconds_per_task":
            assert resumed[key] == results[key], key
    for name in ("matrix.csv", "table.md"):
        assert (part / name).read_bytes() == (out / name).read_bytes()
    from supermask.storage import load_checkpoint
    a, b = load_checkpoint(out / "task_002.pt"), load_checkpoint(part / "task_002.pt")
    assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"]) and a["row"] == b["row"]


def test_a_finished_sequence_is_only_read(finished, dataset, monkeypatch):
    out, results = finished
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def forbidden(*_a, **_k):
        raise AssertionError("recomputed")

    for name in ("learn_task", "inference_accuracy", "build_bank", "write_outputs"):
        monkeypatch.setattr(seq, name, forbidden)
    logs = []
    assert seq.run_sequence(CONFIG, out, dataset, progress=False, log=logs.append) == results
    assert "nothing recomputed" in logs[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_permutations_and_splits(dataset):
    assert torch.equal(seq.permutation(0, 5, 784), torch.arange(784))
    p = seq.permutation(3, 5, 784)
    assert torch.equal(p, seq.permutation(3, 5, 784)) and torch.equal(p.sort().values, torch.arange(784))
    assert not torch.equal(p, seq.permutation(3, 6, 784)) and not torch.equal(p, seq.permutation(4, 5, 784))
    x, y = dataset.test_x[:50], dataset.test_y[:50]
    px, py = seq.task_split(CONFIG, x, y, 3)
    assert torch.equal(px.flatten(1), x.flatten(1)[:, seq.permutation(3, 0, 784)]) and torch.equal(py, y)
    split = seq.sequence_config("split", 5, 1, 0.25, 0.5, 0, "synthetic")
    sx, sy = seq.task_split(split, x, y, 2)
    assert torch.equal(sx, x[(y == 4) | (y == 5)]) and torch.equal(sy, y[(y == 4) | (y == 5)] - 4)
    assert set(sy.tolist()) <= {0, 1} and seq.num_outputs(split) == 2
    assert seq.task_dataset(split, dataset, 4).num_classes == 2


def test_matrix_csv_by_hand():
    assert seq.matrix_csv([[90.0], [90.0, 80.5]]) == "after_task,task_0,task_1\n0,90.00,\n1,90.00,80.50\n"
