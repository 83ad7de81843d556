"""The compact supermask file and the run reader: a trained run as config + seed + 1 bit per weight.

A supermask model is its config (which names the seed that generated the frozen weights) plus one
bit per weight. The file is a safetensors file (an 8-byte little-endian header length, a JSON
header, raw little-endian tensor bytes), written and read with the safetensors package: no pickle
anywhere. It holds one bit-packed uint8 tensor per supermask layer ("mask.<layer>") and every other
state-dict entry as it is ("state.<key>"); the header's metadata holds the config, the input shape,
the number of classes, the mask shapes and a SHA-256 (format version 2) of everything the file's
meaning depends on: every metadata field but the checksum itself, and each tensor's name, dtype,
shape and bytes. A file changed anywhere (a seed in its config, a shape, a renamed or retyped
tensor, one data byte) is refused in one line. Version 1 files (checksum of the tensor bytes only)
are refused too: nothing can verify their config, so export the run again.
load_compact(path) regenerates the weights from the seed and sets each layer's scores to its mask.

The run reader (read_run, run_kind, build_run_model, shapes_of) opens a finished train run or IMP
round folder for supermask.export and supermask.analyze.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from .layers import supermask_layers
from .errors import UsageError
from .storage import load_checkpoint, read_run_config


FORMAT = "supermask-compact"
FORMAT_VERSION = 2

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


def compact_sha256(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """The version-2 checksum of a compact file: SHA-256 of its metadata (every field but "sha256",
    as key-sorted JSON) and of each tensor in name order (its name, dtype, shape, then its raw
    little-endian bytes), each part length-prefixed so no two files share one input."""
    h = hashlib.sha256()

    def part(b: bytes):
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    part(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        part(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        part(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
    from .desc import config_problem  # noqa: PLC0415

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    problem = config_problem(config)
    if problem:
        raise UsageError(f"{run_dir / 'config.json'} is damaged: {problem}")
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
    """Whether config is a train run with a mask (edge-popup, sampled or a random subnetwork), not dense."""
    return config.get("command") == "train" and not config.get("dense")


def dense_config(config: dict) -> dict:
    """The build_model config of an IMP round (a dense network of the IMP run's init and seed)."""
    return {"model": config["model"], "width": config["width"], "dense": True, "init": config["init"],
            "seed": config["seed"]}


def build_run_model(config: dict, checkpoint: dict, input_shape, num_classes: int) -> tuple[nn.Module, dict | None]:
    """The trained network of a run in eval mode on the CPU, and its IMP masks (None for a train run)."""
    from .desc import build_model  # noqa: PLC0415

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
        raise UsageError("the checkpoint does not fit the network its config.json describes "
                         f"({str(e)[:120]})") from None
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
                "masks": json.dumps(mask_shapes, separators=(",", ":"))}
    metadata["sha256"] = compact_sha256(metadata, tensors)
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)


def _positive_ints(values) -> tuple[int, ...]:
    """values (a JSON list) as a tuple of positive ints; ValueError for anything else."""
    if not isinstance(values, list) or not all(type(v) is int and v > 0 for v in values):
        raise ValueError(values)
    return tuple(values)


def _parse_metadata(meta: dict, tensors: dict) -> tuple[dict, tuple, int, dict]:
    """(config, input_shape, num_classes, {layer: bool mask}) of a compact file's verified metadata;
    ValueError/KeyError/TypeError where a field has the wrong type or does not fit the tensors."""
    config = json.loads(meta["config"])
    if not isinstance(config, dict):
        raise ValueError("config")
    input_shape = _positive_ints(json.loads(meta["input_shape"]))
    (num_classes,) = _positive_ints([json.loads(meta["num_classes"])])
    mask_shapes = json.loads(meta["masks"])
    masks = {}
    for name, shape in mask_shapes.items():
        shape = _positive_ints(shape)
        packed = tensors[f"mask.{name}"]
        if packed.dtype != torch.uint8 or packed.numel() != math.ceil(math.prod(shape) / 8):
            raise ValueError(name)
        masks[name] = unpack_bits(packed, shape)
    return config, input_shape, num_classes, masks


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
    if meta.get("version") == "1":
        raise bad("format version 1, whose checksum covers the tensor bytes but not the config: nothing can "
                  f"verify it; export the run again (this supermask writes and reads version {FORMAT_VERSION})")
    if meta.get("version") != str(FORMAT_VERSION):
        raise bad(f"format version {str(meta.get('version'))[:20]}, this supermask reads {FORMAT_VERSION}")
    if compact_sha256(meta, tensors) != meta.get("sha256"):
        raise bad("checksum mismatch: its header or data was changed or corrupted")
    try:
        config, input_shape, num_classes, masks = _parse_metadata(meta, tensors)
    except (KeyError, ValueError, TypeError, AttributeError):
        raise bad("inconsistent metadata") from None
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    if set(tensors) != {f"mask.{n}" for n in masks} | {f"state.{k}" for k in state}:
        raise bad("inconsistent metadata (tensors that are neither a mask nor a state entry)")
    return config, masks, state, input_shape, num_classes


def load_compact(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The supermask model of a compact file, in eval mode on device: weights regenerated from the
    seed, each layer's scores set to its mask (1.0 kept, 0.0 dropped). A file that is not a valid
    compact file raises CompactFileError (a UsageError) with a one-line message."""
    return load_compact_run(path, device)[0]


def load_compact_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict, tuple, int]:
    """(model, config, input_shape, num_classes) of a compact file; see load_compact."""
    from .desc import build_model  # noqa: PLC0415

    from .desc import config_problem  # noqa: PLC0415

    config, masks, state, input_shape, num_classes = read_compact(path)
    if config_problem(config):
        raise CompactFileError(f"{path}: its config holds a value its flag refuses ({config_problem(config)})")
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
