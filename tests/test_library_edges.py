"""The library's answers at its edges (issue #24, kinds 5 and 6): table-driven, each row a call
and the error it must raise (type and a fragment of the message), or the right answer."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from supermask import storage
from supermask.errors import UsageError


def test_atomic_write_cleanup_never_buries_the_real_error(tmp_path, monkeypatch):
    """A read-only file system: the write fails, and so does removing the temporary file; the
    error raised is the write's (one line), not the cleanup's."""
    def fail(*_a, **_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "fsync", fail)
    monkeypatch.setattr(Path, "unlink", fail)
    with pytest.raises(UsageError, match=r"cannot write .*x\.json: Read-only file system"):
        storage.atomic_write(tmp_path / "x.json", b"{}")


@pytest.mark.parametrize("make, what", [
    (lambda p: p / "new" / "deeper", None),  # created later under a writable parent: fine
    (lambda p: (p / "f").write_text("x") and p / "f" / "out", "is not a folder"),
])
def test_check_writable(tmp_path, make, what):
    folder = make(tmp_path)
    if what is None:
        storage.check_writable(folder)
        assert not folder.exists() and not list(tmp_path.glob(".write-probe*"))
    else:
        with pytest.raises(UsageError, match=what):
            storage.check_writable(folder)


# convert() at its edges: (id, call, error type, fragment of the message)
def _converted(k=0.5):
    import torch.nn as nn

    from supermask import convert
    return convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), k=k)


def _convert(model_fn, **kw):
    from supermask import convert
    return lambda: convert(model_fn(), **kw)


def _nn(ctor, *a, **kw):
    import torch.nn as nn
    return lambda: getattr(nn, ctor)(*a, **kw)


CONVERT_EDGES = [
    ("converted model with another k", _convert(_converted, k=0.2), ValueError,
     "already a supermask model with k=0.5 (layer '0'), not k=0.2"),
    ("converted model with another global k", _convert(_converted, k=0.3, topk="global"), ValueError,
     "already a supermask model"),
    ("zero-sized Linear (no inputs)", _convert(_nn("Linear", 0, 3)), ValueError,
     "has no weights (weight of shape (3, 0))"),
    ("zero-sized Linear (no outputs)", _convert(_nn("Linear", 3, 0)), ValueError, "leave it out with skip="),
    ("zero-sized Conv2d", _convert(_nn("Conv2d", 0, 4, 3)), ValueError, "has no weights"),
    ("k a bool", _convert(_nn("Linear", 3, 2), k=True), TypeError, "got bool True"),
    ("k a string", _convert(_nn("Linear", 3, 2), k="0.5"), TypeError, "got str '0.5'"),
]


@pytest.mark.parametrize("name, call, error, fragment", CONVERT_EDGES, ids=[c[0] for c in CONVERT_EDGES])
def test_convert_refuses_at_its_edges(name, call, error, fragment):
    with pytest.raises(error) as e:
        call()
    assert fragment in str(e.value)


def test_convert_edges_that_have_a_right_answer():
    """A converted model converted again with its own k is unchanged; a skipped zero-sized layer is
    left as it is; an empty batch gives an empty output (as nn.Linear does)."""
    import torch
    import torch.nn as nn

    from supermask import convert
    from supermask.layers import supermask_layers

    m = _converted(0.5)
    again = convert(m, k=0.5)
    assert [(n, layer.k) for n, layer in supermask_layers(again)] == [("0", 0.5), ("2", 0.5)]
    x = torch.randn(5, 4)
    assert torch.equal(again(x), m(x))
    skipped = convert(nn.Sequential(nn.Linear(0, 3), nn.Linear(3, 2)), skip=("0",))
    assert [n for n, _ in supermask_layers(skipped)] == ["1"]
    assert skipped(torch.zeros(2, 0)).shape == (2, 2)
    assert m(torch.zeros(0, 4)).shape == (0, 2)


def test_results_json_of_val_size_0_is_standard_json(tmp_path):
    """--val-size 0: no validation accuracy; results.json and metrics.jsonl say null, not NaN (not JSON)."""
    import json

    from supermask import train as train_mod
    out = tmp_path / "run"
    assert train_mod.main(["--dataset", "synthetic", "--epochs", "1", "--width", "0.25", "--val-size", "0",
                           "--no-progress", "--no-tensorboard", "--out", str(out)]) == 0
    text = (out / "results.json").read_text()
    assert "NaN" not in text
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert results["val_acc"] is None and isinstance(results["test_acc"], float)
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["val_acc"] is None and isinstance(row["train_loss"], float) for row in rows)
    assert train_mod.main(["--dataset", "synthetic", "--epochs", "1", "--width", "0.25", "--val-size", "0",
                           "--no-progress", "--no-tensorboard", "--out", str(out)]) == 0  # read back: finished


def test_ctrl_c_while_torch_is_imported_is_one_line():
    """Issue #24: Ctrl-C during `import torch` of `python -m supermask.train`: one line, killed by SIGINT
    (exit status 130 in a shell), no 20-line KeyboardInterrupt traceback."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "supermask.train", "--help"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:  # -X importtime: a line as each module's import ends
        lines.append(line)
        if line.split("|")[-1].strip() == "torch.overrides":  # well inside `import torch`, after supermask's own start
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    said = [x for x in rest.splitlines() if not x.startswith("import time:")]
    assert proc.returncode in (-signal.SIGINT, 130), (proc.returncode, said)
    assert said == ["supermask: interrupted"], said


# topk_mask at its edges: the right answer where one exists, else a ValueError naming the argument.
MASK_EDGES = [
    ("empty 1-d", lambda: torch.empty(0), 0.5, (0,)),
    ("empty rows", lambda: torch.empty(0, 4), 0.3, (0, 4)),
    ("meta", lambda: torch.empty(3, 5, device="meta"), 0.5, (3, 5)),
]


@pytest.mark.parametrize("name, make, k, shape", MASK_EDGES, ids=[r[0] for r in MASK_EDGES])
def test_topk_mask_of_empty_and_meta_scores(name, make, k, shape):
    from supermask.mask import topk_mask
    scores = make()
    mask = topk_mask(scores, k)
    assert mask.dtype == torch.bool and mask.shape == shape and mask.device == scores.device
    assert mask.is_meta or int(mask.sum()) == 0


@pytest.mark.parametrize("k", [0.0, 1.5, -0.1])
def test_topk_mask_checks_k_even_when_empty(k):
    from supermask.mask import topk_mask
    with pytest.raises(ValueError, match="k"):
        topk_mask(torch.empty(0), k)


def test_converted_model_on_the_meta_device_propagates_shapes():
    """Like nn.Linear / nn.Conv2d, a converted model runs on meta tensors (shape propagation, forward and
    backward): the ops' fake kernels, not the eager implementations (was: an autocast RuntimeError)."""
    import torch.nn as nn

    from supermask import convert
    with torch.device("meta"):
        fc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model = convert(fc, k=0.5)
    out = model(torch.empty(2, 4, device="meta"))
    assert out.shape == (2, 3) and out.is_meta
    out.sum().backward()
    assert model[0].scores.grad.shape == (8, 4) and model[0].scores.grad.is_meta
    assert convert(conv, k=0.5)(torch.empty(2, 3, 8, 8, device="meta")).shape == (2, 4, 6, 6)
