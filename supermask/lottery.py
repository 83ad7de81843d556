"""Lottery tickets by iterative magnitude pruning (Frankle & Carbin): IMP rounds, rewinding, controls.

The library half of python -m supermask.imp (which only turns flags into a description and prints).
Round 0 trains the dense network; every later round prunes prune_rate of the surviving weights of
smallest magnitude (the output layer at output_prune_rate), resets the survivors to their initial
values (or, with rewind_iter K, to their values after K iterations of round 0) and trains again
(rewound: from iteration K to the end, the batches and learning-rate schedule continuing from K, as
open_lth does; the controls too). Pruned weights stay exactly zero (pruning.MaskKeeper). Controls
train on the ticket's masks: reinit (same masks, fresh random weights, Liu et al.) and random-mask
(random masks of the same per-layer sparsity, original weights).

An IMP run folder holds config.json (its identity, desc.imp_identity, plus the rounds asked for),
init.pt (rewind.pt), round_00 ... round_NN (each a training run folder whose checkpoint.pt also
holds the round's "masks") and results.json with one row per round. run_description runs one from
a description (loading its data, the ticket run first for a control); run_imp the rounds of an
identity on a loaded dataset; format_rounds is the rounds' text table.
"""
from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import torch

from . import data as data_mod
from . import desc, distributed, training
from .errors import UsageError
from .pruning import MaskKeeper, full_masks, magnitude_masks, random_masks_like, reinit_, rewind_, sparsity
from .storage import (check_same_config, exclusive, load_checkpoint, open_run, prepare_run_dir, read_json_object,
                      remove_temp_files, results_problem, save_checkpoint, write_json)

CONTROLS = desc.CONTROLS


def default_out(config: dict, runs_dir: str | Path = "runs") -> Path:
    """The default folder of the IMP run config (imp_identity): runs_dir/imp_name."""
    return Path(runs_dir) / desc.imp_name(config)


def _dense_model(config: dict, dataset) -> torch.nn.Module:
    dense = {"model": config["model"], "width": config["width"], "dense": True, "init": config["init"],
             "seed": config["seed"]}
    return desc.build_model(dense, dataset.input_shape, dataset.num_classes)


def _load_state(path: Path) -> dict:
    """The state dict in init.pt / rewind.pt (stored as {"model": state dict}; earlier runs stored
    the bare state dict)."""
    ckpt = load_checkpoint(path)
    return ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt


def _save_state(path: Path, state: dict) -> None:
    save_checkpoint(path, {"model": state})  # wrapped: the checkpoint's checksum sits beside it


def read_imp_dir(out: Path, config: dict) -> dict | None:
    """The config.json of out (its identity plus the "rounds" asked for) when out holds this IMP run,
    None when out holds nothing yet. Raises UsageError for a file, another run or a damaged
    config.json, a non-empty folder of something else; writes nothing. The one read of an IMP
    run's config.json (run_imp reads it once)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        stored = read_json_object(cfg_path, "; choose another --out")
        problem = desc.config_problem(stored)
        if problem:
            raise UsageError(f"{cfg_path} is damaged: {problem}; choose another --out")
        check_same_config(out, {k: v for k, v in stored.items() if k != "rounds"}, config)
        return stored
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty folder that holds no IMP run; choose another")
    return None


def check_imp_dir(out: Path, config: dict) -> int:
    """Check that out may hold this IMP run (the same identity, or nothing at all); returns the
    number of rounds its config.json records (0 for none). Raises UsageError, writes nothing."""
    stored = read_imp_dir(out, config)
    return stored.get("rounds", 0) if stored is not None else 0


def prepare_imp_dir(out: Path, config: dict, rounds: int, stored: dict | None) -> dict:
    """Create out and write (or extend to rounds) config.json; stored is read_imp_dir's answer for
    out. Returns the config.json out now holds."""
    out = Path(out)
    stored_rounds = stored.get("rounds", 0) if stored is not None else 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        if stored is None or rounds > stored_rounds:
            stored = {**config, "rounds": max(rounds, stored_rounds)}
            write_json(out / "config.json", stored)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return stored


@contextlib.contextmanager
def _must_fit(path: Path):
    """A stored state or masks that do not fit this run's network (another run's file): one line."""
    try:
        yield
    except (KeyError, RuntimeError, ValueError) as e:
        why = f"no entry {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:160]
        raise UsageError(f"{path} does not fit this run's network ({why}); it is another run's or damaged") from None


def _redo(rdir: Path) -> str:
    return f"; delete {rdir} and run the same command again to recompute that round"


def _round_row(r: int, masks: dict, results: dict) -> dict:
    sp = sparsity(masks)
    keys = ("test_acc", "best_test_acc", "val_acc", "best_val_acc", "early_stop_iteration", "early_stop_val_loss",
            "seconds_per_epoch", "epochs", "start_iteration", "iterations")
    return {"round": r, "dir": f"round_{r:02d}", "weights_remaining": sp["weights_remaining"],
            "weights_kept": sp["kept"], "weights_total": sp["total"], "layers": sp["layers"],
            **{k: results.get(k) for k in keys}}


def _finished_rows(out: Path) -> list[dict]:
    rows = []
    for rdir in sorted(out.glob("round_[0-9][0-9]")):
        if (rdir / "results.json").is_file():
            masks = load_checkpoint(rdir / "checkpoint.pt", require=("masks",))["masks"]
            rows.append(_round_row(int(rdir.name[6:]), masks, read_json_object(rdir / "results.json", _redo(rdir))))
    return rows


def run_imp(config: dict, out: Path, rounds: int, dataset, device: torch.device, ticket: Path | None = None,
            progress: bool = True, log=print, tensorboard: bool = True) -> dict:
    """Run (or resume, or just read) rounds 0..rounds of an IMP run or control; returns results.json's dict.

    config is desc.imp_identity's dict; a control needs ticket, the finished-or-not ticket folder
    (run_description runs the ticket's rounds first). Raises UsageError (one line) for a rewind
    iteration at or past the end of training, a missing ticket, an out holding something else."""
    out = Path(out)
    control = config.get("control")
    cfg = desc.training_config(config)
    steps_per_epoch = math.ceil(len(dataset.train_y) / cfg.batch_size)
    if config["rewind_iter"] >= cfg.epochs * steps_per_epoch:  # later rounds train from it to the end
        raise UsageError(f"--rewind-iter {config['rewind_iter']} is not before the end of training "
                         f"({cfg.epochs * steps_per_epoch} iterations)")
    if control and (ticket is None or not (Path(ticket) / "config.json").is_file()):
        raise UsageError(f"--control {control} needs the ticket run, not found at {ticket}")
    # Under torchrun, rank 0 writes the run's files and the other ranks read them after it (the
    # run_on_main calls synchronise): --out must be on a file system every node sees.
    if not distributed.is_main():
        log = lambda *_a, **_k: None  # noqa: E731
    # A run finished through these rounds is only read (every round's files checked, no lock taken,
    # nothing written), so that it can be read from read-only storage. Rank 0 looks (the others
    # would race with its writing below) and tells the others.
    stored, finished = distributed.run_on_main(_look, out, config, rounds)
    run = _Rounds(config, out, rounds, dataset, device, ticket, progress, log, cfg, steps_per_epoch, tensorboard)
    with contextlib.ExitStack() as held:
        def open_and_hold():  # rank 0 holds the folder's lock while it writes the rounds (runs.exclusive)
            written = prepare_imp_dir(out, config, rounds, stored)
            held.enter_context(exclusive(out))
            for folder in (out, *out.glob("round_[0-9][0-9]")):  # a killed process's temporary files
                remove_temp_files(folder)
            return written

        if not finished:
            stored = distributed.run_on_main(open_and_hold)
        return _run_rounds(run, stored, write=not finished)


def _look(out: Path, config: dict, rounds: int) -> tuple[dict | None, dict | None]:
    """(read_imp_dir's config.json, _finished_run's results.json) of out."""
    stored = read_imp_dir(out, config)
    return stored, _finished_run(out, config, rounds, stored)


class _Rounds:
    """What every round of one run_imp call shares (its arguments, the training config, the
    iterations per epoch, the paths of init.pt and rewind.pt)."""

    def __init__(self, config, out, rounds, dataset, device, ticket, progress, log, cfg, steps_per_epoch,
                 tensorboard):
        self.config, self.out, self.rounds, self.dataset, self.device = config, out, rounds, dataset, device
        self.ticket, self.progress, self.log, self.cfg = ticket, progress, log, cfg
        self.steps_per_epoch, self.tensorboard = steps_per_epoch, tensorboard
        self.control = config.get("control")
        self.init_path, self.rewind_path = out / "init.pt", out / "rewind.pt"


def _round_masks(config: dict, out: Path, r: int, ticket, prev, dataset) -> tuple[dict, tuple | None]:
    """The masks of round r and prev, the (final weights, masks) of the previous round (read from
    its checkpoint when prev is None): a control's are the ticket run's round r (random-mask:
    shuffled), round 0's keep everything, a later round's prune the previous round's trained
    weights by magnitude."""
    control = config.get("control")
    if control:
        ticket_ckpt = Path(ticket) / f"round_{r:02d}" / "checkpoint.pt"
        if not (Path(ticket) / f"round_{r:02d}" / "results.json").is_file():
            raise UsageError(f"the ticket run {ticket} has no finished round {r}; run it first")
        masks = load_checkpoint(ticket_ckpt, require=("masks",))["masks"]
        if control == "random-mask":
            masks = random_masks_like(masks, config["seed"], stream=f"random-mask/round{r}")
    elif r == 0:
        masks = full_masks(_dense_model(config, dataset))
    else:
        if prev is None:
            ckpt = load_checkpoint(out / f"round_{r - 1:02d}" / "checkpoint.pt", require=("model", "masks"))
            prev = (ckpt["model"], ckpt["masks"])
        trained = _dense_model(config, dataset)
        with _must_fit(out / f"round_{r - 1:02d}" / "checkpoint.pt"):
            trained.load_state_dict(prev[0])
            masks = magnitude_masks(trained, prev[1], config["prune_rate"], config["scope"],
                                    config["output_prune_rate"])
    return masks, prev


def _round_start(config: dict, out: Path, r: int, init_state: dict) -> dict:
    """The weights round r starts from: the initialisation (round 0, reinit, no rewinding) or the
    rewind state (rewind.pt)."""
    rewind_path = out / "rewind.pt"
    if r == 0 or config.get("control") == "reinit" or not config["rewind_iter"]:
        start = init_state
    else:
        if not rewind_path.is_file():
            raise UsageError(f"{rewind_path} is missing; delete {out / 'round_00'} to recompute round 0")
        start = _load_state(rewind_path)
    return start


def _write_start_files(run: _Rounds) -> None:
    """init.pt (the weights every round starts from; a reinit control's fresh ones) and, for a
    random-mask control with rewinding, the ticket's rewind.pt; each only when missing."""
    config = run.config
    if not run.init_path.is_file():
        model = _dense_model(config, run.dataset)
        if run.control == "reinit":
            reinit_(model, config["init"], config["seed"])
        _save_state(run.init_path, model.state_dict())
    if run.control == "random-mask" and config["rewind_iter"] and not run.rewind_path.is_file():
        shutil.copyfile(Path(run.ticket) / "rewind.pt", run.rewind_path)


def _run_rounds(run: _Rounds, stored: dict, write: bool = True) -> dict:
    """Every round from the first (0; a control's 1) to run.rounds: a finished one read (its
    config checked), the others trained; results.json rewritten after each (unless write is
    False: a finished run only read)."""
    config, out = run.config, run.out
    distributed.run_on_main(_write_start_files, run)
    init_state = _load_state(run.init_path)
    prev = None  # (final weights, masks) of the previous ticket round
    for r in range(1 if run.control else 0, run.rounds + 1):
        rdir = out / f"round_{r:02d}"
        # Rounds after 0 train from the rewind iteration on (0 without rewinding).
        start_step = config["rewind_iter"] if r > 0 else 0
        round_config = {"command": "imp-round", "round": r, **config,
                        **({"start_iteration": start_step} if start_step else {})}
        if (rdir / "results.json").is_file():
            distributed.run_on_main(prepare_run_dir, rdir, round_config, True)  # checks the config ("done")
            read_json_object(rdir / "results.json", _redo(rdir))
            ckpt = load_checkpoint(rdir / "checkpoint.pt", require=("model", "masks"))
            prev = (ckpt["model"], ckpt["masks"])
            continue
        masks, prev = _round_masks(config, out, r, run.ticket, prev, run.dataset)
        start = _round_start(config, out, r, init_state)
        trained = _train_round(run, r, rdir, round_config, start, init_state, masks)
        prev = (trained, masks)
        _write_results(out, stored, run.ticket)
    return _write_results(out, stored, run.ticket, write)


def _train_round(run: _Rounds, r: int, rdir: Path, round_config: dict, start: dict, init_state: dict,
                 masks: dict) -> dict:
    """Train round r in rdir (resuming it) from the weights start with masks held; round 0 with
    rewinding also saves rewind.pt at the rewind iteration. Returns the final weights (CPU)."""
    config, rewind_path = run.config, run.rewind_path
    opened = distributed.run_on_main(open_run, rdir, round_config, None, require=(*training.RESUME_KEYS, "masks"))
    resume = opened.checkpoint
    model = _dense_model(config, run.dataset).to(run.device)
    with _must_fit(rewind_path if start is not init_state else run.init_path):
        rewind_(model, start, masks)
        keeper = MaskKeeper(model, masks)
    after_step = keeper
    if r == 0 and config["rewind_iter"] and not rewind_path.is_file():
        step = [resume["epoch"] * run.steps_per_epoch if resume else 0]

        def keep_and_save_rewind(m, step=step):
            keeper(m)
            step[0] += 1
            if step[0] == config["rewind_iter"] and distributed.is_main() and not rewind_path.is_file():
                _save_state(rewind_path, {k: v.detach().cpu().clone() for k, v in m.state_dict().items()})

        after_step = keep_and_save_rewind
    label = f"{run.control} " if run.control else ""
    run.log(f"{label}round {r}/{run.rounds}: {sparsity(masks)['weights_remaining']:.2f}% of weights remaining "
            f"-> {rdir}")
    start_step = round_config.get("start_iteration", 0)
    training.train(model, run.dataset, run.cfg, run.device, rdir, resume, after_step, run.progress,
                   desc=f"{label}round {r}/{run.rounds} ", log=run.log,
                   checkpoint_extra={"masks": masks, "round": r}, start_step=start_step,
                   tensorboard=run.tensorboard, config=round_config)
    keeper.remove()
    distributed.barrier()  # rank 0's files (rewind.pt, the round's results) exist before any rank looks
    if r == 0 and config["rewind_iter"] and not rewind_path.is_file():
        raise UsageError(f"round 0 ended without reaching --rewind-iter {config['rewind_iter']}")
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _finished_run(out: Path, config: dict, rounds: int, stored: dict | None) -> dict | None:
    """results.json of out when it holds this IMP run (stored: its config.json, read_imp_dir)
    finished through round rounds (every round from the first, the control's 1 or 0, has its
    row), else None. Reads only; the rounds' own files are checked by _run_rounds, which reads
    them all."""
    if stored is None or not (out / "results.json").is_file():
        return None
    try:
        results = read_json_object(out / "results.json")
    except UsageError:  # damaged: the writing path below says so or writes it again
        return None
    if rounds > stored.get("rounds", 0) or results_problem(results, stored) is not None:
        return None
    first = 1 if config.get("control") else 0
    done = {row["round"] for row in results["rounds"]}
    return results if done >= set(range(first, rounds + 1)) else None


def _write_results(out: Path, stored: dict, ticket, write: bool = True) -> dict:
    """results.json's dict (stored: the run's config.json; a row per finished round; the ticket
    folder of a control), written unless write is False (and only on rank 0)."""
    results = {"config": stored, "rounds": _finished_rows(out)}
    if ticket is not None:
        results["ticket"] = str(ticket)
    if write and distributed.is_main():
        write_json(out / "results.json", results)
    return results


def _pct(value) -> str:
    """A percentage in 6 columns; "-" where there is none (null: --val-size 0)."""
    return f"{value:6.2f}" if isinstance(value, int | float) else f"{'-':>6}"


def format_rounds(rows: list[dict]) -> str:
    """The rounds of an IMP run (results.json's rows) as a text table: weights remaining (%), test, best and
    validation accuracy (%), early-stop iteration, seconds per epoch."""
    lines = ["round  weights%   test%   best%    val%  early-stop it  s/epoch"]
    for row in rows:
        it = row["early_stop_iteration"]
        lines.append(f"{row['round']:5d}  {row['weights_remaining']:8.2f}  {row['test_acc']:6.2f}  "
                     f"{row['best_test_acc']:6.2f}  {_pct(row['val_acc'])}  {it if it is not None else '-':>13}  "
                     f"{row['seconds_per_epoch']:7.2f}")
    return "\n".join(lines)


def run_description(v, device: torch.device, out: Path | None = None, ticket: Path | None = None,
                    log=print) -> tuple[Path, dict]:
    """Run (or resume, or just read) the IMP run that the description v describes (desc.check_imp'd:
    MODEL_FIELDS, IMP_FIELDS, TRAINING_FIELDS, RUNTIME_FIELDS), in out (default: runs/imp_<name>):
    its data loaded, the network checked to fit in memory, and for a control the ticket run first
    (ticket, default beside out, named from v), run or reused. Returns (out, results.json's dict).
    Raises UsageError (one line) before anything is written where it can."""
    say = log if distributed.is_main() else (lambda *_a, **_k: None)
    config = desc.imp_identity(v)
    out = Path(out) if out else default_out(config)
    dataset = data_mod.load(v.dataset, v.data_dir, v.val_size)  # fail on missing data first
    desc.check_fits_memory(v, dataset.input_shape, dataset.num_classes, device)  # before anything is written
    progress, tensorboard = not v.no_progress, not v.no_tensorboard
    if v.control:
        tconfig = desc.ticket_identity(config)
        ticket = Path(ticket) if ticket else out.parent / desc.imp_name(tconfig)
        check_imp_dir(ticket, tconfig)
        check_imp_dir(out, config)  # fail before training the ticket, not after
        say(f"ticket run: {ticket}")
        run_imp(tconfig, ticket, v.rounds, dataset, device, progress=progress, log=log, tensorboard=tensorboard)
    kind = f"control {v.control}" if v.control else "ticket"
    say(f"IMP {v.model} x{v.width:g} ({kind}) on {v.dataset}, {device} -> {out}")
    return out, run_imp(config, out, v.rounds, dataset, device, ticket, progress=progress, log=log,
                        tensorboard=tensorboard)
