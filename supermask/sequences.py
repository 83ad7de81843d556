"""Task sequences (continual learning) on one frozen random network: a MaskBank learns one
supermask per task, in order (Wortsman, Ramanujan et al. 2020, SupSup, its GG scenario).

Benchmarks (BENCHMARKS), from an MNIST-like dataset of 28x28 images, 10 classes:

- **permuted**: task 0 the images as they are, task t >= 1 one fixed pixel permutation drawn from
  (seed, t) (``permutation``); 10 classes per task;
- **split**: task t the classes 2t and 2t+1, labelled 0 and 1 (at most 5 tasks); 2 outputs.

``run_sequence`` trains every task's scores in order (supermask.training.train, the defaults of
``python -m supermask.train``: SGD lr 0.1 momentum 0.9 weight decay 1e-4, cosine, batch 128, 5000
training images held out for validation), and after each task evaluates every task learned so
far with the task given (the accuracy matrix: acc[i][j] = task j's test accuracy after learning
task i, in %) and how often SupSup's one-shot task inference (supermask.supsup) names the right
task for a test batch of 128 among the tasks learned so far. After the last task: one-shot and
binary inference over all tasks, the accuracy with the one-shot inferred task, optional
single-task edge-popup baselines (a fresh network per task, same network, k, epochs, seed and
data order), and the files below.

The run folder holds config.json, task_NNN.pt per finished task (its masks at 1 bit per weight,
its accuracy row and inference accuracy; checksummed), baseline_NNN.json per finished baseline,
then results.json, matrix.csv, table.md and plot.png. A folder holding finished tasks continues
from the next one, bit for bit as an uninterrupted run (a task's training depends only on the
frozen network, its own initial scores and its data; earlier tasks come back from their stored
masks); a finished folder is only read; a folder made with other settings is refused (UsageError).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import data as data_mod
from . import desc, training
from .bank import MaskBank
from .errors import UsageError
from .runlog import pyplot, save_figure
from .storage import (atomic_write, check_same_config, exclusive, load_checkpoint, read_json_object,
                      save_checkpoint, write_json)
from .supsup import Superposition, infer_task

BENCHMARKS = ("permuted", "split")
SEQUENCE_DATASETS = ("fashion-mnist", "mnist", "synthetic")
INFERENCE_BATCH = 128  # SupSup's test batches: one task per batch
AFTER_TASK_BATCHES = 10  # after each task, one-shot inference on the first 10 test batches of every learned task
VAL_SIZE = 5000  # supermask.train's default
RESULT_KEYS = ("config", "matrix", "final_acc", "mean_acc", "inference", "bytes_per_task", "baselines")


def sequence_config(benchmark: str, tasks: int, epochs: int, width: float, k: float, seed: int,
                    dataset: str, baselines: int = 0) -> dict:
    """A task sequence's identity (its config.json). Raises UsageError for an unknown benchmark or
    dataset, fewer than 2 tasks, more than 5 split tasks, or baselines outside [0, tasks - 1]."""
    if benchmark not in BENCHMARKS:
        raise UsageError(f"--benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}")
    if dataset not in SEQUENCE_DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(SEQUENCE_DATASETS)}, got {dataset!r}")
    if tasks < 2:
        raise UsageError(f"--tasks must be at least 2 (task inference chooses among tasks), got {tasks}")
    if benchmark == "split" and tasks > 5:
        raise UsageError(f"--benchmark split has at most 5 tasks (10 classes, 2 per task), got --tasks {tasks}")
    if not 0 <= baselines < tasks:
        raise UsageError(f"--baselines must be in [0, {tasks - 1}] (tasks 1..N get single-task runs), got {baselines}")
    return {"command": "tasks", "benchmark": benchmark, "tasks": tasks, "epochs": epochs, "width": width, "k": k,
            "seed": seed, "dataset": dataset, "model": "fc", "baselines": baselines}


def sequence_name(config: dict) -> str:
    """The default run folder name: benchmark, tasks, dataset, width, k, epochs, seed, hash."""
    from .storage import config_hash  # noqa: PLC0415

    return (f"tasks_{config['benchmark']}{config['tasks']}_{config['dataset']}_w{config['width']:g}_"
            f"k{config['k']:g}_e{config['epochs']}_s{config['seed']}_{config_hash(config)}")


def network_config(config: dict) -> dict:
    """The supermask.train identity of the sequence's network (fc, signed constant, per-layer top-k):
    desc.build_model of it is what `python -m supermask.train` with these flags builds."""
    return vars(desc.defaults(desc.MODEL_FIELDS, desc.TRAIN_FIELDS, model="fc", width=config["width"],
                              k=config["k"], seed=config["seed"], init="signed_constant", topk="layer"))


def train_config(config: dict) -> training.TrainConfig:
    """Every task's training: supermask.train's defaults, config's epochs and seed (data order)."""
    return training.TrainConfig(epochs=config["epochs"], seed=config["seed"])


def num_outputs(config: dict) -> int:
    """10 for permuted tasks, 2 for split tasks."""
    return 2 if config["benchmark"] == "split" else 10


def permutation(task: int, seed: int, n: int) -> torch.Tensor:
    """Task ``task``'s pixel order (int64, (n,)): the identity for task 0, else a permutation drawn
    from (seed, task) alone."""
    if task == 0:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + task))


def task_split(config: dict, x: torch.Tensor, y: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One split (images (N, C, H, W), labels (N,)) as task ``task`` sees it: permuted pixels, or
    the images of classes 2t, 2t+1 labelled 0 and 1."""
    if config["benchmark"] == "permuted":
        flat = x.flatten(1)
        return flat[:, permutation(task, config["seed"], flat.shape[1])].view_as(x), y
    keep = (y == 2 * task) | (y == 2 * task + 1)
    return x[keep], y[keep] - 2 * task


def task_dataset(config: dict, dataset: data_mod.Dataset, task: int) -> data_mod.Dataset:
    """The Dataset of task ``task`` (train, val and test through task_split)."""
    parts = {}
    for split in ("train", "val", "test"):
        parts[f"{split}_x"], parts[f"{split}_y"] = task_split(config, getattr(dataset, f"{split}_x"),
                                                              getattr(dataset, f"{split}_y"), task)
    return data_mod.Dataset(f"{dataset.name}-{config['benchmark']}{task}", num_classes=num_outputs(config), **parts)


def build_bank(config: dict, input_shape) -> MaskBank:
    """The frozen random fc (desc.build_model of network_config) and a MaskBank of config's tasks
    over it (task 0: the network's own scores, so task 0 trains as supermask.train would)."""
    model = desc.build_model(network_config(config), input_shape, num_outputs(config))
    return MaskBank(model, config["tasks"], seed=config["seed"])


@torch.no_grad()
def task_accuracy(bank: MaskBank, task: int, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy (%) of the bank with task ``task``'s masks on (x, y)."""
    bank.set_task(task)
    bank.eval()
    return training.evaluate(bank.model, x, y)["acc"]


def inference_batches(config: dict, dataset: data_mod.Dataset, task: int, max_batches: int | None = None):
    """Task ``task``'s full test batches of INFERENCE_BATCH (x, y) (the last, partial batch left
    out), the first max_batches of them when given."""
    x, y = task_split(config, dataset.test_x, dataset.test_y, task)
    n = len(y) // INFERENCE_BATCH
    n = INFERENCE_BATCH * (n if max_batches is None else min(n, max_batches))
    return [(x[i:i + INFERENCE_BATCH], y[i:i + INFERENCE_BATCH]) for i in range(0, n, INFERENCE_BATCH)]


def inference_accuracy(bank: MaskBank, config: dict, dataset: data_mod.Dataset, tasks: int,
                       methods=("one-shot",), max_batches: int | None = None) -> dict:
    """Task inference over tasks 0..tasks-1 on every full test batch of each (the first max_batches
    of each when given): {method: fraction of
    batches assigned their task}, "batches": their number, and "acc_inferred": the test accuracy (%)
    over those batches with the first method's inferred task's masks."""
    sup = Superposition(bank, range(tasks))
    hits = dict.fromkeys(methods, 0)
    correct = seen = 0
    for task in range(tasks):
        for xb, yb in inference_batches(config, dataset, task, max_batches):
            guesses = {m: infer_task(sup, xb, m).task for m in methods}
            for m, guess in guesses.items():
                hits[m] += guess == task
            bank.set_task(guesses[methods[0]])
            bank.eval()
            with torch.no_grad():
                correct += int((bank(xb).argmax(1) == yb).sum())
            seen += len(yb)
    batches = seen // INFERENCE_BATCH
    return {**{m: hits[m] / max(1, batches) for m in methods}, "batches": batches,
            "acc_inferred": 100.0 * correct / max(1, seen)}


def open_sequence(out: Path, config: dict, held: contextlib.ExitStack) -> dict | None:
    """Open the run folder out for config: the finished results (results.json, checked) when it holds
    them, else None after taking its lock (into held) and removing a killed writer's temporary
    files. Creates out with config.json when new. Raises UsageError for a file in the way, a
    non-empty foreign folder, another configuration or a damaged results.json."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if (out / "config.json").is_file():
        check_same_config(out, read_json_object(out / "config.json", "; choose another --out"), config,
                          "a task sequence")
    elif out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is a non-empty folder that holds no task sequence; choose another")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
        write_json(out / "config.json", config)
    if (out / "results.json").is_file():
        return read_sequence_results(out, config)
    held.enter_context(exclusive(out))
    if (out / "results.json").is_file():  # finished by another process meanwhile
        return read_sequence_results(out, config)
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    return None


def read_sequence_results(out: Path, config: dict) -> dict:
    """results.json of the finished sequence in out; UsageError when it is damaged or another run's."""
    results = read_json_object(out / "results.json", "; delete it to write it again from the stored tasks")
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing or results["config"] != config:
        why = f"no {', '.join(missing)}" if missing else "its config differs"
        raise UsageError(f"{out / 'results.json'} is not this run's results ({why}); delete it to write it again "
                         "from the stored tasks")
    return results


def _task_file(out: Path, task: int) -> Path:
    return Path(out) / f"task_{task:03d}.pt"


def load_finished_tasks(out: Path, bank: MaskBank) -> list[dict]:
    """The stored tasks 0, 1, ... of out up to the first missing one, their masks loaded into bank;
    each {"row": accuracies (%) of tasks 0..t, "inferred": one-shot inference accuracy, "seconds"}.
    UsageError (one line) for a damaged or foreign task file."""
    done = []
    for task in range(bank.num_tasks):
        path = _task_file(out, task)
        if not path.is_file():
            break
        state = load_checkpoint(path, require=("masks", "row", "inferred", "seconds"))
        row = state["row"]
        if not isinstance(row, list) or len(row) != task + 1:
            raise UsageError(f"{path} does not hold task {task}'s accuracy row; delete it to train that task again")
        try:
            bank.load_task(task, state["masks"])
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise UsageError(f"{path} does not fit this network ({' '.join(str(e).split())[:120]}); delete it to "
                             "train that task again") from None
        done.append({"row": row, "inferred": state["inferred"], "seconds": state["seconds"]})
    return done


def learn_task(bank: MaskBank, config: dict, dataset: data_mod.Dataset, task: int, device: torch.device,
               progress: bool = True, log=print) -> float:
    """Train task ``task``'s scores (only those) on its data; returns the seconds it took."""
    start = time.perf_counter()
    bank.set_task(task)
    training.train(bank.model, task_dataset(config, dataset, task), train_config(config), device,
                   progress=progress, desc=f"task {task} ", log=log, tensorboard=False)
    return time.perf_counter() - start


def evaluate_after(bank: MaskBank, config: dict, dataset: data_mod.Dataset, task: int) -> dict:
    """After learning task ``task``: every learned task's test accuracy with the task given (the
    matrix row) and the one-shot inference accuracy among tasks 0..task on the first
    AFTER_TASK_BATCHES test batches of each (1.0 for task 0: one candidate)."""
    row = [task_accuracy(bank, j, *task_split(config, dataset.test_x, dataset.test_y, j)) for j in range(task + 1)]
    inferred = (inference_accuracy(bank, config, dataset, task + 1, max_batches=AFTER_TASK_BATCHES)["one-shot"]
                if task else 1.0)
    return {"row": row, "inferred": inferred}


def run_tasks(bank: MaskBank, config: dict, dataset, out: Path, device, progress: bool, log=print) -> list[dict]:
    """Learn (and store) every task not stored yet in out, in order; returns every task's record."""
    done = load_finished_tasks(out, bank)
    if done:
        log(f"{len(done)} of {config['tasks']} tasks already learned in {out}: continuing from task {len(done)}")
    for task in range(len(done), config["tasks"]):
        seconds = learn_task(bank, config, dataset, task, device, progress, log)
        record = {**evaluate_after(bank, config, dataset, task), "seconds": seconds}
        save_checkpoint(_task_file(out, task), {"masks": bank.pack_task(task), **record})
        log(f"task {task}: test accuracy {record['row'][-1]:.2f}%, mean over tasks 0..{task} "
            f"{statistics.fmean(record['row']):.2f}%, one-shot task inference {100 * record['inferred']:.1f}% "
            f"({seconds:.0f} s)")
        done.append(record)
    return done


def run_baselines(config: dict, dataset, out: Path, device, progress: bool, log=print) -> dict[int, float]:
    """Single-task edge-popup runs of tasks 1..config["baselines"]: a fresh network (the same one the
    bank masks, its own scores) trained on the task alone; {task: test accuracy %}, each stored as
    baseline_NNN.json when finished and read back after."""
    accs = {}
    for task in range(1, config["baselines"] + 1):
        path = Path(out) / f"baseline_{task:03d}.json"
        if path.is_file():
            stored = read_json_object(path, "; delete it to run that baseline again")
            if stored.get("config") != config or not isinstance(stored.get("test_acc"), float | int):
                raise UsageError(f"{path} is not this run's baseline; delete it to run that baseline again")
            accs[task] = float(stored["test_acc"])
            continue
        model = desc.build_model(network_config(config), dataset.input_shape, num_outputs(config))
        results = training.train(model, task_dataset(config, dataset, task), train_config(config), device,
                                 progress=progress, desc=f"baseline task {task} ", log=log, tensorboard=False)
        accs[task] = results["test_acc"]
        write_json(path, {"task": task, "test_acc": accs[task], "config": config})
        log(f"baseline task {task} (single-task edge-popup, fresh network): test accuracy {accs[task]:.2f}%")
    return accs


def run_sequence(config: dict, out: Path, dataset: data_mod.Dataset, device: torch.device | str = "cpu",
                 progress: bool = True, log=print) -> dict:
    """The whole task sequence of config in the run folder out (see the module): returns results.json's
    dict (read, nothing recomputed, when out already holds it). dataset: data_mod.load(config's
    dataset). Raises UsageError for a folder that cannot hold this run, or damaged stored files."""
    device = torch.device(device)
    with contextlib.ExitStack() as held:
        finished = open_sequence(out, config, held)
        if finished is not None:
            log(f"{out} already holds this finished task sequence (nothing recomputed)")
            return finished
        bank = build_bank(config, dataset.input_shape)
        bank.to(device)
        records = run_tasks(bank, config, dataset, out, device, progress, log)
        baselines = run_baselines(config, dataset, out, device, progress, log)
        log(f"task inference over all {config['tasks']} tasks (one-shot and binary) ...")
        final = inference_accuracy(bank, config, dataset, config["tasks"], ("one-shot", "binary"))
        results = summarise(config, bank, records, baselines, final)
        write_outputs(Path(out), results)
        return results


def summarise(config: dict, bank: MaskBank, records: list[dict], baselines: dict, final: dict) -> dict:
    """results.json's dict from the task records, baselines and the final inference accuracies."""
    matrix = [r["row"] for r in records]
    final_acc = matrix[-1]
    diagonal = [row[-1] for row in matrix]
    packed = bank.pack_task(0)
    given = [final_acc[t] for t in sorted(baselines)]
    cfg = train_config(config)
    return {
        "config": config, "train_config": {**asdict(cfg), "milestones": list(cfg.milestones)}, "matrix": matrix,
        "final_acc": final_acc,
        "mean_acc": statistics.fmean(final_acc), "min_acc": min(final_acc), "max_acc": max(final_acc),
        "acc_right_after": diagonal,
        "max_forgetting": max(d - f for d, f in zip(diagonal, final_acc)),
        "inferred_after_task": [r["inferred"] for r in records],
        "inference": {"batch_size": INFERENCE_BATCH, **final},
        "baselines": {str(t): a for t, a in sorted(baselines.items())},
        "baseline_mean": statistics.fmean(baselines.values()) if baselines else None,
        "bank_mean_on_baseline_tasks": statistics.fmean(given) if given else None,
        "bytes_per_task": sum(b.numel() for b in packed.values()),
        "weights": sum(layer.weight.numel() for layer in bank._layers),
        "seconds_per_task": [r["seconds"] for r in records],
    }


def write_outputs(out: Path, results: dict) -> None:
    """matrix.csv, table.md and plot.png from results, then results.json (last: it marks the run finished)."""
    atomic_write(out / "matrix.csv", matrix_csv(results["matrix"]).encode())
    atomic_write(out / "table.md", table_md(results).encode())
    write_plot(out / "plot.png", results)
    write_json(out / "results.json", results)


def matrix_csv(matrix: list[list[float]]) -> str:
    """The accuracy matrix as CSV: one row per task learned (after_task), one column per task; a task
    not learned yet is empty."""
    n = len(matrix)
    lines = ["after_task," + ",".join(f"task_{j}" for j in range(n))]
    for i, row in enumerate(matrix):
        lines.append(f"{i}," + ",".join(f"{row[j]:.2f}" if j < len(row) else "" for j in range(n)))
    return "\n".join(lines) + "\n"


def table_md(results: dict) -> str:
    """table.md: the summary lines and one row per task (right after learning it, after all tasks,
    single-task baseline)."""
    c, inf = results["config"], results["inference"]
    lines = [f"# {c['benchmark']} {c['dataset']}, {c['tasks']} tasks, fc width {c['width']:g}, k {c['k']:g}, "
             f"{c['epochs']} epoch(s) per task, seed {c['seed']}", "",
             f"- mean test accuracy, task given: {results['mean_acc']:.2f}% (min {results['min_acc']:.2f}%, "
             f"max {results['max_acc']:.2f}%); largest drop of a task after later tasks: "
             f"{results['max_forgetting']:.2f} points",
             f"- task inference over {inf['batches']} test batches of {inf['batch_size']}: one-shot "
             f"{100 * inf['one-shot']:.2f}%, binary {100 * inf['binary']:.2f}% right; accuracy with the one-shot "
             f"inferred task {inf['acc_inferred']:.2f}%",
             f"- bytes per task: {results['bytes_per_task']:,} ({results['weights']:,} weights, 1 bit each)"]
    if results["baseline_mean"] is not None:
        lines.append(f"- single-task edge-popup baselines (tasks 1..{c['baselines']}): mean "
                     f"{results['baseline_mean']:.2f}% vs the bank's {results['bank_mean_on_baseline_tasks']:.2f}% "
                     "on the same tasks")
    lines += ["", "| task t | right after learning it (%) | after all tasks (%) | single-task baseline (%) | "
              f"one-shot inference among tasks 0..t, after t (%, first {AFTER_TASK_BATCHES} batches of each) |",
              "|---:|---:|---:|---:|---:|"]
    for t, (d, f) in enumerate(zip(results["acc_right_after"], results["final_acc"])):
        base = results["baselines"].get(str(t))
        inferred = 100 * results["inferred_after_task"][t]
        lines.append(f"| {t} | {d:.2f} | {f:.2f} | {'' if base is None else f'{base:.2f}'} | {inferred:.1f} |")
    return "\n".join(lines) + "\n"


def write_plot(path: Path, results: dict) -> None:
    """plot.png: the accuracy matrix (left) and each task's final accuracy with the task given, the
    baselines and the one-shot inferred-task accuracy (right)."""
    plt = pyplot()
    matrix = results["matrix"]
    n = len(matrix)
    grid = [[row[j] if j < len(row) else math.nan for j in range(n)] for row in matrix]
    fig, (ax_m, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    image = ax_m.imshow(grid, cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax_m, label="test accuracy (%)")
    ax_m.set_xlabel("task evaluated")
    ax_m.set_ylabel("after learning task")
    ax_f.bar(range(n), results["final_acc"], color="tab:blue", label="bank, task given (after all tasks)")
    if results["baselines"]:
        ts = [int(t) for t in results["baselines"]]
        ax_f.plot(ts, list(results["baselines"].values()), "o", color="tab:orange", label="single-task baseline")
    ax_f.axhline(results["inference"]["acc_inferred"], color="tab:red", ls="--", label="task inferred (one-shot)")
    low = min([*results["final_acc"], results["inference"]["acc_inferred"], *results["baselines"].values()])
    ax_f.set_ylim(max(0.0, low - 5), 100)
    ax_f.set_xlabel("task")
    ax_f.set_ylabel("test accuracy (%)")
    ax_f.legend(loc="lower right", fontsize=8)
    for axis in (ax_m.xaxis, ax_m.yaxis, ax_f.xaxis):  # tasks are whole numbers
        axis.set_major_locator(plt.MaxNLocator(integer=True))
    c = results["config"]
    fig.suptitle(f"{c['benchmark']} {c['dataset']}: {n} tasks on one random fc (width {c['width']:g}, k {c['k']:g})")
    save_figure(fig, path, dpi=100)
