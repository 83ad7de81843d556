"""What a run shows besides its JSON files: TensorBoard event files and curves.png.

Every epoch of a run (supermask.train, each IMP round) is logged with torch.utils.tensorboard into
the run folder, so ``tensorboard --logdir runs`` shows every run (tags as hidden-networks users
know them: loss/*, accuracy/* for train, val and test, lr, one kept fraction and one histogram of
the scores, or of the weights for a dense / IMP network, per prunable layer). The x axis is the
epoch (1-based). TensorBoard is an optional dependency (``pip install 'supermask[tensorboard]'``):
without it the run says so once on stderr and trains on. When a run ends, curves.png (loss and
accuracy per epoch, train / val / test, drawn with matplotlib) joins its folder.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .layers import supermask_layers
from .storage import atomic_write

_said_unavailable = False


def _summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or None (saying so once) when tensorboard is missing."""
    global _said_unavailable
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional dependency)
    except ImportError:
        if not _said_unavailable:
            print("tensorboard is not installed: not logging to TensorBoard (pip install 'supermask[tensorboard]', "
                  "or pass --no-tensorboard to silence this)", file=sys.stderr)
            _said_unavailable = True
        return None
    return SummaryWriter


class TensorBoardLog:
    """Event files of one run folder. enabled=False or out=None (another rank, no folder): a no-op.

    epoch(row, model) logs one metrics.jsonl row (keys train_loss, train_acc, val_loss, val_acc,
    test_loss, test_acc, test_acc5, lr; accuracies in %) at step row["epoch"], and per prunable
    layer (named as in model.named_modules()) the fraction of its weights kept and a histogram
    of its scores (supermask layers) or weights (ordinary layers: dense or IMP networks, where
    pruned weights are exact zeros)."""

    SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "loss/test": "test_loss",
               "accuracy/train": "train_acc", "accuracy/val": "val_acc", "accuracy/test": "test_acc",
               "accuracy/test_top5": "test_acc5", "lr": "lr"}

    def __init__(self, out: Path | None, enabled: bool = True):
        self.writer = None
        if out is not None and enabled:
            writer_class = _summary_writer_class()
            if writer_class is not None:
                self.writer = writer_class(log_dir=str(out))

    @torch.no_grad()
    def epoch(self, row: dict, model: nn.Module) -> None:
        """Log one epoch's metrics row at its epoch, and each prunable layer's kept fraction (and a supermask
        layer's score histogram)."""
        if self.writer is None:
            return
        step = row["epoch"]
        for tag, key in self.SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], step)
        masked = dict(supermask_layers(model))
        for name, module in model.named_modules():
            if name in masked:
                self.writer.add_scalar(f"kept_fraction/{name}", masked[name].mask().float().mean().item(), step)
                self.writer.add_histogram(f"scores/{name}", masked[name].scores.detach().float().cpu(), step)
            elif isinstance(module, nn.Linear | nn.Conv2d):
                weight = module.weight.detach()
                self.writer.add_scalar(f"kept_fraction/{name}", (weight != 0).float().mean().item(), step)
                self.writer.add_histogram(f"weights/{name}", weight.float().cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def markdown_table(title: str, columns: list[str], rows: list[list[str]]) -> str:
    """A bold title line, then a GitHub-markdown table: ``columns`` are the header cells, a trailing
    ":" on one (``"test acc (%):"``) right-aligns that column (the colon is not shown); ``rows`` the
    cells, already formatted. Returns the text, ending in a newline."""
    head = [c[:-1] if c.endswith(":") else c for c in columns]
    rule = ["---:" if c.endswith(":") else "---" for c in columns]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported when a figure is made."""
    import matplotlib  # noqa: PLC0415 (only when a figure is drawn)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def save_figure(fig, path: Path, dpi: int) -> None:
    """Lay fig out, render it to PNG in memory and write it with storage.atomic_write (a failed write,
    a full disk included, is a one-line UsageError and leaves no truncated PNG); fig is closed."""
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def write_curves(path: Path, metrics: list[dict], title: str = "") -> None:
    """curves.png: loss (left) and accuracy in % (right) per epoch for train, val and test, from
    the metrics.jsonl rows. A run that trained no epoch (a random subnetwork) shows its val and
    test accuracy at epoch 0 when the rows hold them."""
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, what in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
            points = [(m.get("epoch", 0), m[f"{split}_{what}"]) for m in metrics
                      if m.get(f"{split}_{what}") is not None]
            if points:
                ax.plot(*zip(*points), style, marker="o" if len(points) < 20 else None, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if what == "loss" else "accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path, dpi=100)
