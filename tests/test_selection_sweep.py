"""Every selection path keeps exactly num_kept(n, k) weights, the ones a stable sort keeps, over
the whole range of n and n_keep: 1, 2, 63, 64, 65 ... n-1, n (issue: k=1e-4 on a 784x300 layer, 24
weights kept, raised in the warm start's density estimate on every backend)."""
import pytest
import torch

import supermask
from supermask import cpu_kernels as ck
from supermask import ops
from supermask.mask import TopKWarmStart, global_thresholds, mask_from_threshold, num_kept, topk_mask, \
    warm_topk_threshold

SIZES = [1, 2, 63, 64, 65, 1000, 16384, 16385, 70_000, 235_200]


def oracle(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The definition: the first n_keep entries of a stable descending sort of |s|."""
    flat = scores.detach().abs().reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.sort(flat, descending=True, stable=True).indices[:n_keep]] = True
    return mask.reshape(scores.shape)


def keeps(n: int) -> list[int]:
    return sorted({r for r in (1, 2, 63, 64, 65, n // 2, n - 65, n - 64, n - 63, n - 1, n) if 1 <= r <= n})


def cases():
    return [(n, r) for n in SIZES for r in keeps(n)]


def scores_for(n: int, seed: int = 0, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + n)
    s = torch.randn(n, generator=g)
    if ties:  # many exact ties: a few levels only
        s = torch.randint(-6, 7, (n,), generator=g).float() / 6
    return s


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n, n_keep", cases())
def test_reference_and_warm_start(n, n_keep, ties):
    s = scores_for(n, ties=ties)
    k = n_keep / n
    assert num_kept(n, k) == n_keep
    want = oracle(s, n_keep)
    assert torch.equal(topk_mask(s, k), want)
    # warm start over a few drifting steps (cold first step, then warm)
    g = torch.Generator().manual_seed(n)
    state = TopKWarmStart()
    for step in range(4):
        th = warm_topk_threshold(s, n_keep, state)
        assert torch.equal(mask_from_threshold(s.abs(), th), oracle(s, n_keep)), step
        s = s + 1e-3 * torch.randn(n, generator=g)


@pytest.mark.parametrize("path", ["auto", "reference"])  # auto on CPU tensors: the C kernels
@pytest.mark.parametrize("n, n_keep", cases())
def test_masked_weight_op(n, n_keep, path):
    """supermask::masked_weight with a warm-started state over drifting steps."""
    if path == "auto" and not ck.available():
        pytest.skip(f"CPU kernels unavailable: {ck.why_unavailable()}")
    s = scores_for(n, seed=1)
    w = torch.randn(n, generator=torch.Generator().manual_seed(2))
    state = ops.new_state()
    g = torch.Generator().manual_seed(n)
    for step in range(4):
        out = ops.masked_weight(w, s, n_keep, state, path)
        want = oracle(s, n_keep)
        assert torch.equal(out != 0, want & (w != 0)), step
        assert torch.equal(out, w * want), step
        s = s + 1e-3 * torch.randn(n, generator=g)


@pytest.mark.parametrize("n, n_keep", [(n, r) for n, r in cases() if n >= 64])
def test_global_threshold_over_three_layers(n, n_keep):
    s = scores_for(n, seed=3)
    parts = list(torch.split(s, [n // 2, n // 3, n - n // 2 - n // 3]))
    k = n_keep / n
    got = torch.cat([mask_from_threshold(p.abs(), t) for p, t in zip(parts, global_thresholds(parts, k))])
    assert torch.equal(got, oracle(s, n_keep))


@pytest.mark.parametrize("n, n_keep", cases())
def test_triton_radix_select(n, n_keep):
    """kernels/threshold.py (Triton's interpreter here, compiled with SUPERMASK_TEST_ON_GPU=1)."""
    from supermask.kernels import topk_threshold as radix  # noqa: PLC0415
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = scores_for(n, seed=4)
    th = radix(s.to(device), n_keep)
    got = mask_from_threshold(s.abs(), type(th)(th.value.cpu(), th.ties, th.split))
    assert torch.equal(got, oracle(s, n_keep))


@pytest.mark.parametrize("path", ["auto", "reference"])
def test_issue_example_k_1e_4(path):
    """SupermaskLinear(784, 300, k=1e-4): 24 weights kept, forward and backward work."""
    if path == "auto" and not ck.available():
        pytest.skip(ck.why_unavailable())
    layer = supermask.SupermaskLinear(784, 300, k=1e-4, seed=0, name="fc1")
    assert num_kept(784 * 300, 1e-4) == 24
    layer.path = path
    for _ in range(3):
        y = layer(torch.randn(2, 784))
        y.sum().backward()
        assert int(layer.mask().sum()) == 24
        assert torch.equal(layer.mask(), oracle(layer.scores, 24))
        with torch.no_grad():
            layer.scores.sub_(0.1 * layer.scores.grad)
        layer.scores.grad = None


@pytest.mark.parametrize("n, n_keep", [(n, r) for n, r in cases() if n <= 16385 and n != 16384])  # (interpreter: small)
def test_triton_warm_start(n, n_keep):
    """kernels.threshold.warm_topk_threshold_device over a drifting step (cold first, then the band):
    the mask the kernels apply (|s| > value, or == value below the tie limit) is the stable sort's."""
    from supermask.kernels.threshold import DeviceWarmStart, warm_topk_threshold_device  # noqa: PLC0415
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = scores_for(n, seed=5)
    g = torch.Generator().manual_seed(n)
    warm = DeviceWarmStart()
    for step in range(2):
        value, _, limit = warm_topk_threshold_device(s.to(device), n_keep, warm)
        a = s.abs()
        got = (a > value.cpu()) | ((a == value.cpu()) & (torch.arange(n) < limit.cpu()))
        assert torch.equal(got, oracle(s, n_keep)), step
        s = s + 1e-3 * torch.randn(n, generator=g)
