"""Exact selection: supermask.select against torch.kthvalue / a stable-sort oracle, many inputs."""
import math

import pytest
import torch

from supermask.select import KTH_DIRECT_MAX, kth_largest, select_counts


def _inputs(n, kind, dtype, g):
    if kind == "uniform":
        x = torch.rand(n, generator=g)
    elif kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "ties":  # heavy ties: few distinct values
        x = torch.randint(0, 7, (n,), generator=g).float()
    elif kind == "equal":
        x = torch.full((n,), 0.25)
    elif kind == "sorted":
        x = torch.rand(n, generator=g).sort().values
    elif kind == "inf":
        x = torch.rand(n, generator=g)
        x[torch.randint(0, n, (max(1, n // 50),), generator=g)] = math.inf
    else:
        raise ValueError(kind)
    return x.to(dtype)


def _check(x, k):
    sel = select_counts(x, k)
    v = torch.kthvalue(x.reshape(-1).float() if x.dtype != torch.float64 else x.reshape(-1), x.numel() - k + 1).values
    assert sel.value.dtype == x.dtype and sel.value.dim() == 0
    assert sel.value.to(v.dtype) == v, (x.numel(), k)
    assert sel.above == int((x > sel.value).sum())
    assert sel.equal == int((x == sel.value).sum())
    assert sel.above < k <= sel.above + sel.equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_many_small(dtype):
    g = torch.Generator().manual_seed(1)
    for trial in range(150):
        high = 3000 if trial % 3 else 40
        n = int(torch.randint(1, high, (1,), generator=g))
        kind = ["uniform", "normal", "ties", "equal", "sorted", "inf"][trial % 6]
        x = _inputs(n, kind, dtype, g)
        for k in {1, n, max(1, n // 2), int(torch.randint(1, n + 1, (1,), generator=g))}:
            _check(x, k)


@pytest.mark.parametrize("kind", ["uniform", "normal", "ties", "equal", "sorted", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_band_path(kind, dtype):
    """Sizes past KTH_DIRECT_MAX go through the sampled band; k near 0, 1/2 and 1."""
    g = torch.Generator().manual_seed(2)
    for n in (KTH_DIRECT_MAX + 1, 50_001, 200_003):
        x = _inputs(n, kind, dtype, g)
        for k in (1, 2, 37, n // 3, n // 2, n - 37, n - 1, n):
            _check(x, k)


def test_big():
    g = torch.Generator().manual_seed(3)
    for n in (1_000_000, 10_000_000):
        x = torch.randn(n, generator=g)
        for k in (1, n // 10, n // 2, n - 5):
            _check(x, k)
    x = torch.randint(0, 1000, (3_000_000,), generator=g).float()  # heavy ties, big
    _check(x, 1_500_000)


def test_kth_largest_and_errors():
    x = torch.tensor([3.0, 1.0, 2.0])
    assert kth_largest(x, 1) == 3 and kth_largest(x, 3) == 1
    for k in (0, 4):
        with pytest.raises(ValueError):
            kth_largest(x, k)


def test_private_generator_leaves_global_rng_alone():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    kth_largest(torch.rand(100_000, generator=torch.Generator().manual_seed(0)), 5000)
    assert torch.equal(torch.rand(3), a)
