"""python -m supermask.train --config FILE.yaml: the official edge-popup code's YAML configs
(allenai/hidden-networks) and ours in configs/, mapped to the same run config as the equivalent
flags; our example configs each train one epoch on synthetic data; bad configs are one line, exit 2."""
import json
from pathlib import Path

import pytest

from supermask import desc
from supermask import train as train_mod
from supermask.cli import run_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The keys of the official smallscale configs (configs/smallscale/conv4/conv4_usc_unsigned.yml),
# with their values; prune_rate -1 is theirs for "given on the command line".
SMALLSCALE = """\
# Architecture
arch: Conv4

# ===== Dataset ===== #
data: /mnt
set: CIFAR10
name: conv4_usc_unsigned

# ===== Learning Rate Policy ======== #
optimizer: sgd
lr: 0.1
lr_policy: cosine_lr

# ===== Network training config ===== #
epochs: 100
weight_decay: 0.0001
momentum: 0.9
batch_size: 128

# ===== Sparsity =========== #
conv_type: SubnetConv
bn_type: NonAffineBatchNorm
freeze_weights: True
prune_rate: -1
init: signed_constant
scale_fan: True

# ===== Hardware setup ===== #
workers: 4
"""

EQUIVALENT_FLAGS = ["--model", "conv4", "--dataset", "cifar10", "--data-dir", "/mnt", "--optimizer", "sgd",
                    "--lr", "0.1", "--schedule", "cosine", "--epochs", "100", "--weight-decay", "0.0001",
                    "--momentum", "0.9", "--batch-size", "128", "--init", "signed_constant", "--scale-fan",
                    "--workers", "4"]


def parsed(argv):
    args = train_mod.parse_args(argv)
    train_mod.validate(args)
    return args


def write(tmp_path, text, name="c.yml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_official_smallscale_config_maps_to_the_equivalent_flags(tmp_path):
    path = write(tmp_path, SMALLSCALE)
    from_yaml = parsed(["--config", path, "--k", "0.3"])
    from_flags = parsed(EQUIVALENT_FLAGS + ["--k", "0.3"])
    assert desc.train_identity(from_yaml) == desc.train_identity(from_flags)
    assert desc.train_name(desc.train_identity(from_yaml)) == desc.train_name(desc.train_identity(from_flags))
    assert (from_yaml.data_dir, from_yaml.workers) == ("/mnt", 4)  # not part of the run's identity
    # flags on the command line override the file, as in hidden-networks
    assert parsed(["--config", path, "--k", "0.3", "--lr", "0.2", "--epochs", "3"]).lr == 0.2


def test_multistep_dense_and_sampled_configs(tmp_path):
    multistep = SMALLSCALE.replace("lr_policy: cosine_lr", "lr_policy: multistep_lr\nmultistep_lr_adjust: 30\n"
                                                            "multistep_lr_gamma: 0.5")
    args = parsed(["--config", write(tmp_path, multistep), "--k", "0.5"])
    assert (args.schedule, args.milestones, args.gamma) == ("multistep", (30, 60, 90), 0.5)
    dense = SMALLSCALE.replace("SubnetConv", "DenseConv").replace("NonAffineBatchNorm", "LearnedBatchNorm") \
        .replace("freeze_weights: True", "freeze_weights: False").replace("init: signed_constant", "init: kaiming_normal")
    args = parsed(["--config", write(tmp_path, dense)])
    flags = [f if f != "signed_constant" else "kaiming_normal" for f in EQUIVALENT_FLAGS] + ["--dense"]
    assert args.dense and desc.train_identity(args) == desc.train_identity(parsed(flags))
    sampled = SMALLSCALE.replace("conv_type: SubnetConv", "conv_type: SampleSubnetConv")
    assert parsed(["--config", write(tmp_path, sampled), "--k", "0.5"]).mask == "sampled"


def test_our_config_values(tmp_path):
    args = parsed(["--config", str(CONFIGS / "resnet50_imagenet.yaml")])
    assert (args.model, args.dataset, args.k, args.lr, args.momentum, args.batch_size, args.label_smoothing,
            args.warmup_epochs, args.weight_decay, args.init, args.scale_fan) == (
        "resnet50", "imagenet", 0.3, 0.256, 0.875, 256, 0.1, 5.0, 0.000030517578125, "signed_constant", False)
    args = parsed(["--config", str(CONFIGS / "fc_fashion_mnist.yaml")])
    assert (args.model, args.width, args.dataset, args.k, args.epochs) == ("fc", 2.5, "fashion-mnist", 0.5, 15)


# Each of our configs, one epoch on synthetic data (the network as configured; ResNet-50 narrower and
# without its 5 warm-up epochs so that one CPU epoch stays short: about 2 minutes on 2 cores, conv4 1).
@pytest.mark.parametrize("name, extra", [
    ("fc_fashion_mnist.yaml", []),
    pytest.param("conv4_cifar10.yaml", [], marks=pytest.mark.slow),
    pytest.param("resnet50_imagenet.yaml", ["--width", "0.125", "--warmup-epochs", "0"], marks=pytest.mark.slow)])
def test_each_example_config_trains_one_epoch_on_synthetic_data(tmp_path, name, extra):
    out = tmp_path / "run"
    argv = ["--config", str(CONFIGS / name), "--dataset", "synthetic", "--epochs", "1", "--no-progress",
            "--no-tensorboard", "--out", str(out), *extra]
    assert run_main("python -m supermask.train", train_mod.main, argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config == desc.train_identity(parsed(argv))
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 1 and results["params_kept"] < results["params_total"]


BAD = [
    ("one_batch: True\nmultigpu: [0, 1]\n", [], "no counterpart in supermask.train for key(s) multigpu, one_batch"),
    ("conv_type: GMPConv\n", ["--k", "0.5"], "conv_type: 'GMPConv' is not supported"),
    ("arch: VGG16\n", ["--k", "0.5"], "arch: 'VGG16' is not supported"),
    ("lr_policy: exp_lr\n", ["--k", "0.5"], "lr_policy: 'exp_lr' is not supported"),
    ("init: standard\n", ["--k", "0.5"], "'standard' is not a valid value for --init"),
    ("mode: fan_out\n", ["--k", "0.5"], "mode: 'fan_out' is not supported"),
    ("bn_type: AffineBatchNorm\n", ["--k", "0.5"], "bn_type: 'AffineBatchNorm' is not supported"),
    ("freeze_weights: False\n", ["--k", "0.5"], "supermask weights are always frozen"),
    ("prune_rate: -1\n", [], "prune_rate -1 (given on the command line in hidden-networks): pass --k"),
    ("epochs: ten\n", [], "'ten' is not a valid value for --epochs"),
    ("nesterov: 1\n", [], "1 is not a valid value for --nesterov"),
    ("arch: [Conv4\n", [], "is not valid YAML (line "),
    ("- arch\n- Conv4\n", [], "must hold key: value pairs, not a list"),
    (None, [], "No such file or directory"),
]


@pytest.mark.parametrize("text, flags, message", BAD)
def test_bad_config_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, text, flags, message):
    path = write(tmp_path, text) if text is not None else str(tmp_path / "missing.yml")
    out = tmp_path / "run"
    code = run_main("python -m supermask.train", train_mod.main,
                    ["--config", path, "--dataset", "synthetic", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()
