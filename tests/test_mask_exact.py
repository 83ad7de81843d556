"""The mask every fast path must reproduce: a stable descending sort of |s|, first n_keep entries."""
import pytest
import torch

import supermask
from supermask.mask import (MaskedWeight, Threshold, TopKWarmStart, global_thresholds, mask_from_threshold,
                            masked_weight, num_kept, topk_mask, topk_threshold, warm_topk_threshold)


def oracle(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    flat = scores.detach().abs().reshape(-1)
    idx = torch.sort(flat, descending=True, stable=True).indices[:n_keep]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[idx] = True
    return mask.reshape(scores.shape)


def _scores(n, kind, dtype, g):
    if kind == "uniform":
        s = torch.rand(n, generator=g) * 2 - 1
    elif kind == "ties":
        s = (torch.randint(-4, 5, (n,), generator=g)).float() / 4
    elif kind == "equal":
        s = torch.full((n,), -0.5)
    else:
        s = torch.randn(n, generator=g)
    return s.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_topk_mask_matches_sort(dtype):
    g = torch.Generator().manual_seed(0)
    sizes = [1, 2, 3, 7, 100, 999, 2500, 16385, 70_000]
    for i, n in enumerate(sizes * 3):
        kind = ["uniform", "ties", "equal", "normal"][i % 4]
        s = _scores(n, kind, dtype, g)
        for k in (1e-6, 0.01, 0.3, 0.5, 0.99, 1.0):
            nk = num_kept(n, k)
            assert torch.equal(topk_mask(s, k), oracle(s, nk)), (n, kind, k)
            th = topk_threshold(s.abs(), nk)
            m = s.abs()
            assert int((m > th.value).sum()) + th.ties == nk
            assert th.split == (th.ties != int((m == th.value).sum()))


def test_big_layer_mask():
    g = torch.Generator().manual_seed(1)
    for n, k in ((1_000_000, 0.5), (10_000_000, 0.1)):
        s = torch.randn(n, generator=g)
        assert torch.equal(topk_mask(s, k), oracle(s, num_kept(n, k)))


@pytest.mark.parametrize("kind", ["uniform", "ties", "normal", "equal"])
def test_warm_start_follows_training_like_drift(kind):
    """Warm start over many steps of small and large score moves."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 200, generator=g)
    s = _scores(60_000, kind, torch.float32, g).reshape(300, 200).requires_grad_()
    for k in (0.5, 0.05, 0.97):
        state = TopKWarmStart()
        nk = num_kept(s.numel(), k)
        for step in range(25):
            with torch.no_grad():
                scale = 1e-4 if step % 7 else 3e-2  # now and then a big jump (forces a miss)
                s.add_(torch.randn(s.shape, generator=g) * scale)
                if kind == "ties":
                    s.copy_((s * 4).round() / 4)
            want = oracle(s, nk)
            th = warm_topk_threshold(s, nk, state)
            _same_threshold(th, topk_threshold(s.detach().abs(), nk))
            assert torch.equal(mask_from_threshold(s.detach().abs(), th), want)
            assert torch.equal(masked_weight(w, s, th), w * want)
        assert state.guessed + state.warm + state.widened + state.cold == 25
        if kind in ("uniform", "normal"):
            assert state.guessed >= 15  # most steps are answered by the candidates


def _same_threshold(th, ref):
    """Same value and split; the same ties where they matter (split: see Threshold)."""
    assert th.value.dtype == ref.value.dtype and bool(th.value == ref.value)
    assert th.split == ref.split and (not ref.split or th.ties == ref.ties)


def _drifting_layer(seed):
    """(generator, weight, scores, n_keep, warm state, flat scores) of a 400 x 300 layer at k = 0.5."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(400, 300, generator=g)
    s = (torch.rand(400, 300, generator=g) * 2 - 1).requires_grad_()
    return g, w, s, num_kept(s.numel(), 0.5), TopKWarmStart(), s.detach().view(-1)


def test_candidates_are_proven_by_the_count():
    """Entries far from the threshold jumping across it. One alone makes the count disagree; the
    second guess, one rank over, is proven by its count. Two in opposite directions keep the count
    (the first guess is exact). An entry landing right between the two ranks around the threshold
    is the new threshold itself, which no candidate can guess: the band path answers."""
    g, w, s, nk, state, flat = _drifting_layer(7)
    for step in range(9):
        with torch.no_grad():
            s.add_(torch.randn(s.shape, generator=g) * 1e-4)
            order = flat.abs().argsort()
            if step == 4:  # the largest entry drops to 0: one entry leaves the kept set
                flat[order[-1]] = 0.0
            if step == 6:  # the smallest and the largest swap places
                lo_i, hi_i = order[0], order[-1]
                flat[lo_i], flat[hi_i] = flat[hi_i].clone(), flat[lo_i].clone()
            if step == 8:  # the smallest lands between the n_keep-th and the (n_keep - 1)-th largest
                mags = flat.abs()[order]
                flat[order[0]] = (mags[-nk] + mags[-nk + 1]) / 2
        before, above = state.guessed, state.cand_above
        th = warm_topk_threshold(s, nk, state)
        _same_threshold(th, topk_threshold(flat.abs(), nk))
        assert torch.equal(masked_weight(w, s, th), w * oracle(s, nk))
        if step in (4, 6):
            assert state.guessed == before + 1
        if step == 4:
            assert state.cand_above == above - 1  # the dropped entry no longer counts above
        if step == 8:
            assert state.guessed == before and state.warm >= 1


def test_warm_band_path_splits_ties_in_flat_order():
    """A tie straddling the threshold (two entries equal to the n_keep-th largest |s|, one kept):
    the band path keeps the first in flat order, as the reference does."""
    g, w, s, nk, state, flat = _drifting_layer(8)
    for step in range(6):
        with torch.no_grad():
            s.add_(torch.randn(s.shape, generator=g) * 1e-4)
            if step >= 3:  # the (n_keep + 1)-th largest takes the n_keep-th's magnitude (sign kept)
                order = flat.abs().argsort(descending=True)
                a, b = order[nk - 1], order[nk]
                flat[b] = flat[a].abs() * flat[b].sign()
        warm_before = state.warm + state.widened + state.cold
        th = warm_topk_threshold(s, nk, state)
        _same_threshold(th, topk_threshold(flat.abs(), nk))
        assert torch.equal(masked_weight(w, s, th), w * oracle(s, nk))
        if step >= 3:
            assert th.split and th.ties == 1
            assert state.warm + state.widened + state.cold == warm_before + 1  # not the candidates


@pytest.mark.parametrize("kind", ["uniform", "ties", "equal"])
def test_small_layers_one_kthvalue_proven_by_the_count(kind):
    """Layers below WARM_MIN: one kthvalue and the count of its mask; ties go the counting way."""
    g = torch.Generator().manual_seed(9)
    for n in (1, 2, 7, 300, 3000):
        w = torch.randn(n, generator=g)
        s = _scores(n, kind, torch.float32, g)
        for k in (0.1, 0.5, 1.0):
            nk = num_kept(n, k)
            th = warm_topk_threshold(s, nk, TopKWarmStart())
            _same_threshold(th, topk_threshold(s.abs(), nk))
            assert torch.equal(masked_weight(w, s, th), w * oracle(s, nk))


def test_layers_train_with_exact_masks():
    torch.manual_seed(0)
    model = supermask.convert(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 300),
                                                  torch.nn.ReLU(), torch.nn.Linear(300, 10)), 0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for _, layer in supermask.supermask_layers(model):
            assert torch.equal(layer.mask(), oracle(layer.scores, num_kept(layer.scores.numel(), layer.k)))
            assert torch.equal(layer.effective_weight(), layer.weight * layer.mask())


def test_global_thresholds_match_concatenated_sort():
    g = torch.Generator().manual_seed(4)
    for kind in ("uniform", "ties"):
        scores = [_scores(n, kind, torch.float32, g) for n in (5000, 20_000, 300)]
        for k in (0.1, 0.5, 0.9):
            ths = global_thresholds(scores, k)
            cat = torch.cat(scores)
            want = oracle(cat, num_kept(cat.numel(), k))
            got = torch.cat([mask_from_threshold(s.abs(), t) for s, t in zip(scores, ths)])
            assert torch.equal(got, want)


def test_straight_through_gradient_gradcheck():
    """d scores = grad * weight * sign(scores), float64 gradcheck on a surrogate whose true
    derivative is exactly that (the mask is fixed: no score within eps of the threshold)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 5, dtype=torch.float64, generator=g)
    s = torch.randn(6, 5, dtype=torch.float64, generator=g)
    mags = s.abs().reshape(-1).sort(descending=True).values
    assert float(mags[14] - mags[15]) > 1e-4
    # the same mask as topk_threshold's, with no magnitude within finite-difference reach
    th = Threshold((mags[14] + mags[15]) / 2, 0, False)
    assert torch.equal(mask_from_threshold(s.abs(), th), oracle(s, 15))
    s0 = s.clone()
    s.requires_grad_()

    def fn(sc):
        return masked_weight(w, sc, th) + (w * (sc.abs() - s0.abs())).detach()

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)
    # sign(0) = 0, and the exact formula, also for a zero score
    s2 = s0.clone()
    s2[0, 0] = 0.0
    s2.requires_grad_()
    gout = torch.randn(6, 5, dtype=torch.float64, generator=g)
    out = MaskedWeight.apply(w, s2, topk_threshold(s2.detach().abs(), 15))
    (grad,) = torch.autograd.grad(out, s2, gout)
    assert torch.equal(grad, gout * w * torch.sign(s2.detach()))
    assert grad[0, 0] == 0
