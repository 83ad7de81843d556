"""Lottery tickets by iterative magnitude pruning (Frankle & Carbin), with rewinding and controls.

    python -m supermask.imp --dataset fashion-mnist --rounds 8 --epochs 10    # LeNet-300-100
    python -m supermask.imp --dataset fashion-mnist --rounds 8 --epochs 10 --control reinit

Round 0 trains the dense network; every later round prunes --prune-rate of the surviving weights
of smallest magnitude (the output layer at half that rate), resets the survivors to their initial
values (or, with --rewind-iter K, to their values after K iterations of round 0) and trains again
(rewound: from iteration K to the end, the batches and learning-rate schedule continuing from K,
as open_lth does; the controls too).
Pruned weights stay exactly zero: their gradients are masked and they are re-zeroed after every
step. Controls train on the ticket's masks: --control reinit (same masks, fresh random weights,
Liu et al.) and --control random-mask (random masks of the same per-layer sparsity, original
weights); they need the ticket run, which is run or reused first (--ticket, default beside --out).

OUT (default runs/imp_<name derived from the flags>) holds config.json, init.pt (rewind.pt),
round_00 ... round_NN (each a training run folder whose checkpoint.pt also holds the round's
"masks") and results.json with one row per round. Re-running the same command recomputes
nothing; an interrupted round resumes from its last epoch; a larger --rounds extends the run.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
from pathlib import Path

import torch

from . import data as data_mod
from . import distributed, threads, training
from . import desc
from .cli import Parser, number, resolve_device, run_main
from .flags import add_model_args, add_training_args
from .init import INITS
from .pruning import (SCOPES, MaskKeeper, full_masks, magnitude_masks, random_masks_like, reinit_, rewind_,
                      sparsity)
from .errors import UsageError
from .storage import (check_same_config, exclusive, load_checkpoint, open_run, prepare_run_dir, read_json_object,
                      remove_temp_files, results_problem, save_checkpoint, write_json)

PROG = "python -m supermask.imp"
CONTROLS = ("reinit", "random-mask")


# Round folders are round_00 ... round_99; range checks of the other numeric flags: cli.number.
ROUNDS = number(int, 0, 99)
PRUNE_RATE = number(float, 0, 1, low_open=True, high_open=True)


def parser() -> Parser:
    """The flags of python -m supermask.imp."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--init", choices=INITS, default="kaiming_normal", help="weight init (default kaiming_normal)")
    p.add_argument("--rounds", type=ROUNDS, default=5, help="pruning rounds after the dense round 0 (default 5)")
    p.add_argument("--prune-rate", type=PRUNE_RATE, default=0.2,
                   help="fraction of the surviving weights pruned per round (default 0.2)")
    p.add_argument("--output-prune-rate", type=number(float, 0, 1, high_open=True), default=None,
                   help="the same for the output layer (default: half of --prune-rate)")
    p.add_argument("--scope", choices=SCOPES, default="layer",
                   help="prune each layer by the rate, or all but the output layer under one threshold")
    p.add_argument("--rewind-iter", type=number(int, 0), default=0,
                   help="reset survivors to their values after this many iterations of round 0 and train from "
                        "there to the end (default 0: init)")
    p.add_argument("--control", choices=CONTROLS, default=None,
                   help="train the ticket's masks with fresh weights (reinit) or random masks of the same "
                        "per-layer sparsity (random-mask)")
    p.add_argument("--val-every", type=number(int, 0), default=100,
                   help="evaluate the validation loss every this many iterations, for the early-stop "
                        "iteration (default 100; 0: once per epoch)")
    add_training_args(p)
    p.add_argument("--out", default=None, help="run folder (default runs/<name derived from the flags>)")
    p.add_argument("--ticket", default=None,
                   help="with --control: the ticket run folder (default: beside --out, named from the flags)")
    return p


def validate(args):
    """The description's checks (desc.check_training) and IMP's own; --output-prune-rate's default
    (half of --prune-rate). Raises UsageError."""
    desc.check_training(args)
    if args.output_prune_rate is None:
        args.output_prune_rate = args.prune_rate / 2
    desc.check_in_memory(args, "IMP needs an in-memory dataset; {dataset} is read from disk (use supermask.train)")
    if args.ticket is not None and args.control is None:
        raise UsageError("--ticket only makes sense with --control")


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


def check_imp_dir(out: Path, config: dict) -> int:
    """Check that out may hold this IMP run (the same identity, or nothing at all); returns the
    number of rounds its config.json records. Raises UsageError, writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    cfg_path = out / "config.json"
    stored_rounds = 0
    if cfg_path.is_file():
        stored = read_json_object(cfg_path, "; choose another --out")
        problem = desc.config_problem(stored)
        if problem:
            raise UsageError(f"{cfg_path} is damaged: {problem}; choose another --out")
        stored_rounds = stored.pop("rounds", 0)
        check_same_config(out, stored, config)
    elif out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty folder that holds no IMP run; choose another")
    return stored_rounds


def prepare_imp_dir(out: Path, config: dict, rounds: int) -> None:
    """check_imp_dir, then create out and write (or extend) config.json."""
    out = Path(out)
    stored_rounds = check_imp_dir(out, config)
    cfg_path = out / "config.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg_path.is_file() or rounds > stored_rounds:
            write_json(cfg_path, {**config, "rounds": max(rounds, stored_rounds)})
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None


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

    config is imp_config's dict; a control needs ticket, the finished-or-not ticket folder (the
    ticket's rounds are run first by main / compare)."""
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
    # nothing written), so that it can be read from read-only storage.
    finished = _finished_run(out, config, rounds)
    with contextlib.ExitStack() as held:
        def open_and_hold():  # rank 0 holds the folder's lock while it writes the rounds (runs.exclusive)
            prepare_imp_dir(out, config, rounds)
            held.enter_context(exclusive(out))
            for folder in (out, *out.glob("round_[0-9][0-9]")):  # a killed process's temporary files
                remove_temp_files(folder)

        if not finished:
            distributed.run_on_main(open_and_hold)
        return _run_rounds(config, out, rounds, dataset, device, ticket, progress, log, cfg, steps_per_epoch,
                           tensorboard, write=not finished)


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


def _run_rounds(config, out, rounds, dataset, device, ticket, progress, log, cfg, steps_per_epoch,
                tensorboard=True, write=True) -> dict:
    control = config.get("control")

    # The weights every round starts from (the state at initialisation, init.pt).
    init_path = out / "init.pt"
    rewind_path = out / "rewind.pt"

    def write_start_files():
        if not init_path.is_file():
            model = _dense_model(config, dataset)
            if control == "reinit":
                reinit_(model, config["init"], config["seed"])
            _save_state(init_path, model.state_dict())
        if control == "random-mask" and config["rewind_iter"] and not rewind_path.is_file():
            shutil.copyfile(Path(ticket) / "rewind.pt", rewind_path)

    distributed.run_on_main(write_start_files)
    init_state = _load_state(init_path)

    label = f"{control} " if control else ""
    prev = None  # (final weights, masks) of the previous ticket round
    for r in range(1 if control else 0, rounds + 1):
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
        masks, prev = _round_masks(config, out, r, ticket, prev, dataset)
        start = _round_start(config, out, r, init_state)
        _, resume = distributed.run_on_main(open_run, rdir, round_config, None,
                                            require=(*training.RESUME_KEYS, "masks"))

        model = _dense_model(config, dataset).to(device)
        with _must_fit(rewind_path if start is not init_state else init_path):
            rewind_(model, start, masks)
            keeper = MaskKeeper(model, masks)
        after_step = keeper
        if r == 0 and config["rewind_iter"] and not rewind_path.is_file():
            step = [resume["epoch"] * steps_per_epoch if resume else 0]

            def keep_and_save_rewind(m, step=step):
                keeper(m)
                step[0] += 1
                if step[0] == config["rewind_iter"] and distributed.is_main() and not rewind_path.is_file():
                    _save_state(rewind_path, {k: v.detach().cpu().clone() for k, v in m.state_dict().items()})

            after_step = keep_and_save_rewind

        sp = sparsity(masks)
        log(f"{label}round {r}/{rounds}: {sp['weights_remaining']:.2f}% of weights remaining -> {rdir}")
        training.train(model, dataset, cfg, device, rdir, resume, after_step, progress,
                       desc=f"{label}round {r}/{rounds} ", log=log,
                       checkpoint_extra={"masks": masks, "round": r}, start_step=start_step,
                       tensorboard=tensorboard, config=round_config)
        keeper.remove()
        distributed.barrier()  # rank 0's files (rewind.pt, the round's results) exist before any rank looks
        if r == 0 and config["rewind_iter"] and not rewind_path.is_file():
            raise UsageError(f"round 0 ended without reaching --rewind-iter {config['rewind_iter']}")
        prev = ({k: v.detach().cpu() for k, v in model.state_dict().items()}, masks)
        _write_results(out, config, rounds, ticket)
    return _write_results(out, config, rounds, ticket, write)


def _finished_run(out: Path, config: dict, rounds: int) -> dict | None:
    """results.json of out when it holds this IMP run (check_imp_dir) finished through round rounds
    (every round from the first, the control's 1 or 0, has its row), else None. Reads only; the
    rounds' own files are checked by _run_rounds, which reads them all."""
    if not (out / "results.json").is_file():
        return None
    stored_rounds = check_imp_dir(out, config)
    try:
        stored = read_json_object(out / "config.json")
        results = read_json_object(out / "results.json")
    except UsageError:  # damaged: the writing path below says so or writes it again
        return None
    if rounds > stored_rounds or results_problem(results, stored) is not None:
        return None
    first = 1 if config.get("control") else 0
    done = {row["round"] for row in results["rounds"]}
    return results if done >= set(range(first, rounds + 1)) else None


def _write_results(out: Path, config: dict, rounds: int, ticket, write: bool = True) -> dict:
    stored = read_json_object(out / "config.json")
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


def main(argv=None) -> int:
    """python -m supermask.imp: the ticket run (first, for a control) and the IMP run's rounds; returns the exit
    code."""
    args = parser().parse_args(argv)
    validate(args)
    # Under torchrun: join the process group (NCCL on CUDA, gloo on the CPU); otherwise a no-op.
    with distributed.session(resolve_device(args.device)) as device:
        return _imp_main(args, device)


def _imp_main(args, device: torch.device) -> int:
    say = print if distributed.is_main() else (lambda *_a, **_k: None)
    threads.apply_threads(args.threads)
    config = desc.imp_identity(args)
    out = Path(args.out) if args.out else default_out(config)
    dataset = data_mod.load(args.dataset, args.data_dir, args.val_size)  # fail on missing data first
    desc.check_fits_memory(args, dataset.input_shape, dataset.num_classes, device)  # before anything is written
    progress = not args.no_progress
    ticket = None
    if args.control:
        tconfig = desc.ticket_identity(config)
        ticket = Path(args.ticket) if args.ticket else out.parent / desc.imp_name(tconfig)
        check_imp_dir(ticket, tconfig)
        check_imp_dir(out, config)  # fail before training the ticket, not after
        say(f"ticket run: {ticket}")
        run_imp(tconfig, ticket, args.rounds, dataset, device, progress=progress,
                tensorboard=not args.no_tensorboard)
    kind = f"control {args.control}" if args.control else "ticket"
    say(f"IMP {args.model} x{args.width:g} ({kind}) on {args.dataset}, {device} -> {out}")
    results = run_imp(config, out, args.rounds, dataset, device, ticket, progress=progress,
                      tensorboard=not args.no_tensorboard)
    rows = [row for row in results["rounds"] if row["round"] <= args.rounds]
    say(format_rounds(rows))
    say(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main,
                      interrupted="interrupted; run the same command again: it continues the interrupted round from "
                                  "its last finished epoch (or starts that round again if none finished)"))
