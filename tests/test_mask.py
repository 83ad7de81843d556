"""The mask definition: exact counts, deterministic ties, straight-through gradient."""
import pytest
import torch
import torch.nn.functional as F

from supermask.mask import Threshold, global_thresholds, masked_weight, num_kept, topk_mask, topk_threshold


def oracle_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """What a stable descending sort of |scores| keeps: the definition the library must match."""
    order = torch.sort(scores.abs().reshape(-1).float(), descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:n_keep]] = True
    return mask.reshape(scores.shape)


def test_num_kept_rounds_and_never_keeps_zero():
    assert num_kept(10, 0.5) == 5
    assert num_kept(10, 0.04) == 1  # round(0.4) = 0, but k > 0 keeps at least one weight
    assert num_kept(3, 0.5) == 2  # 1.5 rounds half up
    assert num_kept(7, 1.0) == 7
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError):
            num_kept(10, bad)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
@pytest.mark.parametrize("k", [0.01, 0.3, 0.5, 0.99, 1.0])
def test_exact_count_matches_oracle(n, k):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(n, generator=g)
    mask = topk_mask(scores, k)
    assert int(mask.sum()) == num_kept(n, k)
    assert torch.equal(mask, oracle_mask(scores, num_kept(n, k)))


@pytest.mark.parametrize("levels", [1, 2, 5])
def test_ties_broken_by_lower_index(levels):
    g = torch.Generator().manual_seed(levels)
    scores = (torch.randint(0, levels, (20, 30), generator=g).float() - levels / 2)  # heavy ties, +-
    for k in (0.1, 0.37, 0.5, 0.9):
        mask = topk_mask(scores, k)
        assert torch.equal(mask, oracle_mask(scores, num_kept(scores.numel(), k)))


def test_split_flag_only_when_ties_are_cut():
    s = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5])
    t = topk_threshold(s, 2)
    assert t.split and t.ties == 1 and float(t.value) == 1.0
    assert topk_mask(s, 0.4).tolist() == [True, True, False, False, False]
    assert not topk_threshold(s, 4).split


def test_global_thresholds_keep_exactly_k_of_all_layers_with_ties_in_layer_order():
    a = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    b = torch.tensor([2.0, 2.0, 3.0])
    ts = global_thresholds([a, b], 4 / 7)  # keep 4: the 3.0 and three of the five 2.0s
    from supermask.mask import mask_from_threshold
    ma, mb = (mask_from_threshold(x.abs(), t) for x, t in zip([a, b], ts))
    assert ma.tolist() == [[False, True], [True, False]]
    assert mb.tolist() == [True, False, True]
    both = torch.cat([a.reshape(-1), b])
    assert torch.equal(torch.cat([ma.reshape(-1), mb]), oracle_mask(both, 4))


def _ste_surrogate_check(weight, scores, x, threshold):
    """gradcheck on a function whose true derivative is the straight-through estimator.

    Forward: loss(x, W*M0 + W*(|S| - |S0|)), with the mask M0 frozen at S0 (the threshold is fixed
    and no score sits within eps of it), so finite differences measure d loss/dW_eff * W * sign(S).
    Backward: only MaskedWeight's, because the correction term is detached.
    """
    s0 = scores.detach().clone()

    def fn(s):
        w_eff = masked_weight(weight, s, threshold) + (weight * (s.abs() - s0.abs())).detach()
        return F.linear(x, w_eff).tanh().sum(0)

    return torch.autograd.gradcheck(fn, (scores,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 4), (5, 2), (1, 7)])
def test_scores_gradient_is_straight_through(shape):
    g = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, dtype=torch.float64, generator=g)
    scores = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
    x = torch.randn(4, shape[1], dtype=torch.float64, generator=g)
    # a threshold halfway between the kept and the dropped magnitudes: the same mask, and no score
    # within finite-difference reach of it
    mags = scores.detach().abs().reshape(-1).sort(descending=True).values
    n_keep = num_kept(scores.numel(), 0.5)
    threshold = Threshold((mags[n_keep - 1] + mags[n_keep]) / 2, 0, False)
    assert torch.equal(masked_weight(weight, scores, threshold) != 0, topk_mask(scores, 0.5))
    assert _ste_surrogate_check(weight, scores, x, threshold)
    # and the formula itself: d scores = d w_eff * W * sign(S), for kept and dropped entries alike
    w_eff = masked_weight(weight, scores, threshold).detach().requires_grad_()
    F.linear(x, w_eff).tanh().sum().backward()
    scores.grad = None
    F.linear(x, masked_weight(weight, scores, threshold)).tanh().sum().backward()
    assert torch.allclose(scores.grad, w_eff.grad * weight * scores.detach().sign())


def test_weight_gets_no_gradient_and_sign_zero_gives_zero():
    weight = torch.ones(2, 2, requires_grad=True)
    scores = torch.tensor([[0.0, 1.0], [-2.0, 3.0]], requires_grad=True)
    out = masked_weight(weight, scores, Threshold(torch.tensor(1.0), 1, False))
    out.sum().backward()
    assert weight.grad is None
    assert scores.grad.tolist() == [[0.0, 1.0], [-1.0, 1.0]]
