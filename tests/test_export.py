"""supermask.export: compact files (1 bit per weight) and deployable models loadable with torch only."""
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY, command, scored_model

import supermask
from supermask import data as data_mod
from supermask import export
from supermask import imp as imp_mod
from supermask import train as train_mod
from supermask.layers import supermask_layers

cli = command(export)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert train_mod.main([*TINY, "--seed", "3", "--out", str(root / "ep")]) == 0
    assert imp_mod.main([*TINY, "--rounds", "1", "--val-every", "0", "--out", str(root / "imp")]) == 0
    return root


@pytest.fixture(scope="module")
def compact_file(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("compact") / "ep.smask"
    assert cli(runs / "ep", "--compact", "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def test_x():
    return data_mod.load("synthetic", val_size=200).test_x[:300]


def trained_model(run_dir):
    config, ckpt = export.read_run(run_dir)
    shape, classes = export.shapes_of(config)
    return export.build_run_model(config, ckpt, shape, classes)


def one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 60925])
def test_pack_bits_round_trip(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = export.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    # the layout by hand: bit i of byte j is entry 8j + i
    for j in (0, (n - 1) // 8):
        assert int(packed[j]) == sum(int(mask[8 * j + i]) << i for i in range(8) if 8 * j + i < n)
    assert torch.equal(export.unpack_bits(packed, (n,)), mask)


def test_compact_round_trip_bit_identical_and_size_formula(runs, tmp_path, test_x, capsys):
    out = tmp_path / "ep.smask"
    assert cli(runs / "ep", "--compact", "--out", out) == 0
    assert "x smaller" in capsys.readouterr().out
    model, _ = trained_model(runs / "ep")
    loaded = export.load_compact(out)
    with torch.no_grad():
        assert torch.equal(model(test_x), loaded(test_x))
    for (_, a), (_, b) in zip(supermask_layers(model), supermask_layers(loaded)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask(), b.mask())

    # Size: 8-byte length + header (< 2 KiB, 8-aligned) + ceil(n/8) bytes per layer; fc has no buffers.
    data = out.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    mask_bytes = sum(math.ceil(m.weight.numel() / 8) for _, m in supermask_layers(model))
    assert len(data) == 8 + header_len + mask_bytes
    assert header_len % 8 == 0 and header_len < 2048
    n_weights = sum(m.weight.numel() for _, m in supermask_layers(model))
    assert len(data) < n_weights / 8 + 2100
    assert export.fp32_state_dict_bytes(export.bake(model)) / len(data) > 25


def test_compact_file_is_readable_by_safetensors(compact_file):
    from safetensors import safe_open
    from safetensors.torch import load_file
    theirs = load_file(str(compact_file))
    config, masks, state, _, _ = export.read_compact(compact_file)
    assert set(theirs) == {f"mask.{n}" for n in masks} | {f"state.{k}" for k in state}
    for name, mask in masks.items():
        shape = mask.shape
        assert torch.equal(export.unpack_bits(theirs[f"mask.{name}"], shape), mask)
    assert all(torch.equal(theirs[f"state.{k}"], v) for k, v in state.items())
    with safe_open(str(compact_file), framework="pt") as f:
        assert f.metadata()["format"] == export.FORMAT and json.loads(f.metadata()["config"]) == config


# A compact file written by the project's own safetensors writer before the safetensors package was
# used (commit 078e849), its header moved to format version 2 (checksum over metadata and tensors,
# issue #24) with its tensors unchanged: its masks (SHA-256 of the bool bytes, count kept) and the
# loaded model's logits on a fixed input, as that version's load_compact gave them.
OLD_FILE = Path(__file__).resolve().parents[1] / "docs" / "export" / "fm_ep_w2.5_k0.5.smask"
OLD_MASKS = {"1": ((750, 784), 294000, "8fdec7d3318138f4"), "3": ((250, 750), 93750, "71e651e6057ead81"),
             "5": ((10, 250), 1250, "dc0da94c1a0955b8")}
OLD_LOGITS = [[-0.0754, -0.6331, -2.3995, -1.8437, -1.5277, 3.8012, -0.7129, -4.4001, 1.6219, -1.8854],
              [0.5251, -1.6855, 0.3906, -1.7311, -1.4309, 0.6944, 0.575, -2.1658, 3.4246, -6.4581],
              [0.4632, -2.8253, -2.1723, 0.0635, -2.7007, 3.7466, -0.1912, -2.9687, 2.653, -4.8852]]


def test_compact_file_written_before_the_safetensors_package_loads_identically():
    import hashlib
    config, masks, state, shape, classes = export.read_compact(OLD_FILE)
    assert (config["model"], config["width"], config["k"], shape, classes, state) == (
        "fc", 2.5, 0.5, (1, 28, 28), 10, {})
    assert {n: (tuple(m.shape), int(m.sum()), hashlib.sha256(m.numpy().tobytes()).hexdigest()[:16])
            for n, m in masks.items()} == OLD_MASKS
    model = export.load_compact(OLD_FILE)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), torch.tensor(OLD_LOGITS), atol=1e-4)


def _config(**kw):
    return {"command": "train", "model": "fc", "width": 0.25, "dense": False, "k": 0.5, "init": "signed_constant",
            "scale_fan": False, "seed": 5, "topk": "layer", "dataset": "synthetic", **kw}


@pytest.mark.parametrize("config", [
    _config(model="resnet18", width=0.0625, topk="global", k=0.3),  # BN running statistics, global top-k
    _config(init="kaiming_normal", scale_fan=True, k=0.7),
])
def test_compact_round_trip_with_batchnorm_stats_and_global_topk(config, tmp_path):
    model, shape, classes, g = scored_model(config, bn_passes=2)  # random scores, BN statistics moved
    path = tmp_path / "m.smask"
    data = export.compact_bytes(model, config, shape, classes)
    path.write_bytes(data)
    loaded = export.load_compact(path)
    x = torch.randn(4, *shape, generator=g)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    n_bn = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
               if "running" in k or "num_batches" in k)
    n_mask = sum(math.ceil(m.weight.numel() / 8) for _, m in supermask_layers(model))
    (header_len,) = struct.unpack("<Q", data[:8])
    assert len(data) == 8 + header_len + n_mask + n_bn


@pytest.mark.parametrize("damage", ["truncate_end", "truncate_header", "flip_data_bit", "garbage", "empty",
                                    "pickle", "bad_json"])
def test_corrupted_or_truncated_compact_file_is_one_line_exit_2(compact_file, tmp_path, capsys, damage):
    data = bytearray(compact_file.read_bytes())
    bad = tmp_path / "bad.smask"
    if damage == "truncate_end":
        data = data[:-5]
    elif damage == "truncate_header":
        data = data[:40]
    elif damage == "flip_data_bit":
        data[-100] ^= 0x10
    elif damage == "garbage":
        data = bytearray(b"\x07" * 500)
    elif damage == "empty":
        data = bytearray()
    elif damage == "bad_json":
        data[12] = ord("#")
    if damage == "pickle":
        torch.save({"model": {}}, bad)
    else:
        bad.write_bytes(bytes(data))
    capsys.readouterr()
    target = tmp_path / "x.pt2"
    one_line_error(capsys, cli(bad, "--out", target), str(bad))
    assert not target.exists()
    with pytest.raises(export.CompactFileError):
        export.load_compact(bad)


def test_deployable_models_load_and_match(runs, compact_file, tmp_path, test_x):
    ep_model, _ = trained_model(runs / "ep")
    imp_model, masks = trained_model(runs / "imp" / "round_01")
    assert cli(runs / "ep", "--out", tmp_path / "ep.pt2") == 0
    assert cli(runs / "imp" / "round_01", "--out", tmp_path / "imp.pt2") == 0
    assert cli(compact_file, "--out", tmp_path / "from_compact.pt2") == 0
    assert cli(runs / "ep", "--out", tmp_path / "ep_baked.pt2", "--bake") == 0
    torch.save(test_x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        outs = {{}}
        for name in ("imp", "ep_baked", "ep", "from_compact"):
            if name == "ep":  # IMP rounds and --bake are plain torch; edge-popup models hold supermask ops
                assert "supermask" not in sys.modules, "supermask was imported"
                import supermask
            m = torch.export.load({str(tmp_path)!r} + "/" + name + ".pt2").module()
            outs[name] = m(x)
            outs[name + "_one"] = m(x[:1])
        torch.save(outs, {str(tmp_path / 'y.pt')!r})
    """)
    root = str(Path(supermask.__file__).resolve().parent.parent)  # this checkout's supermask
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        want_ep, want_imp, want_one = ep_model(test_x), imp_model(test_x), ep_model(test_x[:1])
    assert torch.equal(outs["ep"], want_ep) and torch.equal(outs["from_compact"], want_ep)
    assert torch.equal(outs["ep_baked"], want_ep) and torch.equal(outs["ep_baked_one"], want_one)
    assert torch.equal(outs["imp"], want_imp)
    assert torch.equal(outs["ep_one"], want_one)  # the batch dimension is dynamic
    # The IMP round's pruned weights are exactly zero in the baked model.
    baked = export.bake(imp_model, masks)
    for name, mask in masks.items():
        assert torch.equal(baked.get_submodule(name).weight != 0, mask & (imp_model.get_submodule(name).weight != 0))
        assert not (baked.get_submodule(name).weight[~mask]).any()


def test_bad_inputs_one_line_exit_2_nothing_overwritten(runs, tmp_path, capsys):
    existing = tmp_path / "exists.smask"
    existing.write_bytes(b"keep me")
    one_line_error(capsys, cli(runs / "ep", "--compact", "--out", existing), "--force")
    assert existing.read_bytes() == b"keep me"
    one_line_error(capsys, cli(runs / "imp", "--out", tmp_path / "a.pt2"), "round folders", "round_01")
    one_line_error(capsys, cli(runs / "imp" / "round_01", "--compact", "--out", tmp_path / "b.smask"), "--compact")
    one_line_error(capsys, cli(tmp_path / "nope", "--out", tmp_path / "c.pt2"), "nope")
    one_line_error(capsys, cli(runs / "ep", "--out", tmp_path / "no" / "dir.pt2"), "does not exist")
    one_line_error(capsys, cli(runs / "ep"), "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.smask"]
    assert cli(runs / "ep", "--compact", "--out", existing, "--force") == 0
    assert existing.read_bytes()[8:9] == b"{"


def test_corrupted_checkpoint_is_one_line(runs, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(runs / "ep", run)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    one_line_error(capsys, cli(run, "--out", tmp_path / "x.pt2"), "corrupted")
    (run / "config.json").write_text("{")
    one_line_error(capsys, cli(run, "--out", tmp_path / "x.pt2"), "corrupted")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compact_load_on_gpu_regenerates_the_same_weights(compact_file, test_x):
    out = compact_file
    cpu, gpu = export.load_compact(out), export.load_compact(out, "cuda")
    for (_, a), (_, b) in zip(supermask_layers(cpu), supermask_layers(gpu)):
        assert torch.equal(a.weight, b.weight.cpu()) and torch.equal(a.mask(), b.mask().cpu())
    with torch.no_grad():
        torch.testing.assert_close(cpu(test_x), gpu(test_x.cuda()).cpu(), rtol=1e-4, atol=1e-4)


def test_compact_header_records_config(runs, compact_file):
    out = compact_file
    config, masks, state, shape, classes = export.read_compact(out)
    assert config == json.loads((runs / "ep" / "config.json").read_text())
    assert shape == (1, 28, 28) and classes == 10 and state == {}
    assert sorted(masks) == sorted(n for n, _ in supermask_layers(trained_model(runs / "ep")[0]))
