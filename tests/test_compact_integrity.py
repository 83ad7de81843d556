"""The .smask checksum covers everything the file's meaning depends on (issue #24, kind 1).

Each field of a compact file's header is changed in turn (every metadata field, every key of the
config, every tensor entry's dtype, shape and offsets, a tensor's name), and one byte of each
tensor's data region is flipped: every change is refused in one line (exit 2) by the export
command, and by load_compact with a CompactFileError. A version-1 file (whose checksum covered
only the tensor bytes) is refused in one line naming its version.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import scored_model

from supermask import export
from supermask.cli import run_main

# A network with BN running statistics (state entries beside the masks) and global top-k.
CONFIG = {"command": "train", "model": "resnet18", "width": 0.0625, "dense": False, "k": 0.3,
          "init": "signed_constant", "scale_fan": False, "seed": 3, "topk": "global", "dataset": "cifar10"}


def split(data: bytes) -> tuple[dict, bytes]:
    """(header as a dict, data section) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    """A safetensors file of header and data section (header padded with spaces to 8 bytes)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    model, shape, classes, _ = scored_model(CONFIG)  # random scores, BN statistics away from their init
    path = tmp_path_factory.mktemp("good") / "m.smask"
    path.write_bytes(export.compact_bytes(model, CONFIG, shape, classes))
    export.load_compact(path)  # the unchanged file loads
    return path


def changed_value(v):
    """Another value of v's JSON type."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int | float):
        return v + 1
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, list):
        return [*v, 1] if not v or not isinstance(v[0], list) else [v[0], *v]
    if isinstance(v, dict):
        return {**v, "x": 1}
    return 0 if v is None else None


def header_changes(header: dict):
    """(id, change of the header dict) for every field of it."""
    meta = header["__metadata__"]
    config = json.loads(meta["config"])
    for key in config:
        yield f"config.{key}", lambda h, key=key: h["__metadata__"].__setitem__(
            "config", json.dumps({**config, key: changed_value(config[key])}, sort_keys=True, separators=(",", ":")))
    yield "config key dropped", lambda h: h["__metadata__"].__setitem__(
        "config", json.dumps({k: v for k, v in config.items() if k != "seed"}))
    for key in ("input_shape", "num_classes", "masks"):
        yield f"metadata.{key}", lambda h, key=key: h["__metadata__"].__setitem__(
            key, json.dumps(changed_value(json.loads(meta[key]))))
    yield "metadata.format", lambda h: h["__metadata__"].__setitem__("format", "supermask-compac")
    yield "metadata.version", lambda h: h["__metadata__"].__setitem__("version", "3")
    yield "metadata.sha256", lambda h: h["__metadata__"].__setitem__("sha256", "0" * 64)
    yield "metadata field added", lambda h: h["__metadata__"].__setitem__("note", "x")
    for name in (n for n in header if n != "__metadata__"):
        entry = header[name]
        other = {"U8": "I8", "F32": "I32", "I64": "F64"}.get(entry["dtype"], "U8")
        yield f"{name}.dtype", lambda h, name=name, other=other: h[name].__setitem__("dtype", other)
        if entry["shape"]:
            yield f"{name}.shape", lambda h, name=name: h[name].__setitem__(
                "shape", [*h[name]["shape"][:-1], h[name]["shape"][-1] - 1])
    first = next(n for n in header if n.startswith("state."))
    yield f"{first} renamed", lambda h: h.__setitem__(first[:-1] + "X", h.pop(first))


def check_refused(path: Path, tmp_path: Path, capsys):
    out = tmp_path / "x.pt2"
    capsys.readouterr()
    try:
        code = run_main(export.PROG, export.main, [str(path), "--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and str(path) in err, (code, err)
    assert not out.exists()
    with pytest.raises(export.CompactFileError):
        export.load_compact(path)


def test_every_header_field_change_is_refused(good, tmp_path, capsys):
    header, body = split(good.read_bytes())
    changes = list(header_changes(header))
    assert len(changes) > 40  # every config key, metadata field and tensor entry
    for name, change in changes:
        h = json.loads(json.dumps(header))
        change(h)
        assert h != header, name
        bad = tmp_path / f"{name.replace('/', '_')}.smask"
        bad.write_bytes(join(h, body))
        check_refused(bad, tmp_path, capsys)


def test_every_tensor_byte_region_change_is_refused(good, tmp_path, capsys):
    header, body = split(good.read_bytes())
    entries = {n: e for n, e in header.items() if n != "__metadata__"}
    assert any(n.startswith("state.") for n in entries) and any(n.startswith("mask.") for n in entries)
    for name, entry in entries.items():
        start, end = entry["data_offsets"]
        if start == end:
            continue
        for at in {start, (start + end) // 2, end - 1}:
            data = bytearray(body)
            data[at] ^= 0x01
            bad = tmp_path / "flipped.smask"
            bad.write_bytes(join(header, bytes(data)))
            check_refused(bad, tmp_path, capsys)


def test_a_version_1_file_is_refused_naming_its_version(good, tmp_path, capsys):
    """Version 1's checksum (SHA-256 of the tensor bytes in name order) cannot vouch for the config."""
    import hashlib

    header, body = split(good.read_bytes())
    h = hashlib.sha256()
    for name in sorted(n for n in header if n != "__metadata__"):
        start, end = header[name]["data_offsets"]
        h.update(body[start:end])
    header["__metadata__"].update(version="1", sha256=h.hexdigest())
    old = tmp_path / "v1.smask"
    old.write_bytes(join(header, body))
    check_refused(old, tmp_path, capsys)
    with pytest.raises(export.CompactFileError, match="format version 1"):
        export.load_compact(old)
