"""Train a supermask (edge-popup) or, with --dense, the same network's weights.

    python -m supermask.train --width 2.5 --k 0.5            # MNIST, LeNet-300-100 x 2.5, keep 50%
    python -m supermask.train --dataset fashion-mnist --dense # the dense baseline

Every run lives in its own folder (--out, default runs/<name from the hyperparameters>) holding
config.json, metrics.jsonl, checkpoint.pt and results.json. See README.md for all flags.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

from . import data as data_mod
from . import distributed
from . import pai
from .cli import Parser, number, resolve_backend, resolve_device, run_main
from .convert import TOPK_SCOPES, convert, set_backend
from .layers import MASK_KINDS, supermask_layers
from .mask import SAMPLED_EVAL
from .init import INITS, init_dense_
from .models import MODELS, build
from .errors import UsageError
from .storage import (config_hash, exclusive, load_checkpoint, prepare_run_dir, read_json_object, read_run_config,
                      remove_temp_files)
from .training import (OPTIMIZERS, RESUME_KEYS, SCHEDULES, TrainConfig, evaluate, evaluate_streamed,
                       evaluate_untrained, train)

# Flags that say where and how fast a run happens, not what it computes: not part of its identity.
NOT_CONFIG = ("out", "resume", "device", "backend", "data_dir", "threads", "no_progress", "evaluate", "workers",
              "no_tensorboard", "config")


# Numeric flags are checked where they are parsed (cli.number: finite, in range, integer where
# integer), so a bad value is a one-line error before anything is read or written.
POSITIVE = number(float, 0, low_open=True)
NONNEGATIVE = number(float, 0)
COUNT = number(int, 0)
SEED = number(int, 0, 2**32 - 1)


def add_model_args(p):
    p.add_argument("--model", default="fc", help=f"architecture: {', '.join(MODELS)} (default fc)")
    p.add_argument("--width", type=POSITIVE, default=1.0, help="multiply every layer's channels/units (default 1)")
    p.add_argument("--dataset", default="mnist", help=f"{', '.join(data_mod.DATASETS)} (default mnist)")
    p.add_argument("--data-dir", default="data", help="where datasets are found or downloaded (default ./data)")
    p.add_argument("--val-size", type=COUNT, default=5000, help="training examples held out for validation")
    p.add_argument("--seed", type=SEED, default=0, help="seeds weights, scores and data order")


def add_training_args(p):
    p.add_argument("--epochs", type=number(int, 1), default=15)
    p.add_argument("--batch-size", type=number(int, 1), default=128)
    p.add_argument("--lr", type=POSITIVE, default=0.1)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--momentum", type=number(float, 0, 1, high_open=True), default=0.9)
    p.add_argument("--weight-decay", type=NONNEGATIVE, default=1e-4)
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="per-iteration cosine to 0, multistep (--milestones, --gamma) or constant (none)")
    p.add_argument("--milestones", type=number(int, 0, list_of=True), default=(), help="multistep: epochs, e.g. 30,60")
    p.add_argument("--gamma", type=POSITIVE, default=0.1, help="multistep: lr factor at each milestone")
    p.add_argument("--warmup-epochs", type=NONNEGATIVE, default=0.0, help="linear lr warm-up (default 0)")
    p.add_argument("--label-smoothing", type=number(float, 0, 1, high_open=True), default=0.0)
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    p.add_argument("--no-bn-decay", action="store_true", help="no weight decay on BatchNorm parameters")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    p.add_argument("--threads", type=COUNT, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars, only one line per epoch")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="no TensorBoard event files in the run folder (written when tensorboard is installed)")
    p.add_argument("--workers", type=COUNT, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes per GPU/process for datasets read from disk "
                        "(imagenet; default 8, or the number of CPUs if fewer)")


def parser() -> Parser:
    p = Parser(prog="python -m supermask.train", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--k", type=number(float, 0, 1, low_open=True), default=0.5, help="fraction of weights kept, in (0, 1] (default 0.5)")
    p.add_argument("--init", choices=INITS, default=None,
                   help="weight init (default signed_constant; kaiming_normal with --dense)")
    p.add_argument("--scale-fan", action="store_true", help="init with fan_in * k (the 'scaled' variants)")
    p.add_argument("--topk", choices=TOPK_SCOPES, default=None,
                   help="top-k per layer or one global threshold (default layer; with --prune-at-init the "
                        "method's paper's: global for snip, grasp, synflow)")
    p.add_argument("--dense", action="store_true", help="train the weights of the same network (no mask)")
    p.add_argument("--first-layer-dense", action="store_true", help="first layer: ordinary trainable weights")
    p.add_argument("--last-layer-dense", action="store_true", help="last layer: ordinary trainable weights")
    p.add_argument("--mask", choices=MASK_KINDS, default="topk",
                   help="topk (edge-popup) or sampled: Bernoulli(sigmoid(score)) masks (Zhou et al. 2019)")
    p.add_argument("--sampled-eval", choices=SAMPLED_EVAL, default="expected",
                   help="sampled masks at evaluation: expected mask or thresholded at sigmoid 0.5")
    p.add_argument("--score-init-constant", type=number(float), default=None, help="initialise every score to this")
    p.add_argument("--random-subnet", action="store_true",
                   help="no training: evaluate the fixed random subnetwork that keeps k of the weights")
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="take the defaults from a YAML config of the official edge-popup code (hidden-networks) "
                        "or of configs/; flags given here override it (supermask.hn_config)")
    p.add_argument("--prune-at-init", choices=pai.METHODS, default=None,
                   help="with --dense: mask the weights at initialisation by this method (supermask.pai) at --k, "
                        "then train the kept weights with the mask held fixed")
    p.add_argument("--pai-check", choices=pai.CHECKS, default=None,
                   help="sanity check of Frankle et al. 2021: shuffle the mask within each layer, or reinit the "
                        "kept weights")
    p.add_argument("--evaluate", metavar="RUN_DIR", default=None,
                   help="evaluate a saved run on the test set (top-1, top-5) without training")
    add_training_args(p)
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "triton"),
                   help="mask implementation: the reference torch path, the fused CPU kernels (C, compiled on "
                        "first use) or the Triton kernels (auto: triton on CUDA, cpu on CPU when a C compiler "
                        "is there, else torch)")
    p.add_argument("--out", default=None, help="run folder (default runs/<name derived from the flags>)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    return p


# What Ctrl-C prints: an interrupted run may have no checkpoint yet (then --resume starts it again).
INTERRUPTED = ("interrupted; run the same command with --resume to continue from the last finished epoch "
               "(a run stopped before its first epoch ended starts again)")


def validate_common(args):
    """Checks shared by every command that builds and trains a model (train, imp)."""
    if args.model not in MODELS:
        raise UsageError(f"unknown model {args.model!r}; choose from {', '.join(MODELS)}")
    if args.dataset not in data_mod.DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; choose from {', '.join(data_mod.DATASETS)}")
    if not args.width > 0:
        raise UsageError(f"--width must be > 0, got {args.width}")
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.nesterov and args.optimizer == "sgd" and args.momentum == 0:
        raise UsageError("--nesterov needs a momentum > 0 (--momentum)")


def validate(args):
    validate_common(args)
    if args.init is None:
        args.init = "kaiming_normal" if args.dense else "signed_constant"
    if args.dense and (args.random_subnet or args.mask != "topk"):
        raise UsageError("--dense trains weights: it does not combine with --random-subnet or --mask")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        raise UsageError(f"--warmup-epochs must be in [0, --epochs], got {args.warmup_epochs}")
    if args.random_subnet and args.dataset in data_mod.STREAMED:
        raise UsageError(f"--random-subnet needs an in-memory dataset, not {args.dataset}")
    if args.schedule == "multistep" and not args.milestones:
        raise UsageError("--schedule multistep needs --milestones, e.g. --milestones 30,60")
    pai.validate_args(args)  # --prune-at-init / --pai-check, and --topk's default


def run_config(args) -> dict:
    config = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    for key in ("prune_at_init", "pai_check"):  # in a run's identity only when set: older runs keep their names
        if config.get(key) is None:
            config.pop(key, None)
    if config["dense"]:  # mask flags mean nothing for a dense run: keep them out of its identity
        for key in () if config.get("prune_at_init") else ("k", "topk"):
            config.pop(key, None)
        for key in ("scale_fan", "mask", "sampled_eval", "score_init_constant", "random_subnet",
                    "first_layer_dense", "last_layer_dense"):
            config.pop(key, None)
    config["milestones"] = list(config["milestones"])
    return {"command": "train", **config}


def run_name(config: dict) -> str:
    kind = "dense" if config["dense"] else "sampled" if config.get("mask") == "sampled" else f"k{config['k']:g}"
    if config.get("prune_at_init"):
        kind = f"{config['prune_at_init']}{config['k']:g}" + (f"-{config['pai_check']}" if config.get("pai_check") else "")
    if config.get("random_subnet"):
        kind = f"random{config['k']:g}"
    return f"{config['model']}_w{config['width']:g}_{config['dataset']}_{kind}_s{config['seed']}_{config_hash(config)}"


def build_model(config: dict, input_shape, num_classes: int) -> torch.nn.Module:
    """The network a run config describes, freshly initialised from its seed."""
    model = build(config["model"], input_shape, num_classes, config["width"])
    init_dense_(model, config["init"], config["seed"])
    if config["dense"]:
        return model
    prunable = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    skip = ((prunable[0],) if config.get("first_layer_dense") else ()) + \
           ((prunable[-1],) if config.get("last_layer_dense") else ())
    model = convert(model, config["k"], config["init"], config["scale_fan"], config["seed"], config["topk"],
                    inplace=True, skip=skip, mask=config.get("mask", "topk"))
    for _, layer in supermask_layers(model):
        layer.sampled_eval = config.get("sampled_eval", "expected")
        if config.get("score_init_constant") is not None:
            layer.scores.data.fill_(config["score_init_constant"])
        if config.get("random_subnet"):
            layer.scores.requires_grad_(False)
    return model


def evaluate_saved_run(run_dir: Path, data_dir: str, device: torch.device, workers: int) -> int:
    """--evaluate: rebuild a finished or checkpointed run and report its test accuracy."""
    ckpt_path = run_dir / "checkpoint.pt"
    config = read_run_config(run_dir)
    if config.get("command") != "train":
        raise UsageError(f"--evaluate {run_dir}: not a supermask.train run")
    stored = run_dir / "results.json"
    results = read_json_object(stored) if stored.is_file() else {}
    if ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, require=("model",))["model"]
    elif not config.get("random_subnet"):
        raise UsageError(f"--evaluate {run_dir}: no checkpoint.pt to evaluate")
    streamed = {"workers": workers} if config["dataset"] in data_mod.STREAMED else {}
    dataset = data_mod.load(config["dataset"], data_dir, config["val_size"], **streamed)
    try:
        model = build_model(config, dataset.input_shape, dataset.num_classes)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{run_dir / 'config.json'} does not describe a network this supermask builds ({e})") from None
    if ckpt_path.is_file():
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UsageError(f"{ckpt_path} does not fit the network its config.json describes "
                             f"({' '.join(str(e).split())[:160]})") from None
    model.to(device)
    if getattr(dataset, "streaming", False):
        test = evaluate_streamed(model, dataset.test, device, config["batch_size"], dataset.workers)
    else:
        test = evaluate(model, dataset.test_x.to(device), dataset.test_y.to(device))
    note = f" (stored: {results['test_acc']:.2f}%)" if isinstance(results.get("test_acc"), float | int) else ""
    print(f"{run_dir}: test top-1 {test['acc']:.2f}%{note}, top-5 {test['acc5']:.2f}%, loss {test['loss']:.4f}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; with --config FILE.yaml its values are the defaults that the flags override."""
    p = parser()
    args = p.parse_args(argv)
    if args.config:
        from . import hn_config  # noqa: PLC0415

        source = f"--config {args.config}"
        defaults = hn_config.to_flags(hn_config.read_yaml(args.config), source)
        actions = {a.dest: a for a in p._actions}
        for dest, value in defaults.items():
            defaults[dest] = _config_value(actions[dest], value, source)
        p.set_defaults(**defaults)
        args = p.parse_args(argv)
        if args.k is None:
            raise UsageError(f"{source} sets prune_rate -1 (given on the command line in hidden-networks): pass --k")
    return args


def _config_value(action: argparse.Action, value, source: str):
    """A config file's value checked and converted as the flag's own would be."""
    if value is None:
        return None
    flag = action.option_strings[0] if action.option_strings else action.dest
    try:
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError
        elif action.type is not None and not isinstance(value, tuple):
            value = action.type(str(value))
        if action.choices is not None and value not in action.choices:
            raise ValueError
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise UsageError(f"{source}: {value!r} is not a valid value for {flag}") from None
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.evaluate:
        return evaluate_saved_run(Path(args.evaluate), args.data_dir, resolve_device(args.device), args.workers)
    validate(args)
    # Under torchrun: join the process group (NCCL on CUDA, gloo on the CPU); otherwise a no-op.
    with distributed.session(resolve_device(args.device)) as device:
        return _train_main(args, device)


def _train_main(args, device: torch.device) -> int:
    backend = resolve_backend(args.backend, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = run_config(args)
    out = Path(args.out) if args.out else Path("runs") / run_name(config)
    dataset = data_mod.load(args.dataset, args.data_dir, args.val_size, **_load_options(args))  # fail on missing data first
    if distributed.world_size() > 1 and args.batch_size < distributed.world_size():
        raise UsageError(f"--batch-size is the global batch: it must be at least the number of processes "
                         f"({distributed.world_size()}), got {args.batch_size}")
    # Only rank 0 looks at and writes the run folder; the others get its answer (and the checkpoint
    # it read, so that resuming works without a shared file system).
    with contextlib.ExitStack() as held:
        # (rank 0 holds the run folder's lock until the run ends: see runs.exclusive)
        state, resume = distributed.run_on_main(_open_run_dir, out, config, args.resume, held)
        return _train_run(args, device, config, out, state, resume, backend, dataset)


def _train_run(args, device, config, out, state, resume, backend, dataset) -> int:
    say = print if distributed.is_main() else (lambda *_a, **_k: None)
    if state == "done":
        results = read_json_object(out / "results.json", hint_results(out)) if distributed.is_main() else {}
        say(f"{out} already holds this finished run: test accuracy {results.get('test_acc', 0):.2f}% "
            "(nothing recomputed)")
        return 0
    torch.manual_seed(args.seed)
    model = build_model(config, dataset.input_shape, dataset.num_classes)
    set_backend(model, backend)
    kind = "dense" if args.dense else f"supermask k={args.k}"
    keeper, extra = None, None
    if args.prune_at_init:  # the mask at init, held fixed while training
        keeper, extra = pai.prepare_training(model, config, dataset, device, resume)
        kind = f"dense, {args.prune_at_init} at init, k={args.k}" + (f", {args.pai_check}" if args.pai_check else "")
    ranks = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    say(f"{args.model} x{args.width:g} ({kind}) on {args.dataset}, {device}{ranks}, backend {backend} -> {out}")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                      momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                      seed=args.seed, warmup_epochs=args.warmup_epochs, milestones=args.milestones,
                      gamma=args.gamma, label_smoothing=args.label_smoothing, nesterov=args.nesterov,
                      no_bn_decay=args.no_bn_decay)
    if args.random_subnet:
        results = evaluate_untrained(model, dataset, cfg, device, out, config=config)
    else:
        results = train(model, dataset, cfg, device, out, resume, after_step=keeper, progress=not args.no_progress,
                        checkpoint_extra=extra, tensorboard=not args.no_tensorboard, config=config)
    speed = f"{results['seconds_per_epoch']:.2f} s/epoch" if results["seconds_per_epoch"] else "not trained"
    say(f"test accuracy {results['test_acc']:.2f}% (best {results['best_test_acc']:.2f}%, "
          f"top-5 {results['test_acc5']:.2f}%), {results['params_kept']}/{results['params_total']} weights kept, "
          f"{speed}; results in {out / 'results.json'}")
    return 0


def _load_options(args) -> dict:
    return {"workers": args.workers} if args.dataset in data_mod.STREAMED else {}


def _open_run_dir(out: Path, config: dict, resume: bool, held: contextlib.ExitStack):
    """prepare_run_dir, the run folder's lock (entered into held) unless the run is done, and the
    checkpoint to resume from (None for a new run)."""
    state = prepare_run_dir(out, config, resume)
    if state != "done":
        held.enter_context(exclusive(out))
        if (out / "results.json").is_file():  # finished by another process a moment ago
            state = "done"
        else:
            remove_temp_files(out)  # left by a process killed while writing (we hold the folder now)
    required = ("model",) if config.get("random_subnet") else RESUME_KEYS  # a random subnet is recomputed
    return state, (load_checkpoint(out / "checkpoint.pt", required) if state == "resume" else None)


def hint_results(out: Path) -> str:
    return (f"; delete it and run the same command with --resume to write it again from {out / 'checkpoint.pt'}"
            if (out / "checkpoint.pt").is_file() else "; delete the run folder to train it again")


if __name__ == "__main__":
    sys.exit(run_main("python -m supermask.train", main, interrupted=INTERRUPTED))
