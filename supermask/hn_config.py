"""Reading the official edge-popup code's YAML configuration files (allenai/hidden-networks).

``python -m supermask.train --config FILE.yaml [flags]`` takes its defaults from the file, as the
official ``main.py --config`` does, and flags given on the command line override them (their
``prune_rate: -1`` means "give --prune-rate on the command line": here ``--k``). The files'
keys are hidden-networks' argparse names (``arch``, ``set``, ``prune_rate``, ``lr_policy``...); the
map below is the README's "Coming from hidden-networks" table, applied by code. Our own example
configs (configs/*.yaml) use the same keys.

A key with no counterpart here (``one_batch``, ``multigpu``...), or a value this tool does not
implement (``conv_type: GMPConv``, ``init: standard``), is a UsageError naming it: a config is
never silently run as something else. Keys that only say where or how a run is logged or named
(``name``, ``log_dir``, ``print_freq``, ``save_every``) are read and ignored: runs are named from
their hyperparameters here (see supermask.runs).
"""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .storage import load_yaml_bounded

ARCHS = {"FC": "fc", "Conv2": "conv2", "Conv4": "conv4", "Conv6": "conv6", "Conv8": "conv8",
         "ResNet18": "resnet18", "ResNet50": "resnet50", "WideResNet50_2": "wide_resnet50_2"}
SETS = {"MNIST": "mnist", "FashionMNIST": "fashion-mnist", "CIFAR10": "cifar10", "CIFAR100": "cifar100",
        "ImageNet": "imagenet"}
LR_POLICIES = {"cosine_lr": "cosine", "multistep_lr": "multistep", "constant_lr": "none"}
CONV_TYPES = {"SubnetConv": {"dense": False, "mask": "topk"}, "SampleSubnetConv": {"dense": False, "mask": "sampled"},
              "DenseConv": {"dense": True}}
# Keys whose value is ours unchanged (hidden-networks name -> our dest)
SAME = {"optimizer": "optimizer", "lr": "lr", "epochs": "epochs", "weight_decay": "weight_decay",
        "momentum": "momentum", "batch_size": "batch_size", "init": "init", "scale_fan": "scale_fan",
        "label_smoothing": "label_smoothing", "nesterov": "nesterov", "no_bn_decay": "no_bn_decay",
        "first_layer_dense": "first_layer_dense", "last_layer_dense": "last_layer_dense",
        "score_init_constant": "score_init_constant", "random_subnet": "random_subnet", "seed": "seed",
        "width_mult": "width", "warmup_length": "warmup_epochs", "data": "data_dir", "workers": "workers"}
IGNORED = ("name", "log_dir", "print_freq", "save_every")
# Keys that only restate what this tool always does, with the one value it supports.
FIXED = {"mode": "fan_in", "nonlinearity": "relu", "trainer": "default"}


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; UsageError (one line) when it is missing or is not one."""
    import yaml  # noqa: PLC0415

    path = Path(path)
    try:
        loaded = load_yaml_bounded(path)  # bounded size, no aliases (issue #24)
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"--config {path} is not valid YAML{line}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path} must hold key: value pairs, not a {type(loaded).__name__}")
    return loaded


def to_flags(config: dict, source: str = "--config") -> dict:
    """Our parser's defaults (dest -> value) for a hidden-networks config dict.

    prune_rate -1 (the official "set it on the command line") maps to k=None: the caller requires
    --k. Raises UsageError naming every key with no counterpart, or the first unsupported value."""
    unknown = sorted(k for k in config if k not in SAME and k not in FIXED and k not in IGNORED and k not in (
        "arch", "set", "lr_policy", "multistep_lr_adjust", "multistep_lr_gamma", "conv_type", "bn_type",
        "freeze_weights", "prune_rate", "k", "model", "dataset", "width"))
    if unknown:
        raise UsageError(f"{source}: no counterpart in supermask.train for key(s) {', '.join(unknown)} "
                         "(see the README's 'Coming from hidden-networks')")

    def bad(key, allowed):
        return UsageError(f"{source}: {key}: {config[key]!r} is not supported here (supported: {allowed})")

    out = {}
    for key, dest in SAME.items():
        if key in config and config[key] is not None:
            out[dest] = config[key]
    for key, only in FIXED.items():
        if key in config and config[key] != only:
            raise bad(key, only)
    if "arch" in config:
        if config["arch"] not in ARCHS:
            raise bad("arch", ", ".join(ARCHS))
        out["model"] = ARCHS[config["arch"]]
    if "set" in config:
        if config["set"] not in SETS:
            raise bad("set", ", ".join(SETS))
        out["dataset"] = SETS[config["set"]]
    for ours in ("model", "dataset", "width", "k"):  # our own names, for configs written for this tool
        if ours in config:
            out[ours] = config[ours]
    if "lr_policy" in config:
        if config["lr_policy"] not in LR_POLICIES:
            raise bad("lr_policy", ", ".join(LR_POLICIES))
        out["schedule"] = LR_POLICIES[config["lr_policy"]]
    if out.get("schedule") == "multistep":
        # theirs: lr * gamma ** (epoch // adjust), adjust 30 and gamma 0.1 unless set
        adjust = int(config.get("multistep_lr_adjust", 30))
        epochs = int(out.get("epochs", 90))
        if adjust < 1:
            raise bad("multistep_lr_adjust", "an integer >= 1")
        out["milestones"] = tuple(range(adjust, epochs, adjust)) or (adjust,)
        out["gamma"] = float(config.get("multistep_lr_gamma", 0.1))
    elif "multistep_lr_adjust" in config or "multistep_lr_gamma" in config:
        pass  # read by their multistep policy only, as there
    if "conv_type" in config:
        if config["conv_type"] not in CONV_TYPES:
            raise bad("conv_type", ", ".join(CONV_TYPES))
        out.update(CONV_TYPES[config["conv_type"]])
    dense = out.get("dense", False)
    if "bn_type" in config:
        # supermask networks use the non-affine BatchNorm, dense ones the ordinary (learned) one
        expected = "LearnedBatchNorm" if dense else "NonAffineBatchNorm"
        if config["bn_type"] != expected:
            raise bad("bn_type", f"{expected} with conv_type {config.get('conv_type', 'SubnetConv')}")
    if "freeze_weights" in config and bool(config["freeze_weights"]) == dense:
        raise UsageError(f"{source}: freeze_weights {config['freeze_weights']} with conv_type "
                         f"{config.get('conv_type', 'SubnetConv')}: supermask weights are always frozen, dense "
                         "ones always trained")
    if "prune_rate" in config and not dense:  # a dense network has no k
        rate = config["prune_rate"]
        out["k"] = None if rate is None or rate == -1 else rate  # -1, theirs: "Override" on the command line
    return out
