"""Issue #25's acceptance: every shape of hidden-networks' config files (allenai/hidden-networks,
configs/: one per architecture / init / conv type / schedule combination its files use) read by
``python -m supermask.train --config``, the network built and trained one step on synthetic data.

The files are ours, written here in their format (their keys and section banners), not copies of
theirs. A shape is one combination; values that only repeat another shape's are left out. Each is
read as theirs, in the hidden-networks-compatible mode (hn_compat), as a file of theirs is.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from supermask import data as data_mod
from supermask import desc
from supermask import train as train_mod
from supermask.cli import run_main
from supermask.layers import supermask_layers
from supermask.training import make_optimizer

SMALL = {"set": "CIFAR10", "optimizer": "sgd", "lr": 0.1, "lr_policy": "cosine_lr", "epochs": 100,
         "weight_decay": 0.0001, "momentum": 0.9, "batch_size": 128, "conv_type": "SubnetConv",
         "bn_type": "NonAffineBatchNorm", "freeze_weights": True, "prune_rate": -1}
DENSE = {**SMALL, "conv_type": "DenseConv", "freeze_weights": False, "init": "kaiming_normal"}
SAMPLE = {**SMALL, "conv_type": "SampleSubnetConv", "lr": 100, "lr_policy": "constant_lr"}
LARGE = {"set": "ImageNet", "optimizer": "sgd", "lr": 0.256, "lr_policy": "cosine_lr", "epochs": 100,
         "weight_decay": 0.000030517578125, "momentum": 0.875, "batch_size": 256, "label_smoothing": 0.1,
         "warmup_length": 5, "conv_type": "SubnetConv", "bn_type": "NonAffineBatchNorm", "freeze_weights": True,
         "prune_rate": -1, "init": "signed_constant", "scale_fan": True, "nonlinearity": "relu", "mode": "fan_in"}
UKN = {"init": "kaiming_normal", "scale_fan": True}
USC = {"init": "signed_constant", "scale_fan": True}
KN = {"init": "kaiming_normal", "scale_fan": False}
SC = {"init": "signed_constant", "scale_fan": False}

# (shape name, arch, keys): their file families, smallscale (CIFAR-10 / MNIST), largescale (ImageNet)
SHAPES = [
    *[(f"{a.lower()}-{n}", a, {**SMALL, **i}) for a in ("Conv2", "Conv4", "Conv6", "Conv8")
      for n, i in (("kn", KN), ("sc", SC), ("ukn", UKN), ("usc", USC))],
    *[(f"fc-{n}", "FC", {**SMALL, "set": "MNIST", **i}) for n, i in (("kn", KN), ("usc", USC))],
    ("conv4-uku", "Conv4", {**SMALL, "init": "kaiming_uniform", "scale_fan": True}),
    ("conv4-uxn", "Conv4", {**SMALL, "init": "xavier_normal", "scale_fan": True}),
    ("conv4wide-kn", "Conv4Wide", {**SMALL, **KN, "width_mult": 2.5}),
    ("conv4wide-ukn", "Conv4Wide", {**SMALL, **UKN, "width_mult": 0.5}),
    ("conv6wide-ukn", "Conv6Wide", {**SMALL, **UKN, "width_mult": 1.5}),
    ("conv4wide-sgd-dense", "Conv4Wide", {**DENSE, "width_mult": 1}),
    ("conv6wide-sgd-dense", "Conv6Wide", {**DENSE, "width_mult": 1}),
    ("conv4wide-adam-dense", "Conv4Wide", {**DENSE, "optimizer": "adam", "lr": 0.0003, "width_mult": 0.5}),
    *[(f"{a.lower()}-{o}-dense", a, {**DENSE, "optimizer": o, "lr": 0.0003 if o == "adam" else 0.01,
                                       **({"set": "MNIST"} if a == "FC" else {})})
      for a in ("FC", "Conv2", "Conv4", "Conv6", "Conv8") for o in ("sgd", "adam")],
    *[(f"cresnet18-{n}", "cResNet18", {**SMALL, **i}) for n, i in (("kn", KN), ("usc", USC))],
    ("cresnet18-dense", "cResNet18", {**DENSE, "bn_type": "LearnedBatchNorm"}),
    *[(f"{a.lower()}sample-{n}", a, {**SAMPLE, **i}) for a in ("Conv2", "Conv4", "Conv6", "Conv8")
      for n, i in (("ukn", UKN), ("usc", USC), ("uxn", {"init": "xavier_normal", "scale_fan": True}),
                   ("uxs", {"init": "xavier_constant", "scale_fan": True}))],
    ("conv4sample-cs", "Conv4", {**SAMPLE, **SC, "baseline": "cs"}),
    ("conv6sample-ss", "Conv6", {**SAMPLE, **SC, "baseline": "ss", "weight_decay": 0.0}),
    ("conv4widesample-ukn", "Conv4Wide", {**SAMPLE, **UKN, "width_mult": 0.5}),
    ("cresnet18sample-usc", "cResNet18", {**SAMPLE, **USC}),
    ("conv4-multistep", "Conv4", {**SMALL, **SC, "lr_policy": "multistep_lr", "multistep_lr_adjust": 30,
                                  "multistep_lr_gamma": 0.1}),
    ("conv4-no-lr-policy", "Conv4", {k: v for k, v in {**SMALL, **SC}.items() if k != "lr_policy"}),
    ("conv4-dense-first-last", "Conv4", {**SMALL, **SC, "first_layer_dense": True, "last_layer_dense": True}),
    *[(f"{a.lower()}-imagenet", a, LARGE) for a in ("ResNet18", "ResNet50", "ResNet101", "WideResNet50_2",
                                                    "WideResNet101_2")],
    ("resnet50-imagenet-ukn", "ResNet50", {**LARGE, "init": "kaiming_normal", "nesterov": False}),
    *[(f"{a.lower()}-imagenet-dense", a, {**LARGE, "conv_type": "DenseConv", "bn_type": "LearnedBatchNorm",
                                          "freeze_weights": False, "init": "kaiming_normal", "scale_fan": False,
                                          "prune_rate": 0.0})
      for a in ("ResNet18", "ResNet50", "WideResNet50_2")],
    ("resnet50-imagenet-sample", "ResNet50", {**LARGE, "conv_type": "SampleSubnetConv"}),
]
# One step of these at full size is seconds to a minute on 2 CPU cores: the slow suite's.
HEAVY = ("ResNet50", "ResNet101", "WideResNet50_2", "WideResNet101_2")
BANNERS = {"arch": "Architecture", "set": "===== Dataset ===== #", "optimizer": "===== Learning Rate Policy ======== #",
           "epochs": "===== Network training config ===== #", "conv_type": "===== Sparsity =========== #"}


def yaml_text(name: str, arch: str, keys: dict) -> str:
    """A config file of their format: banners, then key: value lines."""
    lines = [f"# {name}: a shape of hidden-networks' configs, written for this test", ""]
    for key, value in {"arch": arch, **keys, "workers": 4}.items():
        if key in BANNERS:
            lines += ["", f"# {BANNERS[key]}"]
        lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def batch():
    d = data_mod.load("synthetic", val_size=0)
    return d.train_x[:4], d.train_y[:4], d.input_shape, d.num_classes


def read(tmp_path, name, arch, keys, *flags):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml_text(name, arch, keys))
    k = ["--k", "0.3"] if keys.get("prune_rate") == -1 else []
    args = train_mod.parse_args(["--config", str(path), "--dataset", "synthetic", *k, *flags])
    train_mod.validate(args)
    return desc.train_identity(args)


@pytest.mark.parametrize("name, arch, keys", [
    pytest.param(*s, marks=pytest.mark.slow) if s[1] in HEAVY else s for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_every_hidden_networks_config_shape_builds_and_trains_one_step(tmp_path, batch, name, arch, keys):
    config = read(tmp_path, name, arch, keys)
    assert config["hn_compat"] is True and config["dataset"] == "synthetic"
    x, y, shape, classes = batch
    model = desc.build_model(config, shape, classes)
    model.train()
    opt = make_optimizer(model, desc.training_config(config))
    if config["optimizer"] == "adam":  # hidden-networks' Adam takes no weight decay
        assert all(g["weight_decay"] == 0 for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    after = dict(model.named_parameters())
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    if config["dense"]:
        assert {n for n in after if n.endswith("weight") and after[n].dim() > 1} <= moved
    else:
        scores = {f"{n}.scores" for n, _ in supermask_layers(model)}
        assert scores and moved & scores  # the scores learn
        assert not any(n.endswith("weight") for n in moved)  # every weight frozen, dense layers included


def test_the_files_arch_and_init_reach_the_network(tmp_path):
    config = read(tmp_path, "w", "Conv4Wide", {**SMALL, "init": "xavier_constant", "width_mult": 0.15})
    assert (config["model"], config["width"], config["init"]) == ("conv4wide", 0.15, "xavier_constant")
    model = desc.build_model(config, (3, 32, 32), 10)
    first = next(layer for _, layer in supermask_layers(model))
    assert first.weight.shape == (9, 3, 3, 3)  # int(64 * 0.15): hidden-networks' truncation
    assert torch.allclose(first.weight.abs(), torch.tensor(math.sqrt(2 / (27 + 81))))  # xavier, no scale_fan


def test_a_file_of_theirs_trains_through_the_command_and_says_so_in_config_json(tmp_path):
    path = tmp_path / "fc.yml"
    path.write_text(yaml_text("fc", "FC", {**SMALL, "set": "MNIST", **USC, "epochs": 1, "batch_size": 500}))
    out = tmp_path / "run"
    argv = ["--config", str(path), "--dataset", "synthetic", "--k", "0.5", "--no-progress", "--no-tensorboard",
            "--out", str(out)]
    assert run_main("python -m supermask.train", train_mod.main, argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["hn_compat"] is True and config["val_size"] == 0 and config["schedule"] == "cosine"
    assert json.loads((out / "results.json").read_text())["epochs"] == 1
