"""Reading the official edge-popup code's YAML configuration files (allenai/hidden-networks).

``python -m supermask.train --config FILE.yaml [flags]`` takes its defaults from the file, as the
official ``main.py --config`` does, and flags given on the command line override them (their
``prune_rate: -1`` means "give --prune-rate on the command line": here ``--k``). The files'
keys are hidden-networks' argparse names (``arch``, ``set``, ``prune_rate``, ``lr_policy``...); the
map below is the table of docs/hidden-networks.md ("Coming from hidden-networks"), applied by code. Our own example
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
         "Conv4Wide": "conv4wide", "Conv6Wide": "conv6wide", "ResNet18": "resnet18", "cResNet18": "cresnet18",
         "ResNet50": "resnet50", "ResNet101": "resnet101", "WideResNet50_2": "wide_resnet50_2",
         "WideResNet101_2": "wide_resnet101_2"}
# Our models without BatchNorm: there bn_type names a layer the network never builds.
NO_BATCHNORM = ("fc", "conv2", "conv4", "conv6", "conv8", "conv4wide", "conv6wide")
BN_TYPES = ("NonAffineBatchNorm", "LearnedBatchNorm")
# Where their loaders look under their data root (data/imagenet.py, data/cifar.py; both read the
# folder as torchvision's ImageFolder / CIFAR10 do, as ours do).
DATA_SUBDIRS = {"ImageNet": "imagenet", "CIFAR10": "cifar10"}
# The only architectures their width_mult scales (models/frankle.py); the others ignore it there.
WIDTH_MULT_ARCHS = ("conv4wide", "conv6wide")
SETS = {"MNIST": "mnist", "FashionMNIST": "fashion-mnist", "CIFAR10": "cifar10", "CIFAR100": "cifar100",
        "ImageNet": "imagenet"}
LR_POLICIES = {"cosine_lr": "cosine", "multistep_lr": "multistep", "constant_lr": "none"}
# RGConv and DNWConv are named by some of their files but defined nowhere in their code: refused.
CONV_TYPES = {"SubnetConv": {"dense": False, "mask": "topk"}, "SampleSubnetConv": {"dense": False, "mask": "sampled"},
              "DenseConv": {"dense": True}}
# Keys whose value is ours unchanged (hidden-networks name -> our dest)
SAME = {"optimizer": "optimizer", "lr": "lr", "epochs": "epochs", "weight_decay": "weight_decay",
        "momentum": "momentum", "batch_size": "batch_size", "init": "init", "scale_fan": "scale_fan",
        "label_smoothing": "label_smoothing", "nesterov": "nesterov", "no_bn_decay": "no_bn_decay",
        "first_layer_dense": "first_layer_dense", "last_layer_dense": "last_layer_dense",
        "score_init_constant": "score_init_constant", "random_subnet": "random_subnet", "seed": "seed",
        "width_mult": "width", "warmup_length": "warmup_epochs", "data": "data_dir", "workers": "workers"}
# Read and ignored: where a run is logged or named (runs are named from their hyperparameters
# here, supermask.runs), and baseline, which two of their files set (cs, ss) but their code reads
# nowhere: those files ran as plain edge-popup there, and run so here.
IGNORED = ("name", "log_dir", "print_freq", "save_every", "baseline")
# Keys that only restate what this tool always does, with the one value it supports.
FIXED = {"mode": "fan_in", "nonlinearity": "relu", "trainer": "default"}
# Keys whose value is a name (a string), checked before any is looked up.
NAMES = ("arch", "set", "lr_policy", "conv_type", "bn_type", "optimizer", "init", "data", "model", "dataset",
         *IGNORED, *FIXED)
OTHER_KEYS = ("hn_compat", "arch", "set", "lr_policy", "multistep_lr_adjust", "multistep_lr_gamma", "conv_type",
              "bn_type", "freeze_weights", "prune_rate", "k", "model", "dataset", "width")
# hidden-networks' args.py defaults (as our dests) of the keys that change what a run computes: what
# a key its file leaves out means there. Used in the hidden-networks-compatible mode (hn_compat),
# where a file of theirs means what it meant there. Their seed (None: a random one) stays our 0,
# their data root and workers stay ours (they change no number); their prune_rate 0.0 would keep
# nothing, so a file without prune_rate needs --k. They have no validation split: val_size 0.
HN_DEFAULTS = {"model": "resnet18", "dataset": "imagenet", "epochs": 90, "batch_size": 256, "lr": 0.1,
               "momentum": 0.9, "weight_decay": 1e-4, "schedule": "none", "warmup_epochs": 0.0,
               "init": "kaiming_normal", "scale_fan": False, "label_smoothing": 0.0, "nesterov": False,
               "no_bn_decay": False, "width": 1.0, "val_size": 0}


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


def to_flags(config: dict, source: str = "--config", hn_compat: bool = False) -> dict:
    """Our parser's defaults (dest -> value) for a hidden-networks config dict. A file is theirs,
    and read in the hidden-networks-compatible mode, unless it says ``hn_compat: false`` (ours in
    configs/ do) or hn_compat (--hn-compat) asks for that mode anyway: then the keys it leaves out
    take hidden-networks' defaults (HN_DEFAULTS) and hn_compat is True.

    prune_rate -1 (the official "set it on the command line") maps to k=None: the caller requires
    --k. Raises UsageError (one line) naming every key with no counterpart, a key that is not a
    name, a list or mapping where a value goes, or the first unsupported value."""
    _check_shape(config, source)
    hn_compat = hn_compat or config.get("hn_compat", True)
    out = {dest: config[key] for key, dest in SAME.items() if config.get(key) is not None}
    for key, only in FIXED.items():
        if key in config and config[key] != only:
            raise _bad(config, source, key, only)
    out.update(_names(config, source))
    for ours in ("model", "dataset", "width", "k"):  # our own names, for configs written for this tool
        if ours in config:
            out[ours] = config[ours]
    if hn_compat:
        out = {**HN_DEFAULTS, **out, "hn_compat": True}
        if "width" not in config and out.get("model") not in WIDTH_MULT_ARCHS:
            width = config.get("width_mult", 1.0)
            if isinstance(width, bool) or not isinstance(width, int | float) or not 0 < width < float("inf"):
                raise _bad(config, source, "width_mult", "a number > 0")  # checked even where it is not used
            out["width"] = 1.0  # their width_mult scales Conv4Wide / Conv6Wide only
        if isinstance(config.get("data"), str) and config.get("set") in DATA_SUBDIRS:
            out["data_dir"] = str(Path(config["data"]) / DATA_SUBDIRS[config["set"]])
    elif "hn_compat" in config:
        out["hn_compat"] = False
    if out.get("schedule") == "multistep":
        out.update(_multistep(config, source, out.get("epochs", 90)))
    # else multistep_lr_adjust / multistep_lr_gamma are read by their multistep policy only, as there
    _check_bn_and_freezing(config, source, out)
    if "prune_rate" in config and not out.get("dense", False):  # a dense network has no k
        rate = config["prune_rate"]
        out["k"] = None if rate is None or rate == -1 else rate  # -1, theirs: "Override" on the command line
    elif hn_compat and not out.get("dense", False) and "k" not in out:
        out["k"] = None  # their default prune_rate 0.0 keeps nothing: --k is needed
    return out


def _bad(config: dict, source: str, key: str, allowed) -> UsageError:
    return UsageError(f"{source}: {key}: {config[key]!r} is not supported here (supported: {allowed})")


def _check_shape(config: dict, source: str) -> None:
    """Every key a known name, every value a scalar (no list or mapping), names strings."""
    odd = [k for k in config if not isinstance(k, str)]
    if odd:
        raise UsageError(f"{source}: keys must be names, not {', '.join(repr(k) for k in odd)}")
    unknown = sorted(k for k in config if k not in SAME and k not in FIXED and k not in IGNORED and k not in OTHER_KEYS)
    if unknown:
        raise UsageError(f"{source}: no counterpart in supermask.train for key(s) {', '.join(unknown)} "
                         "(see docs/hidden-networks.md)")
    for key, value in config.items():
        if isinstance(value, list | dict | set | tuple):
            raise UsageError(f"{source}: {key}: a {type(value).__name__} where one value goes: {value!r}")
        if key in NAMES and value is not None and not isinstance(value, str):
            raise UsageError(f"{source}: {key}: {value!r} is not a name")
    for key in ("freeze_weights", "hn_compat"):
        if key in config and not isinstance(config[key], bool):
            raise _bad(config, source, key, "True or False")


def _names(config: dict, source: str) -> dict:
    """Our model, dataset, schedule and layer kind for their arch, set, lr_policy and conv_type."""
    out = {}
    for key, table, dest in (("arch", ARCHS, "model"), ("set", SETS, "dataset"),
                             ("lr_policy", LR_POLICIES, "schedule")):
        if key in config:
            if config[key] not in table:
                raise _bad(config, source, key, ", ".join(table))
            out[dest] = table[config[key]]
    if "conv_type" in config:
        if config["conv_type"] not in CONV_TYPES:
            raise _bad(config, source, "conv_type", ", ".join(CONV_TYPES))
        out.update(CONV_TYPES[config["conv_type"]])
    return out


def _integer(value) -> int | None:
    """value as an int when it is a whole number (not a bool, not inf or nan), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value in (
            float("inf"), float("-inf")) or int(value) != value:
        return None
    return int(value)


def _multistep(config: dict, source: str, epochs) -> dict:
    """theirs: lr * gamma ** (epoch // adjust), adjust 30 and gamma 0.1 unless set."""
    adjust, epochs = _integer(config.get("multistep_lr_adjust", 30)), _integer(epochs)
    if adjust is None or adjust < 1:
        raise _bad(config, source, "multistep_lr_adjust", "an integer >= 1")
    if epochs is None or epochs < 1:
        raise _bad(config, source, "epochs", "an integer >= 1")
    gamma = config.get("multistep_lr_gamma", 0.1)
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma < float("inf"):
        raise _bad(config, source, "multistep_lr_gamma", "a number > 0")
    return {"milestones": tuple(range(adjust, epochs, adjust)) or (adjust,), "gamma": float(gamma)}


def _check_bn_and_freezing(config: dict, source: str, out: dict) -> None:
    """bn_type: the non-affine BatchNorm for a supermask network, the ordinary (learned) one for a
    dense network; on a network without BatchNorm either is accepted and has no effect (there is
    no BatchNorm layer for it to make, as in hidden-networks). freeze_weights: what the layer kind
    implies (supermask weights are always frozen, dense ones always trained)."""
    dense = out.get("dense", False)
    if "bn_type" in config:
        if out.get("model") in NO_BATCHNORM:
            if config["bn_type"] not in BN_TYPES:
                raise _bad(config, source, "bn_type", ", ".join(BN_TYPES))
        elif config["bn_type"] != ("LearnedBatchNorm" if dense else "NonAffineBatchNorm"):
            expected = "LearnedBatchNorm" if dense else "NonAffineBatchNorm"
            raise _bad(config, source, "bn_type", f"{expected} with conv_type {config.get('conv_type', 'SubnetConv')}")
    if "freeze_weights" in config and config["freeze_weights"] == dense:
        raise UsageError(f"{source}: freeze_weights {config['freeze_weights']} with conv_type "
                         f"{config.get('conv_type', 'SubnetConv')}: supermask weights are always frozen, dense "
                         "ones always trained")
