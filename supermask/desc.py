"""The run description: what a run computes, its flags' ranges, its checks, its name, its network.

One table of fields (Field) per part of a run, as open_lth's foundations/hparams.py: the network
and data (MODEL_FIELDS), supermask.train's mask and pruning-at-init fields (TRAIN_FIELDS), IMP's
rounds, pruning and controls (IMP_FIELDS), the training hyperparameters shared by every kind of run
(TRAINING_FIELDS), the instability analysis' own values (ANALYSIS_FIELDS, ROUND_FIELD) and where and
how fast a run happens (RUNTIME_FIELDS, never part of a run's identity). The command layer
(supermask.cli) makes the argparse flags from these tables, with their ranges, a list flag (compare's
--ks, --widths, --seeds; instability's --rewind-iters, --data-seeds) from the field of its items, so
a range exists once, here. A run's values are an attribute namespace with one attribute per field
(argparse's, or defaults(...)).

check_training, check_train and check_imp validate a description once (what one flag's type cannot see);
train_identity / imp_identity / instability_identity give the run's identity (config.json) and
train_name / imp_name / instability names the folder name derived from it (as open_lth's
desc.py). IDENTITY_SCHEMA names the rules that keep the names of runs made before a field
existed: a field added since joins an identity only when set (see the identity functions).
training_config gives the TrainConfig of any run's identity; build_model its network.
"""
from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import torch

from . import data as data_mod
from . import pai
from .convert import TOPK_SCOPES, convert
from .errors import UsageError
from .init import INITS, hn_scale_fan_factor, init_dense_
from .layers import MASK_KINDS, supermask_layers
from .mask import SAMPLED_EVAL
from .models import MODELS, build
from .pruning import SCOPES
from .storage import config_hash
from .training import OPTIMIZERS, SCHEDULES, TrainConfig
from .threads import THREADS_HELP

# The identity rules of every run made so far (main at 268b484 and before): train drops unset
# pruning-at-init fields and, for a dense run, the mask fields; IMP keeps IMP_CORE_KEYS always and
# any other field only when set away from its default; instability lists its fields explicitly.
# A change of these rules is a new schema, and must keep reading the runs of the old one.
IDENTITY_SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Field:
    """One value of a run description: its name (the attribute, the config.json key; the flag is
    --name with dashes), its default, its kind (int, float, str, bool for a switch, or tuple for
    a comma-separated list of ints), its range for a number ([low, high], an end open with
    low_open / high_open; None: unbounded), its choices for a string, and the flag's help."""

    name: str
    default: object
    kind: type = str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    help: str = ""

    @property
    def flag(self) -> str:
        """The command-line flag: --name with dashes."""
        return "--" + self.name.replace("_", "-")


def _positive(name, default, help="", kind=float):
    return Field(name, default, kind, 0, low_open=True, help=help)


# A fraction of weights kept (k), a seed and a count: the same range wherever a command takes one.
K_FIELD = Field("k", 0.5, float, 0, 1, low_open=True, help="fraction of weights kept, in (0, 1] (default 0.5)")
SEED_MAX = 2**32 - 1
CPUS = os.cpu_count() or 1
# Threads and data-loading workers are bounded by the machine: 4 per CPU (at least 32, so that a
# config written for a larger machine, e.g. workers: 20, still runs here).
MAX_PARALLEL = max(32, 4 * CPUS)

MODEL_FIELDS = (
    Field("model", "fc", help=f"architecture: {', '.join(MODELS)} (default fc)"),
    _positive("width", 1.0, "multiply every layer's channels/units (default 1)"),
    Field("dataset", "mnist", help=f"{', '.join(data_mod.DATASETS)} (default mnist)"),
    Field("data_dir", "data", help="where datasets are found or downloaded (default ./data)"),
    Field("val_size", 5000, int, 0, help="training examples held out for validation"),
    Field("seed", 0, int, 0, SEED_MAX, help="seeds weights, scores and data order"),
)

TRAIN_FIELDS = (
    K_FIELD,
    Field("init", None, choices=INITS, help="weight init (default signed_constant; kaiming_normal with --dense)"),
    Field("scale_fan", False, bool, help="init with fan_in * k (the 'scaled' variants)"),
    Field("topk", None, choices=TOPK_SCOPES,
          help="top-k per layer or one global threshold (default layer; with "
               "--prune-at-init the method's paper's: global for snip, grasp, synflow)"),
    Field("dense", False, bool, help="train the weights of the same network (no mask)"),
    Field("first_layer_dense", False, bool, help="first layer: ordinary trainable weights"),
    Field("last_layer_dense", False, bool, help="last layer: ordinary trainable weights"),
    Field("mask", "topk", choices=MASK_KINDS,
          help="topk (edge-popup) or sampled: Bernoulli(sigmoid(score)) masks (Zhou et al. 2019)"),
    Field("sampled_eval", "expected", choices=SAMPLED_EVAL,
          help="sampled masks at evaluation: expected mask or thresholded at sigmoid 0.5"),
    Field("score_init_constant", None, float, help="initialise every score to this"),
    Field("random_subnet", False, bool,
          help="no training: evaluate the fixed random subnetwork that keeps k of the weights"),
    Field("hn_compat", False, bool,
          help="compute as hidden-networks' code does (on by default with --config FILE of theirs): its defaults "
               "for the keys a file leaves out, Adam without weight decay, scale_fan as fan_in * (1 - k), dense "
               "first/last layers frozen at their init, n - int((1 - k) * n) weights kept per layer, the lr set "
               "once per epoch (see docs, 'Coming from hidden-networks')"),
    Field("prune_at_init", None, choices=pai.METHODS,
          help="with --dense: mask the weights at initialisation by this method (supermask.pai) at --k, then "
               "train the kept weights with the mask held fixed"),
    Field("pai_check", None, choices=pai.CHECKS,
          help="sanity check of Frankle et al. 2021: shuffle the mask within each layer, or reinit the kept weights"),
)

TRAINING_FIELDS = (
    Field("epochs", 15, int, 1),
    Field("batch_size", 128, int, 1),
    _positive("lr", 0.1),
    Field("optimizer", "sgd", choices=OPTIMIZERS),
    Field("momentum", 0.9, float, 0, 1, high_open=True),
    Field("weight_decay", 1e-4, float, 0),
    Field("schedule", "cosine", choices=SCHEDULES,
          help="per-iteration cosine to 0, multistep (--milestones, --gamma) or constant (none)"),
    Field("milestones", (), tuple, 0, help="multistep: epochs, e.g. 30,60"),
    _positive("gamma", 0.1, "multistep: lr factor at each milestone"),
    Field("warmup_epochs", 0.0, float, 0, help="linear lr warm-up (default 0)"),
    Field("label_smoothing", 0.0, float, 0, 1, high_open=True),
    Field("nesterov", False, bool, help="Nesterov momentum (SGD)"),
    Field("no_bn_decay", False, bool, help="no weight decay on BatchNorm parameters"),
)

RUNTIME_FIELDS = (
    Field("device", "auto", help="auto, cpu or cuda (auto: cuda when available)"),
    Field("threads", 0, int, 0, MAX_PARALLEL, help=f"{THREADS_HELP} (at most {MAX_PARALLEL})"),
    Field("no_progress", False, bool, help="no progress bars, only one line per epoch"),
    Field("no_tensorboard", False, bool,
          help="no TensorBoard event files in the run folder (written when tensorboard is installed)"),
    Field("workers", min(8, CPUS), int, 0, MAX_PARALLEL,
          help="data-loading processes per GPU/process for datasets read from disk (imagenet; default 8, or the "
               "number of CPUs if fewer)"),
)

# IMP controls (Frankle & Carbin's ticket trained against): fresh weights on its masks (Liu et al.),
# or random masks of its per-layer sparsity on its weights.
CONTROLS = ("reinit", "random-mask")

IMP_FIELDS = (
    Field("init", "kaiming_normal", choices=INITS, help="weight init (default kaiming_normal)"),
    # round folders are round_00 ... round_99
    Field("rounds", 5, int, 0, 99, help="pruning rounds after the dense round 0 (default 5)"),
    Field("prune_rate", 0.2, float, 0, 1, low_open=True, high_open=True,
          help="fraction of the surviving weights pruned per round (default 0.2)"),
    Field("output_prune_rate", None, float, 0, 1, high_open=True,
          help="the same for the output layer (default: half of --prune-rate)"),
    Field("scope", "layer", choices=SCOPES,
          help="prune each layer by the rate, or all but the output layer under one threshold"),
    Field("rewind_iter", 0, int, 0,
          help="reset survivors to their values after this many iterations of round 0 and train from "
               "there to the end (default 0: init)"),
    Field("control", None, choices=CONTROLS,
          help="train the ticket's masks with fresh weights (reinit) or random masks of the same "
               "per-layer sparsity (random-mask)"),
    Field("val_every", 100, int, 0,
          help="evaluate the validation loss every this many iterations, for the early-stop "
               "iteration (default 100; 0: once per epoch)"),
)


# An IMP round's number (its folder round_00 ... round_99): stored in IMP's results, asked for by
# instability's --round.
ROUND_FIELD = Field("round", 0, int, 0, 99, help="with --ticket: the IMP round whose mask is analysed")

# The instability analysis' own values, as its flags take them (--rewind-iters and --data-seeds:
# lists of these) and its stored pieces record them.
ANALYSIS_FIELDS = (
    Field("rewind_iteration", 0, int, 0, help="rewind iteration k: the copies train from iteration k to the end"),
    Field("data_seed", 0, int, 0, SEED_MAX, help="a copy's data order"),
    Field("points", 30, int, 2, help="points on the linear path, end points included (default 30)"),
)


def pick(table, *names) -> list[Field]:
    """The fields of table with these names, in the order given (KeyError for an unknown name)."""
    by_name = {f.name: f for f in table}
    return [by_name[n] for n in names]


TRAINING_KEYS = tuple(f.name for f in TRAINING_FIELDS)
# Flags of supermask.train that say where and how fast a run happens, or what to do with it, not
# what it computes: not part of its identity.
NOT_CONFIG = ("out", "resume", "backend", "data_dir", "evaluate", "config", *(f.name for f in RUNTIME_FIELDS))


def defaults(*tables, **values) -> SimpleNamespace:
    """A description with every field of tables at its default, then values: what the flags of a
    command give when none is passed (compare builds its runs' descriptions so)."""
    ns = SimpleNamespace(**{f.name: f.default for table in tables for f in table})
    for key, value in values.items():
        setattr(ns, key, value)
    return ns


# ---------------------------------------------------------------------------------------------
# Checks: once, for what the flags' own types cannot see (a value against another).

def check_training(v) -> None:
    """The checks of every run that builds and trains a network (train, imp, instability): a known
    model and dataset, Nesterov with momentum, multistep with milestones, a warm-up within the run.
    Raises UsageError."""
    if v.model not in MODELS:
        raise UsageError(f"unknown model {v.model!r}; choose from {', '.join(MODELS)}")
    if v.dataset not in data_mod.DATASETS:
        raise UsageError(f"unknown dataset {v.dataset!r}; choose from {', '.join(data_mod.DATASETS)}")
    if v.nesterov and v.optimizer == "sgd" and v.momentum == 0:
        raise UsageError("--nesterov needs a momentum > 0 (--momentum)")
    if v.schedule == "multistep" and not v.milestones:
        raise UsageError("--schedule multistep needs --milestones, e.g. --milestones 30,60")
    if v.warmup_epochs > v.epochs:
        raise UsageError(f"--warmup-epochs must be in [0, --epochs], got {v.warmup_epochs}")


def check_in_memory(v, message: str) -> None:
    """UsageError(message, its {dataset} filled in) unless v.dataset is held in memory (not read
    from disk while training)."""
    if v.dataset in data_mod.STREAMED:
        raise UsageError(message.format(dataset=v.dataset))


def check_imp(v) -> None:
    """check_training, then IMP's own checks; fills in --output-prune-rate's default (half of
    --prune-rate). Raises UsageError."""
    check_training(v)
    if v.output_prune_rate is None:
        v.output_prune_rate = v.prune_rate / 2
    check_in_memory(v, "IMP needs an in-memory dataset; {dataset} is read from disk (use supermask.train)")
    if getattr(v, "ticket", None) is not None and v.control is None:
        raise UsageError("--ticket only makes sense with --control")


def check_train(v) -> None:
    """check_training, then supermask.train's own checks; fills in the defaults that depend on
    other fields (init: kaiming_normal for a dense run, else signed_constant; topk: see
    pai.validate_args). Raises UsageError."""
    check_training(v)
    if v.init is None:
        v.init = "kaiming_normal" if v.dense else "signed_constant"
    if v.dense and (v.random_subnet or v.mask != "topk"):
        raise UsageError("--dense trains weights: it does not combine with --random-subnet or --mask")
    if v.random_subnet:
        check_in_memory(v, "--random-subnet needs an in-memory dataset, not {dataset}")
    pai.validate_args(v)  # --prune-at-init / --pai-check, and --topk's default
    if getattr(v, "hn_compat", False):
        _check_hn_compat(v)


def _check_hn_compat(v) -> None:
    """hidden-networks' semantics where they are values: its Adam takes no weight decay whatever
    --weight-decay says (main.py get_optimizer); its scale_fan, fan * (1 - k), is 0 at k = 1."""
    if v.optimizer == "adam":
        v.weight_decay = 0.0
    if v.scale_fan and not v.dense and v.k >= 1:
        raise UsageError("--hn-compat --scale-fan needs --k < 1 (hidden-networks' fan_in * (1 - k) is 0 at k = 1)")


def available_memory(device: torch.device) -> int | None:
    """Bytes of memory a run on device can still allocate (CUDA: free on the GPU; CPU: the kernel's
    MemAvailable, /proc/meminfo), or None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits_memory(v, input_shape, num_classes: int, device: torch.device, copies: int = 4) -> None:
    """UsageError (one line) when the network v describes (its model and width) cannot be held in
    memory for training: its parameter bytes, counted on the meta device (nothing allocated), times
    copies (weights, scores or gradients, momentum, another), over the memory available. For
    checking before anything is written."""
    with torch.device("meta"):
        model = build(v.model, input_shape, num_classes, v.width)
    need = copies * sum(p.numel() * p.element_size() for p in model.parameters())
    have = available_memory(device)
    if have is not None and need > have:
        n = sum(p.numel() for p in model.parameters())
        raise UsageError(f"--width {v.width:g}: {v.model} has {n:,} parameters, about {need / 2**30:.1f} GiB to train "
                         f"on {device.type} (weights, scores, gradients, momentum), more than the "
                         f"{have / 2**30:.1f} GiB available")


# ---------------------------------------------------------------------------------------------
# Stored values: a config.json read back goes through the ranges of the flags it stands for.

# Keys of stored identities checked on reading (rounds and rewind_iter with IMP_FIELDS' ranges).
STORED_FIELDS = (*pick(IMP_FIELDS, "rounds", "rewind_iter"), ROUND_FIELD, *ANALYSIS_FIELDS,
                 Field("start_iteration", 0, int, 0))
_STORED = {f.name: f for f in (*MODEL_FIELDS, *TRAIN_FIELDS, *TRAINING_FIELDS, *STORED_FIELDS)}
_NAMES = {"model": MODELS, "dataset": data_mod.DATASETS}


def value_problem(f: Field, value) -> str | None:
    """Why value (read from a file) is not what f's flag accepts, or None: the JSON type of f's
    kind (an int for an int, never a string or a bool for a number), finite and in f's range, one
    of f's choices."""
    if value is None and (f.default is None or f.kind is tuple or f.name == "seed"):  # seed None: unseeded
        return None
    if f.kind is bool:
        return None if type(value) is bool else "not true or false"
    if f.kind is str:
        choices = f.choices or _NAMES.get(f.name)
        if not isinstance(value, str):
            return "not a name"
        return None if choices is None or value in choices else f"not one of {', '.join(map(str, choices))}"
    values = value if f.kind is tuple and isinstance(value, list) else [value]
    whole = f.kind in (int, tuple)
    for v in values:
        if type(v) not in ((int,) if whole else (int, float)) or v != v or v in (float("inf"), float("-inf")):
            return f"not {'an integer' if whole else 'a finite number'}"
        if (f.low is not None and (v <= f.low if f.low_open else v < f.low)) or \
                (f.high is not None and (v >= f.high if f.high_open else v > f.high)):
            return f"out of range ({f.flag}'s)"
    return None


def config_problem(config: dict) -> str | None:
    """Why a stored identity (a config.json, a compact file's config) holds a value its flag would
    refuse, or None: the first such key and value, e.g. "'rounds' = '5': not an integer"."""
    analysis = str(config.get("command", "")).startswith("instability")
    for key, value in config.items():
        f = _STORED.get(key) if not (analysis and key == "mask") else None  # there: the ticket mask's hash
        why = value_problem(f, value) if f is not None else None
        if why:
            return f"{key!r} = {str(value)[:40]!r}: {why}"
    return None


# ---------------------------------------------------------------------------------------------
# Identities and names (IDENTITY_SCHEMA 1).

def train_identity(v) -> dict:
    """A train run's identity (its config.json): every field that changes what is computed (JSON
    types). Unset pruning-at-init fields and, for a dense run, the mask fields are left out, as
    they were before those fields existed, so older runs keep their names."""
    config = {k: val for k, val in vars(v).items() if k not in NOT_CONFIG}
    for key in ("prune_at_init", "pai_check"):
        if config.get(key) is None:
            config.pop(key, None)
    if not config.get("hn_compat"):  # added since: in the identity only when on
        config.pop("hn_compat", None)
    if config["dense"]:  # mask fields mean nothing for a dense run
        for key in () if config.get("prune_at_init") else ("k", "topk"):
            config.pop(key, None)
        for key in ("scale_fan", "mask", "sampled_eval", "score_init_constant", "random_subnet",
                    "first_layer_dense", "last_layer_dense"):
            config.pop(key, None)
    config["milestones"] = list(config["milestones"])
    return {"command": "train", **config}


def train_name(config: dict) -> str:
    """A train run's folder name: network, width, dataset, kind (k, dense, sampled, a
    pruning-at-init method, random), seed and the hash of its identity."""
    kind = "dense" if config["dense"] else "sampled" if config.get("mask") == "sampled" else f"k{config['k']:g}"
    if config.get("prune_at_init"):
        check = f"-{config['pai_check']}" if config.get("pai_check") else ""
        kind = f"{config['prune_at_init']}{config['k']:g}{check}"
    if config.get("random_subnet"):
        kind = f"random{config['k']:g}"
    return f"{_network(config)}_{kind}_s{config['seed']}_{config_hash(config)}"


def _network(config: dict) -> str:
    return f"{config['model']}_w{config['width']:g}_{config['dataset']}"


# The identity of the first IMP runs. A field added since (e.g. --warmup-epochs) joins an IMP
# run's identity only when it is set away from its default, so existing runs keep their names.
IMP_CORE_KEYS = ("batch_size", "control", "dataset", "epochs", "init", "lr", "model", "momentum", "optimizer",
                 "output_prune_rate", "prune_rate", "rewind_iter", "schedule", "scope", "seed", "val_every",
                 "val_size", "weight_decay", "width")
# Not part of an IMP run's identity: where it lives, how fast it runs, and how many rounds were
# asked for (a run with more rounds extends the one with fewer).
IMP_NOT_IDENTITY = (*NOT_CONFIG, "ticket", "rounds")


def imp_identity(v) -> dict:
    """An IMP run's identity: IMP_CORE_KEYS, and every other field that changes what is computed
    when it is set away from its default (JSON types)."""
    default = {f.name: f.default for f in (*MODEL_FIELDS, *TRAINING_FIELDS)}
    config = {}
    for k, val in vars(v).items():
        if k in IMP_NOT_IDENTITY or (k not in IMP_CORE_KEYS and k in default and val == default[k]):
            continue
        config[k] = list(val) if isinstance(val, tuple) else val
    return {"command": "imp", **config}


def imp_name(config: dict) -> str:
    """An IMP run's folder name: imp_, network, control, seed and the hash of its identity."""
    ident = {k: v for k, v in config.items() if k != "rounds"}
    control = f"_{config['control']}" if config.get("control") else ""
    return f"imp_{_network(config)}{control}_s{config['seed']}_{config_hash(ident)}"


def ticket_identity(config: dict) -> dict:
    """The identity of the ticket run that an IMP control's masks come from."""
    return {**config, "control": None}


def instability_identity(v) -> dict:
    """The network and its training in an instability analysis: what every stored piece of it
    shares (JSON types). v.edge_popup: a supermask's (k, scale_fan, topk join)."""
    config = {"model": v.model, "width": v.width, "dataset": v.dataset, "val_size": v.val_size,
              "seed": v.seed, "init": v.init, "dense": not v.edge_popup}
    if v.edge_popup:
        config.update(k=v.k, scale_fan=v.scale_fan, topk=v.topk)
    for key in TRAINING_KEYS:
        val = getattr(v, key)
        config[key] = list(val) if isinstance(val, tuple) else val
    return config


def _instability_network(config: dict) -> str:
    kind = f"ep{config['k']:g}" if not config["dense"] else "dense"
    return f"{_network(config)}_{kind}_s{config['seed']}"


def instability_name(oconfig: dict, config: dict) -> str:
    """An instability analysis' folder name: its mode, network and the hash of oconfig (its
    config.json)."""
    return f"instability_{oconfig['mode']}_{_instability_network(config)}_{config_hash(oconfig)}"


def rewind_states_name(pconfig: dict, config: dict) -> str:
    """The folder name of an analysis' rewind states (pconfig: their config.json)."""
    return f"instability_rewind_{_instability_network(config)}_{config_hash(pconfig)}"


def copy_name(cconfig: dict, config: dict) -> str:
    """The folder name of a trained copy (cconfig: its config.json, with rewind_iteration,
    data_seed and the mask's content hash)."""
    kind = "" if cconfig["mask"] is None else f"_m{cconfig['mask']}"
    return (f"instability_copy_{_instability_network(config)}{kind}_k{cconfig['rewind_iteration']}_"
            f"d{cconfig['data_seed']}_{config_hash(cconfig)}")


# ---------------------------------------------------------------------------------------------
# What a description yields: the training configuration and the network.

@torch.no_grad()
def _hn_compat_weights(model: torch.nn.Module, config: dict, skip) -> None:
    """hidden-networks' layers (--hn-compat): each keeps its count n - int((1 - k) * n)
    (mask.num_kept_hn); with scale_fan, the weights drawn with its fan_in * (1 - k)
    (init.hn_scale_fan_factor); the dense first/last layers (skip) frozen at their init, as its
    freeze_model_weights freezes every weight. Ties are still broken toward the lower index (theirs:
    the higher), which only matters for equal |score| (e.g. --score-init-constant)."""
    for _, layer in supermask_layers(model):
        layer.kept_count = "hn"
    if config.get("scale_fan"):
        factor = hn_scale_fan_factor(config["init"], config["k"])
        for _, layer in supermask_layers(model):
            layer.weight.mul_(factor)
    for name in skip:
        model.get_submodule(name).weight.requires_grad_(False)


def training_config(config: dict, **override) -> TrainConfig:
    """The TrainConfig of a run's identity (any kind): every TrainConfig field the identity sets,
    the others at their defaults (what an absent optional field means), then override."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    return TrainConfig(**{**kwargs, **override})


def build_model(config: dict, input_shape, num_classes: int) -> torch.nn.Module:
    """The network a run's identity describes, freshly initialised from its seed: config's model
    at its width for input_shape (C, H, W) and num_classes, weights by its init; unless dense, a
    supermask network (convert) with its k, topk, mask kind and layer options."""
    model = build(config["model"], input_shape, num_classes, config["width"])
    init_dense_(model, config["init"], config["seed"])
    if config["dense"]:
        return model
    prunable = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    skip = ((prunable[0],) if config.get("first_layer_dense") else ()) + \
           ((prunable[-1],) if config.get("last_layer_dense") else ())
    model = convert(model, config["k"], config["init"], config["scale_fan"], config["seed"], config["topk"],
                    inplace=True, skip=skip, mask=config.get("mask", "topk"))
    if config.get("hn_compat"):
        _hn_compat_weights(model, config, skip)
    for _, layer in supermask_layers(model):
        layer.sampled_eval = config.get("sampled_eval", "expected")
        if config.get("score_init_constant") is not None:
            layer.scores.data.fill_(config["score_init_constant"])
        if config.get("random_subnet"):
            layer.scores.requires_grad_(False)
    return model
