"""Masks over kept (pretrained) weights: convert(weights="keep") with the threshold style (Piggyback,
Mallya et al. 2018; Zhao et al. 2020) and edge-popup's top-k (issue #26 item 2)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import supermask as sm
from supermask.baking import bake
from supermask.parametrize import SupermaskParametrization


def pretrained() -> nn.Module:
    """A small 'pretrained' network with biases, norms and a conv (random values stand in)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():  # non-trivial norm statistics and affine values
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[5].weight.uniform_(0.5, 1.5)
        model[5].bias.uniform_(-0.5, 0.5)
    return model.eval()


def scores_of(model):
    return [layer.scores for _, layer in sm.supermask_layers(model)]


def test_threshold_mask_and_output_by_hand():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2]))
    model = sm.convert(nn.Sequential(lin), weights="keep", mask="threshold", strict=True)
    (layer,) = scores_of(model)
    with torch.no_grad():
        layer.copy_(torch.tensor([[0.01, 0.004, -0.006], [0.005, -0.001, 0.02]]))
    p = model[0].parametrizations.weight[0]
    # |s| >= 5e-3 (entries at the threshold kept): [[1, 0, 1], [1, 0, 1]]
    assert p.mask().tolist() == [[True, False, True], [True, False, True]]
    assert model[0].weight.tolist() == [[1.0, 0.0, 3.0], [0.5, 0.0, -1.0]]
    y = model(torch.ones(1, 3))
    assert torch.allclose(y, torch.tensor([[1 + 3 + 0.1, 0.5 - 1 - 0.2]]))
    # straight-through: dL/ds = dL/dW_eff * W * sign(s); L = y0 + 2 y1, x = 1 -> dL/dW_eff = [[1]*3, [2]*3]
    (y[0, 0] + 2 * y[0, 1]).backward()
    assert layer.grad.tolist() == [[1.0, -2.0, -3.0], [1.0, -8.0, -2.0]]
    assert model[0].bias.grad is None and p.weight.grad is None


def test_straight_through_gradient_matches_formula_and_gradcheck():
    torch.manual_seed(1)
    model = sm.convert(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double(), weights="keep",
                       mask="threshold", threshold=0.3, score_init=0.0)
    with torch.no_grad():
        for s in scores_of(model):
            s.copy_(torch.randn_like(s) * 0.4)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    # the masked network is smooth in x (the mask does not depend on it): float64 gradcheck
    assert torch.autograd.gradcheck(lambda inp: model(inp), (x,))
    loss = model(x).square().sum()
    loss.backward()
    # the same network with the masked weights as leaves gives dL/dW_eff
    w1 = model[0].weight.detach().clone().requires_grad_()
    w2 = model[2].weight.detach().clone().requires_grad_()
    ref = F.linear(torch.tanh(F.linear(x.detach(), w1, model[0].bias)), w2, model[2].bias).square().sum()
    ref.backward()
    for lin, w in ((model[0], w1), (model[2], w2)):
        p = lin.parametrizations.weight[0]
        want = w.grad * p.weight * torch.sign(p.scores.detach())
        assert torch.allclose(p.scores.grad, want, rtol=1e-12, atol=1e-12)


def test_init_equals_pretrained_exactly():
    model = pretrained()
    x = torch.randn(5, 2, 5, 5)
    want = model(x)
    masked, report = sm.convert(model, weights="keep", mask="threshold", strict=True, return_report=True)
    assert torch.equal(masked.eval()(x), want)
    assert not report.removed and not report.zeroed and not report.non_affine and report.fused == 0
    assert sorted(report.masked) == ["0.weight", "4.weight", "7.weight"]
    assert "1.weight" in report.frozen and "0.bias" in report.frozen and "5.bias" in report.frozen
    for _, layer in sm.supermask_layers(masked):
        assert layer.mask().all() and torch.equal(layer.scores, torch.full_like(layer.scores, 1e-2))
    # the pretrained values are the frozen originals, untouched
    assert torch.equal(masked[0].parametrizations.weight.original, model[0].weight)
    assert torch.equal(masked[1].running_var, model[1].running_var)


def test_only_scores_get_gradients():
    model = sm.convert(pretrained(), weights="keep", mask="threshold", strict=True).train()
    model(torch.randn(3, 2, 5, 5)).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad and len(trainable) == 3
    assert all(n.endswith(".scores") for n in trainable)


def test_topk_over_kept_weights_starts_as_magnitude_pruning():
    model = pretrained()
    masked = sm.convert(model, weights="keep", k=0.25, score_init="magnitude", strict=True)
    w = model[4].weight.detach()
    p = masked[4].parametrizations.weight[0]
    assert int(p.mask().sum()) == round(0.25 * w.numel())
    assert torch.equal(p.mask(), w.abs() >= w.abs().flatten().kthvalue(w.numel() - round(0.25 * w.numel()) + 1).values)
    assert torch.equal(masked[4].weight, w * p.mask())
    assert torch.equal(masked[4].bias, model[4].bias)  # kept, not removed


def test_baked_equals_masked_and_leaves_the_masked_model_working():
    torch.manual_seed(2)
    model = sm.convert(pretrained(), weights="keep", mask="threshold", strict=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 2, 5, 5)
    for _ in range(3):  # some masks flip
        opt.zero_grad()
        model.train()
        F.cross_entropy(model(x), torch.arange(16) % 3).backward()
        opt.step()
    assert not all(layer.mask().all() for _, layer in sm.supermask_layers(model))
    model.eval()
    baked = bake(model)
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    assert not any(isinstance(m, SupermaskParametrization) for m in baked.modules())
    assert type(baked[4]) is nn.Linear and not any(p.requires_grad for p in baked.parameters())
    assert torch.equal(baked(x), model(x))
    assert parametrize.is_parametrized(model[4], "weight")  # the source model is still masked


def test_state_dict_round_trip_and_dtype():
    torch.manual_seed(3)
    a = sm.convert(pretrained(), weights="keep", mask="threshold", threshold=0.02, score_init=0.05)
    with torch.no_grad():
        for s in scores_of(a):
            s.uniform_(-0.05, 0.05)
    b = sm.convert(pretrained(), weights="keep", mask="threshold", threshold=0.02, score_init=0.05)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(a.eval()(x), b.eval()(x))
    d = copy.deepcopy(a).double()
    p = d[4].parametrizations.weight[0]
    assert p.threshold_value.dtype == torch.float64 and torch.equal(p.mask(), a[4].parametrizations.weight[0].mask())


def test_redrawn_weights_with_threshold_masks():
    """mask="threshold" also over edge-popup's random weights (parametrized, no fused layer)."""
    model, report = sm.convert(nn.Sequential(nn.Linear(4, 3)), mask="threshold", return_report=True, seed=0)
    p = model[0].parametrizations.weight[0]
    assert report.fused == 0 and p.mask().all() and not p.keeps_weight
    assert not torch.equal(p.weight, nn.Linear(4, 3).weight)  # redrawn: signed constant
    assert p.weight.abs().unique().numel() == 1


BAD = [  # (convert keyword arguments, exception, message)
    (dict(weights="random"), ValueError, "weights must be one of"),
    (dict(mask="piggyback"), ValueError, "mask must be one of"),
    (dict(mask="threshold", k=0.5), ValueError, "k and topk are top-k options"),
    (dict(mask="threshold", topk="global"), ValueError, "k and topk are top-k options"),
    (dict(threshold=0.1), ValueError, "threshold is mask='threshold''s option"),
    (dict(mask="threshold", threshold=0), ValueError, "threshold must be a finite number > 0"),
    (dict(mask="threshold", threshold=-1e-3), ValueError, "threshold must be a finite number > 0"),
    (dict(mask="threshold", threshold=float("nan")), ValueError, "threshold must be a finite number > 0"),
    (dict(mask="threshold", threshold=float("inf")), ValueError, "threshold must be a finite number > 0"),
    (dict(mask="threshold", threshold="5e-3"), TypeError, "threshold must be a number"),
    (dict(mask="threshold", threshold=True), TypeError, "threshold must be a number"),
    (dict(weights="keep", score_init="ones"), TypeError, "score_init must be a number or one of"),
    (dict(weights="keep", score_init=True), TypeError, "score_init must be a number or one of"),
    (dict(weights="keep", score_init=float("nan")), ValueError, "score_init must be finite"),
    (dict(weights="keep", k=1.5), ValueError, "k must be in"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(r[0]) for r in BAD])
def test_bad_arguments(kwargs, exc, match):
    model = pretrained()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        sm.convert(model, inplace=True, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and list(before) == list(
        model.state_dict())


@pytest.mark.parametrize("kwargs", [dict(weights="keep"), dict(mask="threshold")])
def test_refuses_a_model_already_converted(kwargs):
    model = sm.convert(nn.Sequential(nn.Linear(4, 3)), k=0.5)
    with pytest.raises(ValueError, match="already holds supermask layers"):
        sm.convert(model, **kwargs)


def test_gpt2_keeps_its_weights_conv1d_and_tied_embedding():
    """Hugging Face GPT-2 (transposed Conv1D weights, lm_head tied to wte): at init the masked
    model's logits are the pretrained model's exactly; Conv1D biases and LayerNorms kept; only
    scores train; baked == masked after the masks move."""
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install '.[hf]')")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 10))
    want = gpt2(ids).logits
    model, report = sm.convert(gpt2, weights="keep", mask="threshold", embeddings="freeze", strict=True,
                               return_report=True)
    model.eval()
    assert torch.equal(model(ids).logits, want)
    assert not report.removed and not report.zeroed and not report.non_affine
    block = model.transformer.h[0]
    assert torch.equal(block.attn.c_attn.bias, gpt2.transformer.h[0].attn.c_attn.bias)
    assert torch.equal(block.attn.c_attn.parametrizations.weight.original, gpt2.transformer.h[0].attn.c_attn.weight)
    assert model.lm_head.parametrizations.weight[0] is model.transformer.wte.parametrizations.weight[0]  # tied
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scores") for n in trainable)
    model.eval()
    assert not all(layer.mask().all() for _, layer in sm.supermask_layers(model))
    assert torch.equal(bake(model)(ids).logits, model(ids).logits)
