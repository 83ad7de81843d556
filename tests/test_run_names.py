"""Old runs are found again by name: the folder names (and so the config.json contents, which the
names' hashes cover) that main at 268b484 derived from these flags, pinned. A renovation of how
runs are described must give every one of them the same name, and a finished run of the old
layout must be read back with nothing recomputed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from supermask import desc
from supermask import imp as imp_mod
from supermask import instability, stability
from supermask import train as train_mod
from supermask.cli import run_main

DOCS = Path(__file__).resolve().parent.parent / "docs" / "instability"

# (argv, the run folder's name at 268b484)
TRAIN = [
    ([], "fc_w1_mnist_k0.5_s0_0ef74fafee"),
    (["--dense"], "fc_w1_mnist_dense_s0_bd96fc9d40"),
    (["--dense", "--prune-at-init", "snip", "--k", "0.2"], "fc_w1_mnist_snip0.2_s0_de74c0b279"),
    (["--random-subnet", "--k", "0.3"], "fc_w1_mnist_random0.3_s0_cc87f0c184"),
    (["--mask", "sampled"], "fc_w1_mnist_sampled_s0_bd6682c923"),
    (["--model", "conv2", "--dataset", "cifar10", "--width", "0.5", "--k", "0.3", "--schedule", "multistep",
      "--milestones", "1,2", "--warmup-epochs", "1", "--label-smoothing", "0.1"],
     "conv2_w0.5_cifar10_k0.3_s0_a44840aed9"),
    (["--dense", "--prune-at-init", "synflow", "--pai-check", "shuffle", "--k", "0.1"],
     "fc_w1_mnist_synflow0.1-shuffle_s0_fd915207a6"),
    (["--dataset", "fashion-mnist", "--epochs", "3", "--first-layer-dense", "--score-init-constant", "0.5", "--topk",
      "global", "--out", "x", "--threads", "2", "--no-progress"], "fc_w1_fashion-mnist_k0.5_s0_67d576ef7d"),
]
# (argv, the IMP run's name, its ticket run's name)
IMP = [
    ([], "imp_fc_w1_mnist_s0_70eb7a708d", "imp_fc_w1_mnist_s0_70eb7a708d"),
    (["--control", "reinit"], "imp_fc_w1_mnist_reinit_s0_0932a65df9", "imp_fc_w1_mnist_s0_70eb7a708d"),
    (["--rewind-iter", "100", "--warmup-epochs", "1", "--nesterov"], "imp_fc_w1_mnist_s0_d8df506918",
     "imp_fc_w1_mnist_s0_d8df506918"),
    (["--dataset", "fashion-mnist", "--rounds", "8", "--epochs", "10", "--control", "random-mask", "--out", "y"],
     "imp_fc_w1_fashion-mnist_random-mask_s0_62e6ba8453", "imp_fc_w1_fashion-mnist_s0_2093e7f888"),
]
# (argv, the analysis' folder name, its first copy's (rewind iteration 0, data order 1) name,
#  the committed analysis made with these flags)
INSTABILITY = [
    (["--dataset", "fashion-mnist", "--epochs", "5"], "instability_dense_fc_w1_fashion-mnist_dense_s0_0ef66ab32e",
     "instability_copy_fc_w1_fashion-mnist_dense_s0_k0_d1_a0d676f714", "dense"),
    (["--dataset", "fashion-mnist", "--epochs", "5", "--edge-popup", "--k", "0.5", "--seed", "1"],
     "instability_edge-popup_fc_w1_fashion-mnist_ep0.5_s1_d3508c235e",
     "instability_copy_fc_w1_fashion-mnist_ep0.5_s1_k0_d1_a46a25d87f", "edge_popup_k0.5_s1"),
]


def train_name(argv):
    args = train_mod.parse_args(argv)
    train_mod.validate(args)
    config = desc.train_identity(args)
    return config, desc.train_name(config)


def imp_names(argv):
    args = imp_mod.parser().parse_args(argv)
    imp_mod.validate(args)
    config = desc.imp_identity(args)
    return desc.imp_name(config), desc.imp_name(desc.ticket_identity(config))


def instability_names(argv):
    args = instability.parser().parse_args(argv)
    instability.validate(args)
    config = desc.instability_identity(args)
    mode = "edge-popup" if args.edge_popup else "dense"
    oconfig = stability.out_config(config, mode, None, args.data_seed_list, args.points)
    return oconfig, stability.out_name(oconfig, config), stability.copy_name(config, 0, 1, None)


@pytest.mark.parametrize("argv,name", TRAIN, ids=[n for _, n in TRAIN])
def test_train_run_names_unchanged(argv, name):
    assert train_name(argv)[1] == name


@pytest.mark.parametrize("argv,name,ticket", IMP, ids=[n for _, n, _ in IMP])
def test_imp_run_names_unchanged(argv, name, ticket):
    assert imp_names(argv) == (name, ticket)


@pytest.mark.parametrize("argv,name,copy,committed", INSTABILITY, ids=[n for _, n, _, _ in INSTABILITY])
def test_instability_names_unchanged(argv, name, copy, committed):
    oconfig, out_name, copy_name = instability_names(argv)
    assert (out_name, copy_name) == (name, copy)
    # the committed analysis (docs/instability) is this configuration: found again, not recomputed
    assert json.loads((DOCS / committed / "config.json").read_text()) == oconfig


def test_finished_old_run_is_found_not_recomputed(tmp_path, capsys, monkeypatch):
    """A finished train run in the layout of 268b484 (config.json, results.json): the same command
    names the same folder and only reads it."""
    argv = ["--dataset", "synthetic", "--epochs", "1", "--width", "0.25", "--val-size", "200", "--no-progress"]
    config, name = train_name(argv)
    assert name == "fc_w0.25_synthetic_k0.5_s0_77760dfa53"  # 268b484's name for these flags
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # results.json as 268b484's training wrote it (training.train: these keys, the run's config included)
    old_results = {"test_acc": 12.5, "test_acc5": 60.0, "best_test_acc": 12.5, "val_acc": 11.0, "best_val_acc": 11.0,
                   "early_stop_iteration": 10, "early_stop_val_loss": 2.3, "epochs": 1, "start_iteration": 0,
                   "iterations": 10, "params_total": 100, "params_kept": 50, "weights_remaining": 50.0,
                   "seconds_per_epoch": 0.5, "train_config": {}, "config": config}
    (run / "results.json").write_text(json.dumps(old_results))
    before = sorted(p.name for p in run.iterdir())
    monkeypatch.chdir(tmp_path)
    assert run_main("python -m supermask.train", train_mod.main, argv) == 0
    assert f"{Path('runs') / name} already holds this finished run: test accuracy 12.50%" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == before
