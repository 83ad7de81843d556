"""The compiled single-pass score functions give exactly what their eager definitions give."""
import pytest
import torch
import torch.nn.functional as F

import supermask
from supermask import fused
from supermask.mask import TopKWarmStart, WarmTopK, masked_weight, num_kept


def oracle(scores, n_keep):
    order = torch.sort(scores.detach().abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:n_keep]] = True
    return mask.reshape(scores.shape)


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("SUPERMASK_COMPILE", "1")
    monkeypatch.setattr(fused, "MIN_NUMEL", 1 << 12)
    assert not fused._broken


def test_compiled_functions_equal_eager(compiled):
    g = torch.Generator().manual_seed(0)
    s, w, grad = (torch.randn(96, 130, generator=g) for _ in range(3))
    s[0, :5] = 0.0  # sign(0) = 0
    lo, hi = torch.tensor(0.5), torch.tensor(0.7)
    main = s.view(16, -1)
    for name, args in (("band_counts", (main, lo, hi)), ("masked_above_band", (w.view(16, -1), main, lo, hi)),
                       ("masked", (w, s, lo)), ("ste_grad", (grad, w, s))):
        got, want = fused.call(name, *args), fused._EAGER[name](*args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), name
    assert not fused._broken  # it really ran compiled


def test_training_with_compiled_passes_keeps_exact_masks(compiled):
    torch.manual_seed(0)
    model = supermask.convert(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 200),
                                                  torch.nn.ReLU(), torch.nn.Linear(200, 10)), 0.3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer = model[1]
        want = oracle(layer.scores, num_kept(layer.scores.numel(), 0.3))
        assert torch.equal(layer.mask(), want)
        assert torch.equal(masked_weight(layer.weight, layer.scores, WarmTopK(num_kept(want.numel(), 0.3),
                                                                              TopKWarmStart())),
                           layer.weight * want)
    assert layer._topk_warm.warm >= 6  # the warm path, not the cold one, answered
    assert not fused._broken
