"""Tickets as artifacts: a compact supermask file, and a deployable model that needs only torch.

    python -m supermask.export RUN_DIR --compact --out model.smask   # config + seed + 1 bit per weight
    python -m supermask.export RUN_DIR --out model.pt2               # deployable model (torch.export)

Compact file (edge-popup runs): a supermask model is its config (which names the seed that
generated the frozen weights) plus one bit per weight. The file is a safetensors file (an 8-byte
little-endian header length, a JSON header, raw little-endian tensor bytes), written and read with
the safetensors package (``safetensors.torch.load_file`` reads it too): no pickle anywhere. It holds
one bit-packed uint8 tensor per supermask layer ("mask.<layer>") and every other state-dict entry
as it is ("state.<key>": BatchNorm running statistics, the weights of a --first/last-layer-dense
layer); the header's metadata holds the config, the input shape, the mask shapes and a SHA-256 of
the data, so a corrupted or truncated file is refused. ``load_compact(path)`` regenerates the
weights from the seed (on the CPU, then moved: the same on any device) and sets each layer's
scores to its mask (1 kept, 0 dropped), so the model computes exactly what the trained one did.

Deployable model (a .pt2 file written by torch.export): for an edge-popup run with per-layer top-k,
the supermask model itself in eval mode, its supermask ops (``supermask.ops``) in the graph, nothing
baked: load it with ``import supermask; torch.export.load(path).module()(x)`` (the import registers
the ops). With ``--bake``, and always for IMP round folders and global top-k runs: the network with
weight * mask baked into ordinary nn.Linear / nn.Conv2d / BatchNorm layers, loadable with only torch
and as fast as a dense network (the masks are not selected again on every call). The batch
dimension is dynamic.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UsageError
from .storage import atomic_write
from .cli import Parser, run_main
from .baking import bake, deployable, export_program, fp32_state_dict_bytes  # noqa: F401 (tests and README use them here)
from .compact import (DATASET_SHAPES, build_run_model, compact_bytes, load_compact, load_compact_run,  # noqa: F401
                      FORMAT, CompactFileError, pack_bits, read_compact, read_run, shapes_of, unpack_bits)
# (load_compact, bake ...: the README and tests import them from here)

PROG = "python -m supermask.export"


# ---------------------------------------------------------------------------------------------
# CLI


@torch.no_grad()
def _accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy (%) and all logits; calls no .eval() (an exported program refuses it)."""
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return 100.0 * (logits.argmax(1) == y).float().mean().item(), logits


def parser() -> Parser:
    """The flags of python -m supermask.export."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a supermask.train run folder, an IMP round folder, or a compact file (to make it deployable)")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--compact", action="store_true",
                   help="write the compact supermask file (config + seed + 1 bit per weight) instead of a "
                        "deployable torch.export model")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--bake", action="store_true",
                   help="deployable model: bake weight * mask into plain layers (loads with torch alone, "
                        "no selection per call) instead of exporting the supermask ops")
    p.add_argument("--evaluate", action="store_true",
                   help="load the written file again and compare its test accuracy with the run's")
    p.add_argument("--data-dir", default="data", help="where datasets are found (default ./data)")
    return p


SUFFIXES = {"compact": ".smask", "deployable": ".pt2"}


def output_path(out: Path, compact: bool, source: Path) -> Path:
    """--out with the suffix of its format (added when it has none; UsageError when it has another),
    refused when it is one of the files read (the compact file, or the run's own files)."""
    kind = "compact" if compact else "deployable"
    suffix = SUFFIXES[kind]
    if out.is_dir() or not out.name:
        raise UsageError(f"--out {out} is a folder; name the file to write")
    if not out.suffix:
        out = out.with_name(out.name + suffix)
    elif out.suffix != suffix:
        raise UsageError(f"--out {out}: a {kind} file is named *{suffix}"
                         + (" (add --compact for a .smask file)" if out.suffix == SUFFIXES["compact"] else "")
                         + (" (drop --compact for a .pt2 file)" if out.suffix == SUFFIXES["deployable"] else ""))
    inputs = [source] if source.is_file() else [source / n for n in ("config.json", "checkpoint.pt", "results.json")]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise UsageError(f"--out {out} is one of the inputs; choose another file")
    return out


def main(argv=None) -> int:
    """python -m supermask.export: write a run's compact file or deployable model; returns the exit code."""
    args = parser().parse_args(argv)
    out = output_path(Path(args.out), args.compact, Path(args.run_dir))
    if out.exists() and (out.is_dir() or not args.force):
        raise UsageError(f"--out {out} exists; pass --force to overwrite it" if not out.is_dir()
                         else f"--out {out} is a folder")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    source = Path(args.run_dir)
    if source.is_file():  # a compact file
        model, config, input_shape, num_classes = load_compact_run(source)
        masks = None
    else:
        config, checkpoint = read_run(source)
        input_shape, num_classes = shapes_of(config, args.data_dir)
        model, masks = build_run_model(config, checkpoint, input_shape, num_classes)
    ds = None
    if args.evaluate:  # read the test set before anything is written: bad data must leave no --out behind
        from . import data as data_mod  # noqa: PLC0415
        ds = data_mod.load(config["dataset"], args.data_dir, config.get("val_size", 5000))
    baked = bake(model, masks)
    dense_bytes = fp32_state_dict_bytes(baked)
    n_weights = sum(m.weight.numel() for m in baked.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    if args.compact:
        data = compact_bytes(model, config, input_shape, num_classes)
        atomic_write(out, data)  # a failed write (full disk) is a one-line UsageError
        size = out.stat().st_size
        print(f"{out}: compact supermask, {size:,} bytes for {n_weights:,} weights "
              f"({8 * size / n_weights:.3f} bits/weight); fp32 state dict {dense_bytes:,} bytes: "
              f"{dense_bytes / size:.1f}x smaller")
    else:
        target = deployable(model, masks, args.bake, baked)
        program = export_program(target, input_shape)
        buf = io.BytesIO()  # serialised in memory: a full disk is then an OSError of Python's, not a C++ abort
        torch.export.save(program, buf)
        atomic_write(out, buf.getvalue())
        how = ("import supermask; " if target is model else "") + "torch.export.load(path).module()"
        print(f"{out}: deployable model (torch.export; load with {how}), "
              f"{out.stat().st_size:,} bytes; fp32 state dict {dense_bytes:,} bytes")
    if ds is not None:
        loaded = load_compact(out) if args.compact else torch.export.load(str(out)).module()
        before, logits_a = _accuracy(model, ds.test_x, ds.test_y)
        after, logits_b = _accuracy(loaded, ds.test_x, ds.test_y)
        same = "bit-identical" if torch.equal(logits_a, logits_b) else \
            f"differ by at most {(logits_a - logits_b).abs().max().item():.3g}"
        print(f"test accuracy: run {before:.2f}%, loaded from {out} {after:.2f}%; test logits {same}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
