"""Radix-select threshold kernel (supermask.kernels.threshold) against the reference selection.

Runs in Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), on CUDA with
SUPERMASK_TEST_ON_GPU=1."""
import os
import random

import pytest
import torch

from supermask import SupermaskLinear, num_kept
from supermask import mask as ref
from supermask.kernels import global_thresholds, topk_threshold

DEVICE = "cuda" if os.environ.get("SUPERMASK_TEST_ON_GPU") == "1" else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _scores(rng: random.Random, shape, dtype, ties: str):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    x = torch.randn(shape, generator=g)
    if ties == "few_levels":  # many exact ties at every value
        x = torch.randint(-4, 5, shape, generator=g).float() * 0.25
    elif ties == "some":
        x = x.round(decimals=1)
    elif ties == "tiny":  # subnormal / tiny magnitudes and signed zeros exercise the low bytes
        x = x * 1e-6
        x.view(-1)[::5] = -0.0
    x = x.to(dtype)
    if rng.random() < 0.3 and x.dim() >= 2:
        x = x.transpose(0, -1)  # non-contiguous (dense) input
    return x.to(DEVICE)


def _same(a, b):
    assert a.value.dtype == b.value.dtype
    assert a.value.shape == b.value.shape == ()
    assert a.value.device == b.value.device
    assert torch.equal(a.value, b.value), (a, b)
    assert a.ties == b.ties and a.split == b.split, (a, b)


_SHAPES = [(1,), (2,), (7,), (300,), (1025,), (33, 17), (5, 1), (64, 48), (4, 3, 3, 3), (8, 6, 5, 2), (3000,)]


def _cases(n):
    rng = random.Random(1234)
    out = []
    for i in range(n):
        dtype = DTYPES[i % 3]
        shape = rng.choice(_SHAPES)
        ties = rng.choice(["none", "some", "few_levels", "tiny"])
        frac = rng.choice([1e-9, 0.001, 0.05, 0.3, 0.5, 0.7, 0.95, 0.999, 1.0, rng.random()])
        out.append(pytest.param(rng.randrange(1 << 30), shape, dtype, ties, frac,
                                id=f"{i}-{dtype}-{shape}-{ties}-{frac:.3g}"))
    return out


@pytest.mark.parametrize("seed,shape,dtype,ties,frac", _cases(110))
def test_topk_threshold_matches_reference(seed, shape, dtype, ties, frac):
    rng = random.Random(seed)
    s = _scores(rng, shape, dtype, ties)
    n = s.numel()
    n_keep = min(n, max(1, round(frac * n)))
    got = topk_threshold(s, n_keep)
    want = ref.topk_threshold(s.abs(), n_keep)
    _same(got, want)
    # Passing magnitudes instead of scores gives the same threshold.
    _same(topk_threshold(s.abs(), n_keep), want)
    # And the mask it describes keeps exactly n_keep entries.
    assert int(ref.mask_from_threshold(s.abs(), got).sum()) == n_keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_keep", [1, 2, 17, 999, 1000])
def test_topk_threshold_edges(dtype, n_keep):
    # k near 0 and near 1, all values equal, zeros.
    for x in (torch.zeros(1000), torch.full((1000,), 0.5), torch.arange(1000.0) - 500.0):
        x = x.to(dtype).to(DEVICE)
        _same(topk_threshold(x, n_keep), ref.topk_threshold(x.abs(), n_keep))


def test_topk_threshold_rejects_bad_k():
    x = torch.randn(10, device=DEVICE)
    for bad in (0, 11, -1):
        with pytest.raises(ValueError):
            topk_threshold(x, bad)
    with pytest.raises(TypeError):
        topk_threshold(torch.arange(10, device=DEVICE), 3)


def _global_cases(n):
    rng = random.Random(99)
    out = []
    for i in range(n):
        dtype = DTYPES[i % 3]
        shapes = [rng.choice(_SHAPES[:9]) for _ in range(rng.randint(1, 4))]
        ties = rng.choice(["none", "some", "few_levels"])
        k = rng.choice([1e-6, 0.01, 0.2, 0.5, 0.9, 0.99, 1.0, rng.random() * 0.98 + 0.01])
        out.append(pytest.param(rng.randrange(1 << 30), shapes, dtype, ties, k,
                                id=f"{i}-{dtype}-{len(shapes)}-{ties}-{k:.3g}"))
    return out


@pytest.mark.parametrize("seed,shapes,dtype,ties,k", _global_cases(50))
def test_global_thresholds_match_reference(seed, shapes, dtype, ties, k):
    rng = random.Random(seed)
    scores = [_scores(rng, s, dtype, ties) for s in shapes]
    got = global_thresholds(scores, k)
    want = ref.global_thresholds(scores, k)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        _same(a, b)
    total = sum(s.numel() for s in scores)
    kept = sum(int(ref.mask_from_threshold(s.abs(), t).sum()) for s, t in zip(scores, got))
    assert kept == num_kept(total, k)


def test_global_thresholds_mixed_dtypes():
    rng = random.Random(5)
    scores = [_scores(rng, (40, 7), torch.float32, "some"), _scores(rng, (300,), torch.float16, "some"),
              _scores(rng, (3, 3, 3, 3), torch.bfloat16, "some")]
    for k in (0.01, 0.3, 0.8, 1.0):
        for a, b in zip(global_thresholds(scores, k), ref.global_thresholds(scores, k)):
            _same(a, b)


def test_layer_threshold_uses_kernel_on_triton_backend(monkeypatch):
    import supermask.kernels as K
    layer = SupermaskLinear(30, 20, k=0.3, seed=1).to(DEVICE)
    want = layer.threshold()
    calls = []
    orig = K.topk_threshold_device
    monkeypatch.setattr(K, "topk_threshold_device", lambda *a: calls.append(1) or orig(*a))
    layer.path = "triton"
    _same(layer.threshold(), want)
    assert calls, "triton backend did not use the radix-select kernel"
