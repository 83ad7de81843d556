"""The instability analysis (linear mode connectivity) and stability to pruning: the library half
of python -m supermask.instability (see that command's text for what is analysed and stored).

Frankle, Dziugaite, Roy & Carbin, "Linear mode connectivity and the lottery ticket hypothesis"
(ICML 2020): the network at rewind iteration k is trained to the end twice with two data orders;
the error barrier is the largest test error on the linear path between the two minus the mean of
its end points' errors; stable below STABLE_BELOW percentage points. Frankle et al. 2019
("Stabilizing the lottery ticket hypothesis"): the stability to pruning, the L2 distance over a
ticket's kept weights between the ticket and the dense network trained from k, normalised.

Pieces: rewind_states (the states at each k, one partial training pass, stored), train_copy (one
copy in its own training run folder), error_path / error_barrier / interpolate,
stability_to_pruning, analyse (every k of an Analysis: copies, paths, rows, each stored and
reused), write_table / write_plot / write_record (the analysis' folder).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from pathlib import Path

import torch

from . import desc, training
from .convert import set_backend
from .errors import UsageError, write_error
from .pruning import MaskKeeper, prunable_layers
from .runlog import markdown_table, pyplot, save_figure
from .storage import (atomic_write, check_same_config, check_writable, exclusive, load_checkpoint, open_run,
                      prepare_run_dir, read_json_object, read_run_config, save_checkpoint, write_json)

STABLE_BELOW = 2.0  # percentage points of error barrier (the paper's threshold)
ARCH_KEYS = ("model", "width", "dataset")


def train_config(config: dict, data_seed: int) -> training.TrainConfig:
    """The TrainConfig of a copy: the analysis' training with the data order of data_seed."""
    return desc.training_config(config, seed=data_seed)


def copy_config(config: dict, k: int, data_seed: int, masks: dict | None) -> dict:
    """The identity (config.json) of a copy trained from iteration k with the data order data_seed."""
    return {"command": "instability-copy", **config, "rewind_iteration": k, "data_seed": data_seed,
            "mask": mask_id(masks)}


def copy_name(config: dict, k: int, data_seed: int, masks: dict | None) -> str:
    """The folder name (under --runs-dir) of that copy."""
    return desc.copy_name(copy_config(config, k, data_seed, masks), config)


def out_name(oconfig: dict, config: dict) -> str:
    """The analysis' default folder name (under --runs-dir)."""
    return desc.instability_name(oconfig, config)


def mask_id(masks: dict | None) -> str | None:
    """A short content hash of a mask set (layer names and bits): a copy's identity names the mask
    it was trained with, not the folder it came from."""
    if masks is None:
        return None
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].to(torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def load_ticket(ticket: Path, rnd: int, config: dict, model: torch.nn.Module) -> dict:
    """The masks of round rnd of the IMP run in ticket, checked against the analysed network.
    Raises UsageError (one line) for a folder that is not an IMP run, a ticket of another
    architecture or initialisation, or a round that is not finished."""
    ticket = Path(ticket)
    try:
        tcfg = read_run_config(ticket)
    except UsageError as e:
        raise UsageError(f"--ticket: {e}") from None
    if tcfg.get("command") != "imp":
        raise UsageError(f"--ticket {ticket} is not a supermask.imp run")
    differ = [k for k in ARCH_KEYS if tcfg.get(k) != config[k]]
    if differ:
        raise UsageError(f"--ticket {ticket} is a ticket of another architecture ({tcfg.get('model')} x"
                         f"{tcfg.get('width')} on {tcfg.get('dataset')}); pass its --model, --width and --dataset")
    differ = [k for k in ("init", "seed") if tcfg.get(k) != config[k]]
    if differ:
        raise UsageError(f"--ticket {ticket} was found from another initialisation ("
                         f"{', '.join(f'{k} {tcfg.get(k)}, not {config[k]}' for k in differ)}); "
                         "pass the same --init and --seed")
    rdir = ticket / f"round_{rnd:02d}"
    if not (rdir / "results.json").is_file():
        raise UsageError(f"--ticket {ticket} has no finished round {rnd}")
    masks = load_checkpoint(rdir / "checkpoint.pt").get("masks")
    shapes = {n: tuple(m.weight.shape) for n, m in prunable_layers(model)}
    if masks is None or {n: tuple(m.shape) for n, m in masks.items()} != shapes:
        raise UsageError(f"--ticket {ticket}: the masks of round {rnd} do not fit this architecture")
    return {n: m.to(torch.bool) for n, m in masks.items()}


class _Reached(Exception):
    """Raised from after_step to stop the partial training pass at the last rewind iteration."""


def rewind_states(config: dict, ks: list[int], dataset, device, runs_dir: Path, backend: str, progress: bool,
                  log=print) -> tuple[Path, dict[int, dict]]:
    """The network's state_dict at each iteration in ks, trained from the initialisation with the
    data order of config's seed; stored in one folder (iter_NNNNNN.pt) and only computed when
    missing, by one training pass stopped at the largest missing k."""
    pconfig = {"command": "instability-rewind", **config}
    folder = runs_dir / desc.rewind_states_name(pconfig, config)
    path = {k: folder / f"iter_{k:06d}.pt" for k in ks}
    missing = [k for k in ks if not path[k].is_file()]
    if missing:
        if (folder / "config.json").is_file() and read_run_config(folder) != pconfig:
            raise UsageError(f"{folder} holds rewind states of another configuration; remove it")
        folder.mkdir(parents=True, exist_ok=True)
        with exclusive(folder):
            if not (folder / "config.json").is_file():
                write_json(folder / "config.json", pconfig)
            model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
            set_backend(model, backend)

            def snapshot(k):
                if not path[k].is_file():
                    save_checkpoint(path[k], {n: v.detach().cpu().clone() for n, v in model.state_dict().items()})

            if 0 in missing:
                snapshot(0)
            later = [k for k in missing if k > 0]
            if later:
                step = [0]

                def after_step(m):
                    step[0] += 1
                    if step[0] in later:
                        snapshot(step[0])
                    if step[0] >= later[-1]:
                        raise _Reached

                log(f"training from the initialisation to iteration {later[-1]} for the rewind states -> {folder}")
                with contextlib.suppress(_Reached):
                    training.train(model, dataset, train_config(config, config["seed"]), device, None,
                                   after_step=after_step, progress=progress, desc="rewind states ",
                                   log=lambda *_a, **_k: None)
    return folder, {k: load_checkpoint(path[k]) for k in ks}


def train_copy(config: dict, k: int, data_seed: int, start: dict, masks: dict | None, dataset, device,
               runs_dir: Path, backend: str, progress: bool, log=print, tensorboard: bool = True) -> Path:
    """Train the network from its state at iteration k to the end with the data order of
    data_seed (masks held fixed if given), in a training run folder named after all of that;
    a finished copy is only read, an interrupted one resumes. Returns the folder."""
    cconfig = copy_config(config, k, data_seed, masks)
    out = runs_dir / copy_name(config, k, data_seed, masks)
    if (out / "results.json").is_file():
        prepare_run_dir(out, cconfig, True)  # checks that it holds this configuration ("done")
        return out
    with contextlib.ExitStack() as held:
        state, resume, _ = open_run(out, cconfig, None, held)
        if state == "done":  # finished by another process a moment ago
            return out
        model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
        model.load_state_dict(start)
        set_backend(model, backend)
        model.to(device)
        keeper = MaskKeeper(model, masks) if masks is not None else None
        label = "ticket" if masks is not None else ("edge-popup" if not config["dense"] else "dense")
        log(f"{label} copy from iteration {k}, data order {data_seed} -> {out}")
        training.train(model, dataset, train_config(config, data_seed), device, out, resume, after_step=keeper,
                       progress=progress, desc=f"k={k} d={data_seed} ", log=log,
                       checkpoint_extra={"masks": masks} if masks is not None else None, start_step=k,
                       tensorboard=tensorboard, config=cconfig)
        if keeper is not None:
            keeper.remove()
    return out


def copy_digests(folders: list[Path]) -> list[str]:
    """SHA-256 of each copy's checkpoint.pt: what a stored error path (path_k*.json) was computed
    from, so that it is reused only for these very copies (not for copies trained again since)."""
    return [hashlib.sha256((Path(f) / "checkpoint.pt").read_bytes()).hexdigest() for f in folders]


def interpolate(state_a: dict, state_b: dict, alpha: float) -> dict:
    """(1 - alpha) * A + alpha * B for every floating tensor (exactly A at 0 and B at 1); integer
    buffers (BatchNorm's num_batches_tracked) are A's."""
    return {n: ((1 - alpha) * a + alpha * state_b[n]) if a.is_floating_point() else a.clone()
            for n, a in state_a.items()}


def error_path(config: dict, state_a: dict, state_b: dict, dataset, device, points: int, backend: str) -> list[dict]:
    """Test error (%) at `points` evenly spaced points of the linear path from A to B. With
    BatchNorm, its running statistics are re-estimated on the training set at every point
    (training.evaluate_untrained); without, the end points' errors are exactly the trained
    networks'. Returns [{"alpha", "test_error", "test_acc"}]."""
    cfg = train_config(config, config["seed"])
    rows = []
    for i in range(points):
        alpha = i / (points - 1)
        model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
        model.load_state_dict(interpolate(state_a, state_b, alpha))
        set_backend(model, backend)
        res = training.evaluate_untrained(model, dataset, cfg, device)
        rows.append({"alpha": alpha, "test_acc": res["test_acc"], "test_error": 100.0 - res["test_acc"]})
    return rows


def error_barrier(errors: list[float]) -> float:
    """max over the path of the error minus the mean of the two end points' errors (the same
    units as errors; 0 when the path is no worse than its ends)."""
    return max(errors) - (errors[0] + errors[-1]) / 2


def stability_to_pruning(ticket_state: dict, dense_state: dict, masks: dict) -> dict:
    """Frankle et al. 2019: || m * (W_ticket - W_dense) ||_2 over the kept weights of every masked
    layer, and that divided by || m * W_dense ||_2 (both networks trained from the same rewind
    point with the same data order)."""
    diff = dense = 0.0
    for name, m in masks.items():
        keep = m.to(torch.bool)
        a, b = ticket_state[f"{name}.weight"].double(), dense_state[f"{name}.weight"].double()
        diff += float(((a - b)[keep] ** 2).sum())
        dense += float((b[keep] ** 2).sum())
    return {"l2_distance": math.sqrt(diff), "normalised": math.sqrt(diff) / math.sqrt(dense) if dense else None}


def out_config(config: dict, mode: str, masks: dict | None, data_seeds: list[int], points: int) -> dict:
    """The analysis' identity (its config.json): the network and training (config), what is analysed
    (mode: "dense", "edge-popup" or "ticket"; the mask's content hash), the data orders and the
    number of points."""
    return {"command": "instability", **config, "mode": mode, "mask": mask_id(masks),
            "data_seeds": list(data_seeds), "points": points}


def check_out(out: Path, oconfig: dict):
    """UsageError unless out may hold the analysis oconfig (the same one, or nothing at all); writes nothing."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if (out / "config.json").is_file():
        stored = read_run_config(out)
        check_same_config(out, stored, oconfig, "an analysis")
    elif out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty folder that holds no instability analysis; choose another")


def prepare_out(out: Path, runs_dir: Path, oconfig: dict) -> None:
    """Before any training: check_out, --out and --runs-dir writable (a read-only place is one line,
    not a traceback), then out created holding the analysis' config.json."""
    check_out(out, oconfig)
    check_writable(out, "--out")
    check_writable(runs_dir, "--runs-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(write_error(out, e)) from None
    if not (out / "config.json").is_file():  # the identity holds the ticket's mask hash, not its folder
        write_json(out / "config.json", oconfig)


def write_table(rows: list[dict], out: Path, title: str):
    """table.md in out: one row per rewind iteration (end-point errors, largest error on the path, error barrier in
    percentage points, stable or not, stability to pruning)."""
    columns = ["rewind iteration:", "test error copy 1 (%):", "test error copy 2 (%):", "max error on path (%):",
               "error barrier (pp):", "stable (< 2 pp)", "stability to pruning (normalised L2):"]
    cells = []
    for r in rows:
        e = r["test_error"]
        stp = r.get("stability_to_pruning")
        stp = f"{stp['normalised']:.3f}" if stp and stp.get("normalised") is not None else "-"
        cells.append([str(r["rewind_iteration"]), f"{e[0]:.2f}", f"{e[-1]:.2f}", f"{max(e):.2f}", f"{r['barrier']:.2f}",
                      "yes" if r["stable"] else "no", stp])
    atomic_write(out / "table.md", markdown_table(title, columns, cells).encode())


def write_plot(rows: list[dict], out: Path, title: str):
    """plot.png in out: the test error along the linear path for each rewind iteration, and the error barrier
    against the rewind iteration."""
    import matplotlib  # noqa: PLC0415 (the axes' locators)

    fig, (ax_path, ax_bar) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        ax_path.plot(r["alpha"], r["test_error"], "o-", ms=3, label=f"k = {r['rewind_iteration']}")
    ax_path.set_xlabel("interpolation a: (1 - a) W1 + a W2")
    ax_path.set_ylabel("test error (%)")
    ax_path.set_title("error along the linear path")
    ax_path.legend(fontsize=8)
    ax_path.grid(True, alpha=0.3)
    ks = [r["rewind_iteration"] for r in rows]
    ax_bar.plot(ks, [r["barrier"] for r in rows], "s-")
    ax_bar.axhline(STABLE_BELOW, color="grey", ls="--", lw=1, label=f"stable below {STABLE_BELOW:g} pp")
    ax_bar.set_xscale("symlog", linthresh=max(1, min([k for k in ks if k > 0], default=1)))
    ax_bar.set_xticks(ks, [str(k) for k in ks])
    ax_bar.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax_bar.set_xlabel("rewind iteration k")
    ax_bar.set_ylabel("error barrier (percentage points)")
    ax_bar.set_title("instability vs rewind iteration")
    ax_bar.legend(fontsize=8)
    ax_bar.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, out / "plot.png", dpi=120)


def check_rewind_iters(ks: list[int], epochs: int, batch_size: int, dataset) -> None:
    """UsageError unless the largest rewind iteration of ks is before the end of training (epochs
    of ceil(training examples / batch_size) iterations)."""
    per_epoch = math.ceil(len(dataset.train_y) / batch_size)
    if ks[-1] >= epochs * per_epoch:
        raise UsageError(f"--rewind-iters {ks[-1]} is not before the end of training "
                         f"({epochs * per_epoch} iterations: --epochs {epochs} of {per_epoch})")


@dataclasses.dataclass
class Analysis:
    """One instability analysis: the network and its training (config, desc.instability_identity),
    the ticket's masks (None: dense or edge-popup), the two copies' data orders, the points on
    each path; where it runs (dataset, device, mask backend) and where its pieces are stored
    (runs_dir); progress bars, TensorBoard files in the copies' folders, log for its lines."""

    config: dict
    masks: dict | None
    data_seeds: list[int]
    points: int
    dataset: object
    device: torch.device
    backend: str
    runs_dir: Path
    progress: bool = True
    tensorboard: bool = True
    log: object = print


def analyse(a: Analysis, ks: list[int], out: Path) -> tuple[list[dict], dict]:
    """Every rewind iteration of ks (sorted): its two copies (and, for a ticket, the dense copy),
    its error path and barrier (and stability to pruning), each stored and reused (a path only
    when computed from these very copies: out/path_kNNNNNN.json). Returns (one row per k, the
    seconds spent on rewind states, copies and paths in this call). Hold out (exclusive) around it."""
    seconds = {"rewind_states": 0.0, "copies": 0.0, "paths": 0.0}
    t = time.perf_counter()
    _, states = rewind_states(a.config, ks, a.dataset, a.device, a.runs_dir, a.backend, a.progress, a.log)
    seconds["rewind_states"] = time.perf_counter() - t
    return [_analyse_k(a, k, states[k], out, seconds) for k in ks], seconds


def _analyse_k(a: Analysis, k: int, state: dict, out: Path, seconds: dict) -> dict:
    """The row of rewind iteration k (analyse), timing its copies and path into seconds."""
    path_file = out / f"path_k{k:06d}.json"
    t = time.perf_counter()
    copies = [train_copy(a.config, k, d, state, a.masks, a.dataset, a.device, a.runs_dir, a.backend, a.progress,
                         a.log, tensorboard=a.tensorboard) for d in a.data_seeds]
    dense_copy = (train_copy(a.config, k, a.data_seeds[0], state, None, a.dataset, a.device, a.runs_dir, a.backend,
                             a.progress, a.log, tensorboard=a.tensorboard) if a.masks is not None else None)
    seconds["copies"] += time.perf_counter() - t
    made_from = copy_digests([*copies, *([dense_copy] if dense_copy is not None else [])])
    if path_file.is_file():  # reused only when computed from these very copies
        stored = read_json_object(path_file)
        if stored.get("copies_sha256") == made_from:
            return stored
    t = time.perf_counter()
    finals = [load_checkpoint(c / "checkpoint.pt")["model"] for c in copies]
    path = error_path(a.config, finals[0], finals[1], a.dataset, a.device, a.points, a.backend)
    errors = [p["test_error"] for p in path]
    barrier = error_barrier(errors)
    row = {"rewind_iteration": k, "alpha": [p["alpha"] for p in path], "test_error": errors,
           "barrier": barrier, "stable": barrier < STABLE_BELOW,
           "copies": [str(c) for c in copies], "copies_sha256": made_from,
           "copies_test_acc": [read_json_object(c / "results.json")["test_acc"] for c in copies],
           "stability_to_pruning": None}
    if dense_copy is not None:
        row["dense_copy"] = str(dense_copy)
        row["stability_to_pruning"] = stability_to_pruning(
            finals[0], load_checkpoint(dense_copy / "checkpoint.pt")["model"], a.masks)
    write_json(path_file, row)
    seconds["paths"] += time.perf_counter() - t
    return row


def write_record(out: Path, title: str, record: dict) -> None:
    """table.md and plot.png of record["rows"] in out, then instability.json (record): last, as the
    analysis' record, once the table and plot are there."""
    write_table(record["rows"], out, title)
    write_plot(record["rows"], out, title)
    write_json(out / "instability.json", record)
