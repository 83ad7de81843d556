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

import copy
import hashlib
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from .cli import Parser, run_main
from .layers import NonAffineBatchNorm, SupermaskConv2d, SupermaskLinear, supermask_layers
from .errors import UsageError
from .storage import atomic_write, load_checkpoint, read_run_config

PROG = "python -m supermask.export"
FORMAT = "supermask-compact"
FORMAT_VERSION = 1

# Inputs of the datasets supermask.data knows (so exporting needs no dataset on disk).
DATASET_SHAPES = {"mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10), "synthetic": ((1, 28, 28), 10),
                  "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}

class CompactFileError(UsageError):
    """A compact file that cannot be read: not one, truncated, corrupted or of another version."""


# ---------------------------------------------------------------------------------------------
# Bits


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor (any shape, flattened) as ceil(n / 8) uint8s, bit i of byte j = entry 8j + i
    (numpy.packbits, little bit order)."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of pack_bits: the bool tensor of the given shape (numpy.unpackbits)."""
    n = math.prod(shape)
    bits = np.unpackbits(packed.detach().to("cpu").numpy(), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def _tensor_bytes_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' raw little-endian bytes, concatenated in the order of their names.
    (Files written before the safetensors package was used stored the data in this order, so this
    is also the SHA-256 of their data section.)"""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Runs


def run_kind(config) -> str | None:
    """'train', 'imp' (a whole IMP run) or 'imp-round' (one round folder of it), or None. A round's
    config.json is the IMP run's config plus "round" (its "command" may read "imp")."""
    if not isinstance(config, dict):
        return None
    command = config.get("command")
    if command == "imp-round" or (command == "imp" and "round" in config):
        return "imp-round"
    return command if command in ("train", "imp") else None


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """(config, checkpoint) of a training run folder or IMP round folder; UsageError otherwise."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    command = run_kind(config)
    if command == "imp":
        rounds = sorted(p.name for p in run_dir.glob("round_[0-9][0-9]") if (p / "results.json").is_file())
        hint = f", e.g. {run_dir / rounds[-1]}" if rounds else ""
        raise UsageError(f"{run_dir} is a whole IMP run: pass one of its round folders{hint}")
    if command not in ("train", "imp-round"):
        raise UsageError(f"{run_dir} is not a supermask.train run or an IMP round folder")
    ckpt_path = run_dir / "checkpoint.pt"
    if not ckpt_path.is_file():
        raise UsageError(f"{run_dir} has no checkpoint.pt (the run has not finished an epoch)")
    return config, load_checkpoint(ckpt_path, require=("model",))


def shapes_of(config: dict, data_dir: str | os.PathLike = "data") -> tuple[tuple[int, ...], int]:
    """(input_shape, num_classes) of a run's dataset."""
    if config["dataset"] in DATASET_SHAPES:
        return DATASET_SHAPES[config["dataset"]]
    from . import data as data_mod  # noqa: PLC0415
    ds = data_mod.load(config["dataset"], data_dir, config.get("val_size", 5000))
    return ds.input_shape, ds.num_classes


def is_supermask_run(config: dict) -> bool:
    return config.get("command") == "train" and not config.get("dense")


def dense_config(config: dict) -> dict:
    """The build_model config of an IMP round (a dense network of the IMP run's init and seed)."""
    return {"model": config["model"], "width": config["width"], "dense": True, "init": config["init"],
            "seed": config["seed"]}


def build_run_model(config: dict, checkpoint: dict, input_shape, num_classes: int) -> tuple[nn.Module, dict | None]:
    """The trained network of a run in eval mode on the CPU, and its IMP masks (None for a train run)."""
    from .train import build_model  # noqa: PLC0415

    masks = None
    if run_kind(config) == "imp-round":
        model = build_model(dense_config(config), input_shape, num_classes)
        masks = checkpoint.get("masks")
        if not isinstance(masks, dict):
            raise UsageError("the IMP round's checkpoint.pt holds no masks")
    else:
        model = build_model(config, input_shape, num_classes)
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as e:
        raise UsageError(f"the checkpoint does not fit the network its config.json describes ({str(e)[:120]})") from None
    model.eval()
    prime(model, input_shape)
    return model, masks


@torch.no_grad()
def prime(model: nn.Module, input_shape) -> None:
    """One forward pass in eval mode, so model-level hooks (global top-k) have set their thresholds."""
    was = model.training
    model.eval()
    model(torch.zeros((1, *input_shape), device=next(model.parameters()).device))
    model.train(was)


def supermask_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: bool mask} of every supermask layer (call prime first for global top-k)."""
    return {name: layer.mask().cpu() for name, layer in supermask_layers(model)}


# ---------------------------------------------------------------------------------------------
# Compact files


def _check_compactable(model: nn.Module, config: dict) -> None:
    if not is_supermask_run(config):
        raise UsageError("--compact needs a supermask (edge-popup) run: a dense run or an IMP ticket has "
                         "trained weights, not 1 bit per weight; export it without --compact")
    if config.get("mask", "topk") != "topk":
        raise UsageError("--compact needs top-k masks; a --mask sampled run evaluates with expected (not 0/1) "
                         "masks. Export it without --compact")
    if config.get("seed") is None:
        raise UsageError("--compact needs a seeded run (its weights are regenerated from the seed)")


def compact_bytes(model: nn.Module, config: dict, input_shape, num_classes: int) -> bytes:
    """The compact file of a supermask model (as build_model(config) made it, then trained)."""
    _check_compactable(model, config)
    layers = dict(supermask_layers(model))
    prime(model, input_shape)
    tensors, mask_shapes = {}, {}
    for name, layer in layers.items():
        tensors[f"mask.{name}"] = pack_bits(layer.mask())
        mask_shapes[name] = list(layer.weight.shape)
    skip = {f"{name}.{p}" if name else p for name in layers for p in ("weight", "scores")}
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[f"state.{key}"] = value
    metadata = {"format": FORMAT, "version": str(FORMAT_VERSION),
                "config": json.dumps(config, sort_keys=True, separators=(",", ":")),
                "input_shape": json.dumps(list(input_shape)), "num_classes": str(num_classes),
                "masks": json.dumps(mask_shapes, separators=(",", ":")), "sha256": _tensor_bytes_sha256(tensors)}
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)


def read_compact(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], tuple, int]:
    """(config, masks, other state entries, input_shape, num_classes) of a compact file."""
    path = Path(path)
    bad = lambda why: CompactFileError(f"{path} is not a valid compact supermask file ({why})")  # noqa: E731
    if not path.is_file():
        raise UsageError(f"cannot read {path}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except safetensors.SafetensorError as e:
        raise bad(f"not a safetensors file: {str(e).splitlines()[0][:100]}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if meta.get("format") != FORMAT:
        raise bad("no supermask-compact metadata")
    if meta.get("version") != str(FORMAT_VERSION):
        raise bad(f"format version {meta.get('version')}, this supermask reads {FORMAT_VERSION}")
    if _tensor_bytes_sha256(tensors) != meta.get("sha256"):
        raise bad("checksum mismatch: the data is corrupted")
    try:
        config = json.loads(meta["config"])
        input_shape = tuple(int(s) for s in json.loads(meta["input_shape"]))
        num_classes = int(meta["num_classes"])
        mask_shapes = json.loads(meta["masks"])
        masks = {}
        for name, shape in mask_shapes.items():
            packed = tensors[f"mask.{name}"]
            if packed.dtype != torch.uint8 or packed.numel() != math.ceil(math.prod(shape) / 8):
                raise ValueError(name)
            masks[name] = unpack_bits(packed, shape)
    except (KeyError, ValueError, TypeError):
        raise bad("inconsistent metadata") from None
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    return config, masks, state, input_shape, num_classes


def load_compact(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The supermask model of a compact file, in eval mode on device: weights regenerated from the
    seed, each layer's scores set to its mask (1.0 kept, 0.0 dropped). A file that is not a valid
    compact file raises CompactFileError (a UsageError) with a one-line message."""
    return load_compact_run(path, device)[0]


def load_compact_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict, tuple, int]:
    """(model, config, input_shape, num_classes) of a compact file; see load_compact."""
    from .train import build_model  # noqa: PLC0415

    config, masks, state, input_shape, num_classes = read_compact(path)
    try:
        model = build_model(config, input_shape, num_classes)
    except (KeyError, ValueError, TypeError) as e:
        raise CompactFileError(f"{path}: its config does not describe a network this supermask builds ({e})") from None
    layers = dict(supermask_layers(model))
    if set(layers) != set(masks) or any(tuple(layers[n].weight.shape) != tuple(m.shape) for n, m in masks.items()):
        raise CompactFileError(f"{path}: its masks do not fit the network its config describes")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.scores.copy_(masks[name].to(layer.scores.dtype))
    missing = [k for k in model.state_dict() if k not in state and not any(
        k in (f"{n}.weight", f"{n}.scores") for n in layers)]
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError:
        raise CompactFileError(f"{path}: its stored tensors do not fit the network its config describes") from None
    if missing:
        raise CompactFileError(f"{path}: entries missing for {', '.join(missing[:3])}")
    model.to(device).eval()
    prime(model, input_shape)
    got = supermask_masks(model)
    if any(not torch.equal(got[n], masks[n]) for n in masks):
        raise CompactFileError(f"{path}: its masks do not keep the fraction k its config names")
    return model, config, input_shape, num_classes


# ---------------------------------------------------------------------------------------------
# Deployable models


@torch.no_grad()
def bake(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of model made of plain torch.nn modules: every supermask layer an nn.Linear / nn.Conv2d
    holding weight * mask (eval-mode effective weight), every NonAffineBatchNorm an
    nn.BatchNorm2d(affine=False) with its running statistics; with masks (IMP), weight * mask for
    those layers. Call prime(model) first for global top-k."""
    model.eval()
    effective = {name: layer.effective_weight().detach().clone() for name, layer in supermask_layers(model)}
    out = copy.deepcopy(model)
    hook = getattr(out, "_supermask_global_hook", None)
    if hook is not None:
        hook.remove()
        del out._supermask_global_hook
    out._forward_pre_hooks.clear()
    for parent_name, parent in list(out.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = None
            if isinstance(child, SupermaskLinear):
                new = nn.Linear(child.in_features, child.out_features, bias=False)
            elif isinstance(child, SupermaskConv2d):
                new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                child.padding, child.dilation, child.groups, bias=False,
                                padding_mode=child.padding_mode)
            elif isinstance(child, NonAffineBatchNorm):
                new = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, affine=False,
                                     track_running_stats=child.track_running_stats)
                new.load_state_dict(child.state_dict())
            if isinstance(new, nn.Linear | nn.Conv2d):
                new.weight.copy_(effective[full])
                new.weight.requires_grad_(False)
            if new is not None:
                setattr(parent, child_name, new.eval())
    for name, mask in (masks or {}).items():
        layer = out.get_submodule(name)
        layer.weight.mul_(mask.to(layer.weight.dtype))
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()


def deployable(model: nn.Module, masks: dict[str, torch.Tensor] | None, bake_masks: bool = False,
               baked: nn.Module | None = None) -> nn.Module:
    """What the .pt2 holds: the supermask model itself in eval mode (per-layer top-k supermasks, whose
    ops export as they are), else (bake_masks, IMP masks, global top-k: a model-level hook) the baked
    model: plain layers holding weight * mask, loadable with torch alone (baked: bake(model, masks)
    when the caller has it already)."""
    if (not bake_masks and masks is None and supermask_layers(model)
            and getattr(model, "_supermask_global_hook", None) is None):
        return model.eval()
    return baked if baked is not None else bake(model, masks)


def export_program(model: nn.Module, input_shape):
    """torch.export's program of a model in eval mode, with a dynamic batch dimension."""
    example = torch.zeros((2, *input_shape))
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def fp32_state_dict_bytes(model: nn.Module) -> int:
    """Size of torch.save(state_dict) of the inference network in float32 (weights and buffers)."""
    buf = io.BytesIO()
    torch.save({k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}, buf)
    return buf.getbuffer().nbytes


# ---------------------------------------------------------------------------------------------
# CLI


@torch.no_grad()
def _accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy (%) and all logits; calls no .eval() (an exported program refuses it)."""
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return 100.0 * (logits.argmax(1) == y).float().mean().item(), logits


def parser() -> Parser:
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
