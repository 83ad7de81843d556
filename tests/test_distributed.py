"""Distributed training (torchrun / DistributedDataParallel) on the CPU with gloo and 2 processes.

One spawned 2-process group runs every distributed scenario in turn (process start-up dominates
the cost): a checksum mismatch, a full run, an interrupted run and its resume, and a run on a
streamed ImageFolder dataset. Each rank records, with a Python audit hook, every file it opened
for writing, so the tests can check that only rank 0 writes. The tests compare with
single-process runs made here. A real ``torchrun --standalone`` run of the CLI is marked slow.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from supermask import desc
from supermask import data as data_mod
from supermask import distributed
from supermask import imp as imp_cli
from supermask import train as train_cli
from supermask import training

WORLD = 2
EPOCHS = 2
STOP_AT = 25  # iterations; synthetic has 20 per epoch at batch 128: interrupted in epoch 2
RUN = ["--dataset", "synthetic", "--epochs", str(EPOCHS), "--no-progress", "--device", "cpu"]
IMP = ["--dataset", "synthetic", "--width", "0.5", "--rounds", "1", "--epochs", "1", "--rewind-iter", "5",
       "--no-progress", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stop(Exception):
    pass


def _write_opens(root: str, log: list, active: list):
    """Audit hook recording paths under root opened for writing (or renamed / removed)."""
    def hook(event, args):
        if not active[0]:
            return
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                      (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and isinstance(path, str | bytes | os.PathLike) and str(os.fsdecode(path)).startswith(root):
                log.append(("open", os.fsdecode(path)))
        elif event in ("os.rename", "os.remove", "os.mkdir") and str(os.fsdecode(args[0])).startswith(root):
            log.append((event, os.fsdecode(args[0])))
    sys.addaudithook(hook)


def _worker(rank: int, port: int, tmp: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    tmp = Path(tmp)
    writes, active, report = [], [False], {}
    _write_opens(str(tmp), writes, active)
    distributed.setup(torch.device("cpu"))  # kept for all scenarios (main's session leaves it alone)
    assert distributed.world_size() == WORLD and distributed.rank() == rank

    # 1. Networks that differ between ranks are refused, on every rank.
    model = desc.build_model({"model": "fc", "width": 0.2, "init": "signed_constant", "seed": rank,
                                   "dense": False, "k": 0.5, "scale_fan": False, "topk": "layer"}, (1, 8, 8), 10)
    try:
        distributed.verify_identical(model)
        report["mismatch"] = None
    except distributed.RankMismatchError as e:
        report["mismatch"] = str(e)

    # 2. A full run, 3. an interrupted one and 4. its resume, all through supermask.train's CLI main.
    active[0] = True
    train_cli.main([*RUN, "--out", str(tmp / "dist")])
    orig = training.train  # what train_run.run calls

    def stopping(*a, **k):
        steps = [0]

        def after(_model):
            steps[0] += 1
            if steps[0] == STOP_AT:
                raise _Stop

        return orig(*a, **{**k, "after_step": after})

    training.train = stopping
    try:
        train_cli.main([*RUN, "--out", str(tmp / "resumed")])
        report["stopped"] = False
    except _Stop:
        report["stopped"] = True
    training.train = orig
    distributed.barrier()
    train_cli.main([*RUN, "--out", str(tmp / "resumed"), "--resume"])
    # 5. A streamed ImageFolder dataset: DataLoader shards, evaluation sharded and all-reduced.
    folder = data_mod.load("imagenet", tmp / "folder", val_size=2, workers=0, image_size=32)
    model = desc.build_model({"model": "resnet18", "width": 0.125, "init": "signed_constant", "seed": 0,
                                   "dense": False, "k": 0.5, "scale_fan": False, "topk": "layer"},
                                  folder.input_shape, folder.num_classes)
    cfg = training.TrainConfig(epochs=1, batch_size=5, lr=0.1, seed=0)
    out = tmp / "folder_run"
    if distributed.is_main():
        out.mkdir()
    distributed.barrier()
    report["folder"] = training.train(model, folder, cfg, torch.device("cpu"), out, progress=False, log=lambda *_: None)
    report["folder_test"] = training.evaluate_streamed(model, folder.test, torch.device("cpu"), 3)
    # 6. IMP (dense weights synchronised, masks from magnitudes, rewind.pt written by rank 0).
    imp_cli.main([*IMP, "--out", str(tmp / "imp_dist")])
    active[0] = False
    report["writes"] = writes
    (tmp / f"report{rank}.pkl").write_bytes(pickle.dumps(report))
    distributed.teardown()


def make_image_folder(root: Path, per_class=(7, 3), classes=("cat", "dog"), size=40):
    """A tiny ImageFolder tree of PNGs: root/train/<class>/*.png and root/val/<class>/*.png."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(size, size, 3, generator=g) * 128 + 127 * c).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process runs (spawned once) and the single-process reference run."""
    tmp = tmp_path_factory.mktemp("dist")
    make_image_folder(tmp / "folder")
    mp.start_processes(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, start_method="spawn", join=True)
    reports = [pickle.loads((tmp / f"report{r}.pkl").read_bytes()) for r in range(WORLD)]
    torch.set_num_threads(1)  # as the ranks: the same matmul kernels, so only the batch split differs
    assert train_cli.main([*RUN, "--out", str(tmp / "single")]) == 0
    assert imp_cli.main([*IMP, "--out", str(tmp / "imp_single")]) == 0
    return tmp, reports


def _ckpt(path: Path) -> dict:
    return torch.load(path / "checkpoint.pt", weights_only=True)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(a: list[dict], b: list[dict]):
    assert len(a) == len(b) == EPOCHS
    for x, y in zip(a, b):
        for key in x:
            if key != "seconds":
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-6), key


def test_two_processes_match_one_with_the_same_global_batch(runs):
    tmp, _ = runs
    dist, single = _ckpt(tmp / "dist"), _ckpt(tmp / "single")
    assert dist["epoch"] == single["epoch"] == EPOCHS
    scores = [k for k in single["model"] if k.endswith("scores")]
    assert scores
    for key in single["model"]:
        if key.endswith("weight"):  # frozen: generated from the seed, never synchronised
            assert torch.equal(dist["model"][key], single["model"][key]), key
        else:
            torch.testing.assert_close(dist["model"][key], single["model"][key], rtol=1e-5, atol=1e-6)
    _assert_same_metrics(_metrics(tmp / "dist"), _metrics(tmp / "single"))
    r_dist, r_single = (json.loads((tmp / d / "results.json").read_text()) for d in ("dist", "single"))
    assert r_dist["test_acc"] == r_single["test_acc"] and r_dist["params_kept"] == r_single["params_kept"]


def test_masks_checked_identical_and_mismatch_fails_loudly(runs):
    tmp, reports = runs
    for report in reports:  # a mismatch is reported on every rank
        assert report["mismatch"] and "masks" in report["mismatch"] and "weights" in report["mismatch"]
    # every epoch's checksum passed (the runs finished); the final masks equal the single process's
    from supermask.layers import supermask_layers

    masks = []
    for run in ("dist", "single"):
        config = json.loads((tmp / run / "config.json").read_text())
        model = desc.build_model(config, (1, 28, 28), 10)
        model.load_state_dict(_ckpt(tmp / run)["model"])
        masks.append([layer.mask() for _, layer in supermask_layers(model)])
    assert len(masks[0]) == 3
    for a, b in zip(*masks):
        assert torch.equal(a, b)


def test_only_rank_0_writes(runs):
    tmp, reports = runs
    assert reports[1]["writes"] == []
    written = " ".join(Path(p).name for _, p in reports[0]["writes"])
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "results.json"):
        assert name in written  # atomic writes: a temporary file, then a rename
    # (rank 0 held the run folder's .lock while it wrote it, and removed it when it ended)
    names = sorted(p.name for p in (tmp / "dist").iterdir() if not p.name.startswith("events.out.tfevents."))
    assert names == ["checkpoint.pt", "config.json", "curves.png", "metrics.jsonl", "results.json"]


def test_resumed_distributed_run_matches_uninterrupted(runs):
    tmp, reports = runs
    assert all(r["stopped"] for r in reports)
    resumed, full = _ckpt(tmp / "resumed"), _ckpt(tmp / "dist")
    for key in full["model"]:
        torch.testing.assert_close(resumed["model"][key], full["model"][key], rtol=0, atol=0)
    _assert_same_metrics(_metrics(tmp / "resumed"), _metrics(tmp / "dist"))


def test_streamed_image_folder_distributed(runs):
    tmp, reports = runs
    assert reports[0]["folder"]["test_acc"] == reports[1]["folder"]["test_acc"]
    # the sharded, all-reduced evaluation equals one process evaluating everything
    folder = data_mod.load("imagenet", tmp / "folder", val_size=2, workers=0, image_size=32)
    model = desc.build_model({"model": "resnet18", "width": 0.125, "init": "signed_constant", "seed": 0,
                                   "dense": False, "k": 0.5, "scale_fan": False, "topk": "layer"},
                                  folder.input_shape, folder.num_classes)
    model.load_state_dict(_ckpt(tmp / "folder_run")["model"])
    alone = training.evaluate_streamed(model, folder.test, torch.device("cpu"), 3)
    for key in ("acc", "acc5"):
        assert alone[key] == reports[0]["folder_test"][key] == reports[1]["folder_test"][key]
    assert alone["loss"] == pytest.approx(reports[0]["folder_test"]["loss"], rel=1e-5)


def test_image_folder_layout_and_transforms(tmp_path):
    make_image_folder(tmp_path / "in")
    ds = data_mod.load("imagenet", tmp_path / "in", val_size=4, workers=0, image_size=32)
    assert ds.streaming and ds.num_classes == 2 and ds.input_shape == (3, 32, 32)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 4, 6)
    x, y = ds.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y in (0, 1)
    x, y = ds.test[5]
    assert x.shape == (3, 32, 32) and y == 1
    torch.testing.assert_close(ds.test[0][0], ds.test[0][0])  # evaluation transform: deterministic
    default = data_mod.load("imagenet", tmp_path / "in", val_size=0, workers=0)
    assert default.train[0][0].shape == (3, 224, 224) and default.test[0][0].shape == (3, 224, 224)
    with pytest.raises(data_mod.DataError, match="ImageFolder layout"):
        data_mod.load("imagenet", tmp_path / "missing")


def test_train_cli_imagenet_single_process(tmp_path, capsys):
    """The CLI path on a fake ImageFolder (224 px, the real transforms), one epoch, two workers."""
    make_image_folder(tmp_path / "in", per_class=(3, 1), size=24)
    out = tmp_path / "run"
    rc = train_cli.main(["--dataset", "imagenet", "--data-dir", str(tmp_path / "in"), "--val-size", "0",
                         "--model", "resnet50", "--width", "0.0625", "--epochs", "1", "--batch-size", "4",
                         "--workers", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 1 and 0 < results["params_kept"] < results["params_total"]
    assert train_cli.main(["--evaluate", str(out), "--data-dir", str(tmp_path / "in")]) == 0
    assert "test top-1" in capsys.readouterr().out


def test_models_match_torchvision_weight_counts():
    import torchvision

    from supermask.models import build

    def count(m):
        return sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear))

    assert count(build("resnet50", (3, 224, 224), 1000)) == count(torchvision.models.resnet50())
    assert count(build("wide_resnet50_2", (3, 224, 224), 1000)) == count(torchvision.models.wide_resnet50_2())


def test_imp_two_processes_match_one(runs):
    tmp, _ = runs
    for name in ("rewind.pt", "init.pt"):
        a, b = (torch.load(tmp / d / name, weights_only=True) for d in ("imp_dist", "imp_single"))
        a, b = a.get("model", a), b.get("model", b)
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for r in ("round_00", "round_01"):
        dist, single = _ckpt(tmp / "imp_dist" / r), _ckpt(tmp / "imp_single" / r)
        for key in single["masks"]:
            assert torch.equal(dist["masks"][key], single["masks"][key]), (r, key)
        for key in single["model"]:
            torch.testing.assert_close(dist["model"][key], single["model"][key], rtol=1e-5, atol=1e-6)
    rows = [json.loads((tmp / d / "results.json").read_text())["rounds"] for d in ("imp_dist", "imp_single")]
    assert [r["weights_kept"] for r in rows[0]] == [r["weights_kept"] for r in rows[1]]


@pytest.mark.slow
def test_torchrun_cli_end_to_end(tmp_path):
    """What users run: torchrun --standalone --nproc-per-node 2 -m supermask.train."""
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--standalone", "--nproc-per-node", "2", "-m", "supermask.train", *RUN,
                           "--out", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/2") == 1  # rank 0 only logs
    assert "x 2 processes" in proc.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == EPOCHS
