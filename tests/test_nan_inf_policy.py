"""One NaN policy in every path (NaN scores are refused, supermask.mask.NAN_MESSAGE) and one answer
for an inf or NaN weight under a zero mask (the reference's weight * mask: NaN), issue 22 item 3."""
from __future__ import annotations

import pytest
import torch

from supermask import mask, ops

try:
    import supermask.kernels as K
    PATHS = ops.PATHS
except ImportError:  # pragma: no cover
    K = None
    PATHS = ("auto", "reference")


def _nan_scores():
    g = torch.Generator().manual_seed(0)
    w, s = torch.randn(12, 20, generator=g), torch.randn(12, 20, generator=g)
    s[3, 4] = float("nan")
    return w, s


# (name, call(w, s, path)); every one selects a top-k from scores holding a NaN
ROWS = [
    ("masked_weight", lambda w, s, p: ops.masked_weight(w, s, 50, -1, p)),
    ("masked_weight warm", lambda w, s, p: ops.masked_weight(w, s, 50, ops.new_state(), p)),
    ("masked_linear", lambda w, s, p: ops.masked_linear(torch.ones(2, 20), w, s, 50, ops.new_state(), p)),
    ("masked_linear op", lambda w, s, p: torch.ops.supermask.masked_linear(torch.ones(2, 20), w, s, 50, -1, p)),
    ("topk_threshold", lambda w, s, p: ops.topk_threshold(s, 50, p)),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name, call", ROWS, ids=[r[0] for r in ROWS])
def test_nan_scores_are_refused_on_every_path(name, call, path):
    w, s = _nan_scores()
    # the Triton path's refusal is a device-side assert (no host sync): RuntimeError, same message
    error = RuntimeError if path == "triton" else ValueError
    with pytest.raises(error, match="scores contain NaN"):
        call(w, s, path)


SELECTIONS = {"topk_mask": lambda s: mask.topk_mask(s, 0.3),
              "global_thresholds": lambda s: mask.global_thresholds([s, s], 0.3),
              "radix topk_threshold": lambda s: K.topk_threshold(s, 10),
              "radix global_thresholds": lambda s: K.global_thresholds([s], 0.3)}


@pytest.mark.parametrize("name", SELECTIONS)
def test_the_selections_refuse_nan_with_a_value_error(name):
    if K is None and name.startswith("radix"):
        pytest.skip("no Triton")
    _, s = _nan_scores()
    with pytest.raises(ValueError, match="scores contain NaN"):
        SELECTIONS[name](s)


def test_without_nan_topk_mask_keeps_exactly_round_k_n():
    _, s = _nan_scores()
    s[3, 4] = float("inf")  # inf is a number: the largest magnitude, kept
    m = mask.topk_mask(s, 0.3)
    assert int(m.sum()) == mask.num_kept(s.numel(), 0.3) and bool(m[3, 4])


@pytest.mark.parametrize("path", PATHS)
def test_an_inf_or_nan_weight_under_a_zero_mask_gives_the_reference_answer(path):
    g = torch.Generator().manual_seed(1)
    w, s = torch.randn(12, 20, generator=g), torch.randn(12, 20, generator=g)
    s[0, 0], s[0, 1], s[0, 2] = 1e-9, 2e-9, 3.0  # two dropped, one kept
    w[0, 0], w[0, 1], w[0, 2] = float("inf"), float("nan"), float("-inf")
    x = torch.randn(3, 20, generator=g)
    want_w = ops.masked_weight(w, s, 60, -1, "reference")
    assert want_w[0, 0].isnan() and want_w[0, 1].isnan() and want_w[0, 2] == float("-inf")
    got_w = ops.masked_weight(w, s, 60, -1, path)
    torch.testing.assert_close(got_w, want_w, equal_nan=True, rtol=0, atol=0)
    want_y = ops.masked_linear(x, w, s, 60, -1, "reference")
    torch.testing.assert_close(ops.masked_linear(x, w, s, 60, -1, path), want_y, equal_nan=True)
    th = mask.topk_threshold(s.abs(), 60)
    torch.testing.assert_close(ops.masked_weight_at(w, s, th, path), want_w, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_has_nan_sees_one_nan_and_is_not_fooled_by_infinities(dtype):
    x = torch.randn(1000, dtype=dtype)
    x[3], x[7] = float("inf"), float("-inf")
    assert not mask.has_nan(x) and not mask.has_nan(x.view(10, 100).t())
    x[500] = float("nan")
    assert mask.has_nan(x) and mask.has_nan(x.view(10, 100).t())
    assert not mask.has_nan(torch.full((64,), 1e30, dtype=torch.float32))  # squares overflow to inf, not NaN
