"""The implementation is chosen per layer (its ``path``, set per model by ``set_backend``) and per
device (one kernel registered with PyTorch per device), never process-wide (issue 22, item 1)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import supermask
from supermask import cpu_kernels, ops

try:
    import supermask.kernels as K
    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

OPS = ("masked_weight", "masked_weight_at", "masked_linear", "masked_linear_backward", "topk_threshold", "ste_grad")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(supermask.SupermaskLinear(20, 16, k=0.4, seed=seed, name="a"), nn.ReLU(),
                         supermask.SupermaskLinear(16, 5, k=0.5, seed=seed, name="b"))


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_one_kernel_per_device_registered_with_torch(name):
    op = getattr(torch.ops.supermask, name).default
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)
    assert op._schema.arguments[-1].name == "path"


def test_conftest_resets_nothing_and_ops_have_no_process_path():
    text = Path(__file__).with_name("conftest.py").read_text()
    assert "ops" not in text and "path" not in text.replace("os.environ", "")
    assert not hasattr(ops, "use_path") and not hasattr(ops, "_path") and not hasattr(ops, "_choose")


def test_set_backend_sets_the_layers_path_and_only_this_models():
    a, b = _model(), _model()
    supermask.set_backend(a, "torch")
    assert [m.path for _, m in supermask.supermask_layers(a)] == ["reference", "reference"]
    assert [m.path for _, m in supermask.supermask_layers(b)] == ["auto", "auto"]
    parametrized = nn.Linear(6, 4)
    supermask.mask_parameter([(parametrized, "weight")], k=0.5, seed=0, name="p")
    supermask.set_backend(parametrized, "torch")
    assert [m.path for _, m in supermask.supermask_layers(parametrized)] == ["reference"]


@pytest.mark.skipif(not (HAVE_TRITON and cpu_kernels.available()), reason="needs Triton and the C kernels")
def test_three_models_on_three_paths_in_one_process_keep_their_own(monkeypatch):
    calls = {"cpu": 0, "triton": 0}
    real_c, real_t = cpu_kernels.masked_weight_cached, K.masked_linear_forward

    def count_c(*a, **k):
        calls["cpu"] += 1
        return real_c(*a, **k)

    def count_t(*a, **k):
        calls["triton"] += 1
        return real_t(*a, **k)

    monkeypatch.setattr(cpu_kernels, "masked_weight_cached", count_c)
    monkeypatch.setattr(K, "masked_linear_forward", count_t)
    ref = supermask.set_backend(_model(), "torch")
    models = {"cpu": supermask.set_backend(copy.deepcopy(ref), "cpu"),
              "triton": supermask.set_backend(copy.deepcopy(ref), "triton")}
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(1))
    target = torch.arange(8) % 5
    for step in range(3):  # interleaved: each call takes its own model's path
        before = dict(calls)
        want = ref(x)
        assert calls == before, "the reference model ran a kernel"
        for name, model in models.items():
            got = model(x)
            other = "triton" if name == "cpu" else "cpu"
            assert calls[name] == before[name] + 2 and calls[other] == before[other], (name, calls)
            before = dict(calls)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            F.cross_entropy(got, target).backward()
    for model in models.values():
        for (_, a), (_, b) in zip(supermask.supermask_layers(ref), supermask.supermask_layers(model)):
            assert torch.equal(a.mask(), b.mask())
