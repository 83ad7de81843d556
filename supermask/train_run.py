"""One train run (python -m supermask.train's library half): a supermask or dense run in its folder.

run trains (or resumes, or just reads) the run a description describes (desc.check_train'd: the
fields of MODEL_FIELDS, TRAIN_FIELDS, TRAINING_FIELDS, RUNTIME_FIELDS) in its run folder (default
runs/<desc.train_name>) holding config.json, metrics.jsonl, checkpoint.pt and results.json;
evaluate_saved rebuilds a stored run and measures its test accuracy. Both report through a log
callable (print by default, rank 0 only under torchrun) and raise UsageError (one line) for what a
user can fix.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from . import data as data_mod
from . import desc, distributed, pai, training
from .convert import set_backend
from .errors import UsageError
from .storage import load_checkpoint, open_run, read_json_object, read_results, read_run_config


def default_out(config: dict, runs_dir: str | Path = "runs") -> Path:
    """The default folder of the train run config (desc.train_identity): runs_dir/desc.train_name."""
    return Path(runs_dir) / desc.train_name(config)


def hint_results(out: Path) -> str:
    """What to do about a corrupted results.json of the run folder out (rewrite it from its checkpoint, or train
    again)."""
    return (f"; delete it and run the same command with --resume to write it again from {out / 'checkpoint.pt'}"
            if (out / "checkpoint.pt").is_file() else "; delete the run folder to train it again")


def run(v, device: torch.device, backend: str, out: Path | None = None, resume: bool | None = False,
        log=print) -> dict:
    """Train the run v describes on device with the mask backend (cli.resolve_backend's answer), in
    out (default: runs/<name>); resume: continue an unfinished run there (None: whatever it holds).
    A finished run is only read. Returns its results.json's dict. Raises UsageError before anything
    is written for missing data, a network too large for memory, a folder holding another run."""
    config = desc.train_identity(v)
    out = Path(out) if out else default_out(config)
    # fail on missing data first
    dataset = data_mod.load(v.dataset, v.data_dir, v.val_size, **_load_options(v))
    desc.check_fits_memory(v, dataset.input_shape, dataset.num_classes, device)  # before anything is written
    if distributed.world_size() > 1 and v.batch_size < distributed.world_size():
        raise UsageError(f"--batch-size is the global batch: it must be at least the number of processes "
                         f"({distributed.world_size()}), got {v.batch_size}")
    say = log if distributed.is_main() else (lambda *_a, **_k: None)
    # Only rank 0 looks at and writes the run folder; the others get its answer (and the checkpoint
    # it read, so that resuming works without a shared file system).
    with contextlib.ExitStack() as held:
        # (rank 0 holds the run folder's lock until the run ends: see storage.exclusive)
        opened = distributed.run_on_main(_open_run_dir, out, config, resume, held)
        if opened.note:
            say(opened.note, file=sys.stderr)
        if opened.state == "done":
            results = read_json_object(out / "results.json", hint_results(out)) if distributed.is_main() else {}
            say(f"{out} already holds this finished run: test accuracy {results.get('test_acc', 0):.2f}% "
                "(nothing recomputed)")
            return results
        return _train(v, device, config, out, opened.checkpoint, backend, dataset, say)


def _train(v, device, config: dict, out: Path, resume: dict | None, backend: str, dataset, say) -> dict:
    """The training (or, with random_subnet, the evaluation) of a run that is not finished."""
    torch.manual_seed(v.seed)
    model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
    set_backend(model, backend)
    kind = "dense" if v.dense else f"supermask k={v.k}"
    keeper, extra = None, None
    if v.prune_at_init:  # the mask at init, held fixed while training
        keeper, extra = pai.prepare_training(model, config, dataset, device, resume)
        kind = f"dense, {v.prune_at_init} at init, k={v.k}" + (f", {v.pai_check}" if v.pai_check else "")
    ranks = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    say(f"{v.model} x{v.width:g} ({kind}) on {v.dataset}, {device}{ranks}, backend {backend} -> {out}")
    cfg = desc.training_config(config)
    if v.random_subnet:
        results = training.evaluate_untrained(model, dataset, cfg, device, out, config=config)
    else:
        results = training.train(model, dataset, cfg, device, out, resume, after_step=keeper,
                                 progress=not v.no_progress, checkpoint_extra=extra,
                                 tensorboard=not v.no_tensorboard, config=config)
    speed = f"{results['seconds_per_epoch']:.2f} s/epoch" if results["seconds_per_epoch"] else "not trained"
    say(f"test accuracy {results['test_acc']:.2f}% (best {results['best_test_acc']:.2f}%, "
        f"top-5 {results['test_acc5']:.2f}%), {results['params_kept']}/{results['params_total']} weights kept, "
        f"{speed}; results in {out / 'results.json'}")
    return results


def _load_options(v) -> dict:
    return {"workers": v.workers} if v.dataset in data_mod.STREAMED else {}


def _open_run_dir(out: Path, config: dict, resume: bool | None, held: contextlib.ExitStack):
    """storage.open_run with the checkpoint entries this run resumes from."""
    required = ("model",) if config.get("random_subnet") else training.RESUME_KEYS  # a random subnet is recomputed
    return open_run(out, config, resume, held, required)


def evaluate_saved(run_dir: Path, data_dir: str, device: torch.device, workers: int) -> tuple[dict, dict]:
    """Rebuild a finished or checkpointed train run from run_dir and evaluate it on the test set.
    Returns (test: {"acc", "acc5", "loss"} in % and nats, the stored results.json's dict or {}).
    Raises UsageError for a folder that is not a train run, a damaged config.json, no checkpoint, a
    checkpoint that does not fit its network."""
    ckpt_path = run_dir / "checkpoint.pt"
    config = read_run_config(run_dir)
    if desc.config_problem(config):
        raise UsageError(f"{run_dir / 'config.json'} is damaged: {desc.config_problem(config)}")
    if config.get("command") != "train":
        raise UsageError(f"--evaluate {run_dir}: not a supermask.train run")
    results = read_results(run_dir, config) if (run_dir / "results.json").is_file() else {}
    if ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, require=("model",))["model"]
    elif not config.get("random_subnet"):
        raise UsageError(f"--evaluate {run_dir}: no checkpoint.pt to evaluate")
    streamed = {"workers": workers} if config["dataset"] in data_mod.STREAMED else {}
    dataset = data_mod.load(config["dataset"], data_dir, config["val_size"], **streamed)
    try:
        model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
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
        test = training.evaluate_streamed(model, dataset.test, device, config["batch_size"], dataset.workers)
    else:
        test = training.evaluate(model, dataset.test_x.to(device), dataset.test_y.to(device))
    return test, results
