"""Tickets as artifacts: a compact supermask file, and a deployable model that needs only torch.

    python -m supermask.export RUN_DIR --compact --out model.smask   # config + seed + 1 bit per weight
    python -m supermask.export RUN_DIR --out model.pt2               # deployable model (torch.export)

Compact file (edge-popup runs): a supermask model is its config (which names the seed that
generated the frozen weights) plus one bit per weight. The file is in the safetensors format (an
8-byte little-endian header length, a JSON header, raw little-endian tensor bytes), written and
read here without the safetensors package (which can read it too): no pickle anywhere. It holds
one bit-packed uint8 tensor per supermask layer ("mask.<layer>") and every other state-dict entry
as it is ("state.<key>": BatchNorm running statistics, the weights of a --first/last-layer-dense
layer); the header's metadata holds the config, the input shape, the mask shapes and a SHA-256 of
the data, so a corrupted or truncated file is refused. ``load_compact(path)`` regenerates the
weights from the seed (on the CPU, then moved: the same on any device) and sets each layer's
scores to its mask (1 kept, 0 dropped), so the model computes exactly what the trained one did.

Deployable model (a .pt2 file written by torch.export): for an edge-popup run with per-layer top-k,
the supermask model itself in eval mode, its supermask ops (``supermask.ops``) in the graph, nothing
baked: load it with ``import supermask; torch.export.load(path).module()(x)`` (the import registers
the ops). IMP round folders and global top-k runs: the network with weight * mask baked into
ordinary nn.Linear / nn.Conv2d / BatchNorm layers, loadable with only torch. The batch dimension is
dynamic.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import struct
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .cli import Parser, run_main
from .layers import NonAffineBatchNorm, SupermaskConv2d, SupermaskLinear, supermask_layers
from .runs import UsageError, load_checkpoint, read_run_config

PROG = "python -m supermask.export"
FORMAT = "supermask-compact"
FORMAT_VERSION = 1
MAX_HEADER = 100 * 2**20

# Inputs of the datasets supermask.data knows (so exporting needs no dataset on disk).
DATASET_SHAPES = {"mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10), "synthetic": ((1, 28, 28), 10),
                  "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}

_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
           torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
           torch.bool: "BOOL"}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CompactFileError(UsageError):
    """A compact file that cannot be read: not one, truncated, corrupted or of another version."""


# ---------------------------------------------------------------------------------------------
# Bits


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor (any shape, flattened) as ceil(n / 8) uint8s, bit i of byte j = entry 8j + i."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of pack_bits: the bool tensor of the given shape."""
    n = math.prod(shape)
    bits = (packed.to(torch.int32).view(-1, 1) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:n].to(torch.bool).reshape(tuple(shape))


# ---------------------------------------------------------------------------------------------
# The safetensors container (https://github.com/huggingface/safetensors#format), without the package


def to_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    if sys.byteorder != "little":
        raise RuntimeError("writing safetensors needs a little-endian machine")
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise ValueError(f"cannot store {name} of dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)  # the data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def from_safetensors_bytes(data: bytes, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse and check a safetensors buffer; raises CompactFileError on anything malformed."""
    def bad(why):
        return CompactFileError(f"{what} is not a valid compact supermask file ({why})")

    if len(data) < 8:
        raise bad("too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise bad("truncated header" if n <= MAX_HEADER else "bad header length")
    try:
        header = json.loads(data[8:8 + n].decode())
    except (UnicodeDecodeError, ValueError):
        raise bad("corrupted header") from None
    if not isinstance(header, dict):
        raise bad("corrupted header")
    metadata = header.pop("__metadata__", {})
    body = memoryview(data)[8 + n:]
    spans, tensors = [], {}
    for name, entry in header.items():
        try:
            dtype = _DTYPE_NAMES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"corrupted entry {name!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or end - begin != math.prod(shape) * itemsize or begin < 0:
            raise bad(f"inconsistent entry {name!r}")
        if end > len(body):
            raise bad("truncated data")
        spans.append((begin, end))
        raw = bytearray(body[begin:end])
        tensors[name] = (torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw
                         else torch.empty(shape, dtype=dtype))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise bad("overlapping or missing tensor data")
        pos = end
    if pos != len(body):
        raise bad("trailing bytes after the tensor data")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("corrupted metadata")
    return tensors, metadata


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
    return config, load_checkpoint(ckpt_path)


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
    body_hash = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        body_hash.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    metadata = {"format": FORMAT, "version": str(FORMAT_VERSION),
                "config": json.dumps(config, sort_keys=True, separators=(",", ":")),
                "input_shape": json.dumps(list(input_shape)), "num_classes": str(num_classes),
                "masks": json.dumps(mask_shapes, separators=(",", ":")), "sha256": body_hash.hexdigest()}
    return to_safetensors_bytes(tensors, metadata)


def read_compact(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], tuple, int]:
    """(config, masks, other state entries, input_shape, num_classes) of a compact file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    tensors, meta = from_safetensors_bytes(data, str(path))
    bad = lambda why: CompactFileError(f"{path} is not a valid compact supermask file ({why})")  # noqa: E731
    if meta.get("format") != FORMAT:
        raise bad("no supermask-compact metadata")
    if meta.get("version") != str(FORMAT_VERSION):
        raise bad(f"format version {meta.get('version')}, this supermask reads {FORMAT_VERSION}")
    n = struct.unpack("<Q", data[:8])[0]
    if hashlib.sha256(data[8 + n:]).hexdigest() != meta.get("sha256"):
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


def deployable(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> nn.Module:
    """What the .pt2 holds: the supermask model itself in eval mode (per-layer top-k supermasks, whose
    ops export as they are), else the baked model (IMP masks, global top-k: a model-level hook)."""
    if masks is None and supermask_layers(model) and getattr(model, "_supermask_global_hook", None) is None:
        return model.eval()
    return bake(model, masks)


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


def _write_atomically(out: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix or ".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it an ordinary file's mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    p.add_argument("--evaluate", action="store_true",
                   help="load the written file again and compare its test accuracy with the run's")
    p.add_argument("--data-dir", default="data", help="where datasets are found (default ./data)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
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
    baked = bake(model, masks)
    dense_bytes = fp32_state_dict_bytes(baked)
    n_weights = sum(m.weight.numel() for m in baked.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    if args.compact:
        data = compact_bytes(model, config, input_shape, num_classes)
        try:
            _write_atomically(out, lambda tmp: Path(tmp).write_bytes(data))
        except OSError as e:
            raise UsageError(f"cannot write --out {out}: {e.strerror or e}") from None
        size = out.stat().st_size
        print(f"{out}: compact supermask, {size:,} bytes for {n_weights:,} weights "
              f"({8 * size / n_weights:.3f} bits/weight); fp32 state dict {dense_bytes:,} bytes: "
              f"{dense_bytes / size:.1f}x smaller")
    else:
        target = deployable(model, masks)
        program = export_program(target, input_shape)
        try:
            _write_atomically(out, lambda tmp: torch.export.save(program, tmp))
        except OSError as e:
            raise UsageError(f"cannot write --out {out}: {e.strerror or e}") from None
        how = ("import supermask; " if target is model else "") + "torch.export.load(path).module()"
        print(f"{out}: deployable model (torch.export; load with {how}), "
              f"{out.stat().st_size:,} bytes; fp32 state dict {dense_bytes:,} bytes")
    if args.evaluate:
        from . import data as data_mod  # noqa: PLC0415
        ds = data_mod.load(config["dataset"], args.data_dir, config.get("val_size", 5000))
        loaded = load_compact(out) if args.compact else torch.export.load(str(out)).module()
        before, logits_a = _accuracy(model, ds.test_x, ds.test_y)
        after, logits_b = _accuracy(loaded, ds.test_x, ds.test_y)
        same = "bit-identical" if torch.equal(logits_a, logits_b) else \
            f"differ by at most {(logits_a - logits_b).abs().max().item():.3g}"
        print(f"test accuracy: run {before:.2f}%, loaded from {out} {after:.2f}%; test logits {same}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
