"""SupSup task inference (issue #26, item 4; Wortsman, Ramanujan et al. 2020): the superposed
forward f(x; W * sum_i alpha_i M_i) over a MaskBank's stored masks, its entropy gradient, and the
one-shot and binary rules that pick a task for an unlabeled batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import supermask as sm
from supermask.bank import MaskBank
from supermask.parametrize import SupermaskParametrization
from supermask.supsup import Superposition, entropy_gradient, infer_task, output_entropy


def mixed_model(dtype=torch.float32):
    """A Conv1d (parametrized), a fused SupermaskConv2d and two fused SupermaskLinear layers."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(1, 2, 3, bias=False)
            self.c2 = nn.Conv2d(1, 2, 3, bias=False)
            self.fc = nn.Sequential(nn.Linear(2 * 14 + 2 * 4 * 4, 12, bias=False), nn.ReLU(), nn.Linear(12, 5))

        def forward(self, x):  # x: (N, 1, 6, 6) -> a 1-D view of its first row pair and the 2-D image
            a = F.relu(self.c1(x.flatten(2)[:, :, :16])).flatten(1)
            b = F.relu(self.c2(x)).flatten(1)
            return self.fc(torch.cat([a, b], 1))

    return sm.convert(Net(), k=0.5, seed=0, strict=True).to(dtype)


def trained_bank(num_tasks=4, dtype=torch.float32):
    """A bank whose tasks were each trained a few steps on their own labels (distinct masks)."""
    bank = MaskBank(mixed_model(dtype), num_tasks, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 6, 6, generator=g, dtype=dtype)
    for t in range(num_tasks):
        bank.set_task(t)
        opt = torch.optim.SGD(bank.task_parameters(t), lr=0.5)
        y = torch.randint(0, 5, (32,), generator=g)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(bank(x), y).backward()
            opt.step()
    bank.set_task(0)
    return bank


def test_the_model_has_every_layer_kind():
    kinds = {type(m) for _, m in sm.supermask_layers(mixed_model())}
    assert kinds == {SupermaskParametrization, sm.SupermaskConv2d, sm.SupermaskLinear}


@pytest.mark.parametrize("grad", [False, True])
def test_one_hot_alpha_gives_each_tasks_own_output_exactly(grad):
    bank = trained_bank()
    sup = Superposition(bank)
    x = torch.randn(7, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    for t in range(bank.num_tasks):
        bank.set_task(t)
        bank.eval()
        with torch.no_grad():
            want = bank(x)  # the layers' own inference path
        alpha = torch.eye(bank.num_tasks)[t].requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            got = sup(alpha, x)
        assert torch.equal(got, want), t
    assert bank.task == bank.num_tasks - 1  # the superposition left the bank's task alone
    # and the layers compute with their own masks again afterwards
    bank.set_task(1)
    with torch.no_grad():
        assert torch.equal(bank(x), Superposition(bank, [1])(torch.ones(1), x))
    assert all("forward" not in vars(layer) for layer in bank._layers)


def test_a_superposition_holds_the_masks_when_it_was_made():
    bank = trained_bank(3)
    sup = Superposition(bank, [2, 0])
    assert sup.tasks == [2, 0]
    bank.set_task(2)
    want = [layer.mask().flatten().float() for layer in bank._layers]
    assert all(torch.equal(m[0], w) for m, w in zip(sup.masks, want))
    # mixed alpha: W * (0.25 * M_2 + 0.75 * M_0), by hand
    alpha = torch.tensor([0.25, 0.75])
    bank.set_task(0)
    m0 = [layer.mask().float() for layer in bank._layers]
    for layer, w, a, b in zip(bank._layers, sup.weights(alpha), want, m0):
        assert torch.allclose(w, layer.weight * (0.25 * a.view_as(b) + 0.75 * b))


def test_entropy_gradient_matches_gradcheck_and_finite_differences_in_float64():
    bank = trained_bank(3, torch.float64)
    sup = Superposition(bank)
    x = torch.randn(6, 1, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: output_entropy(sup(a, x)), (alpha,), eps=1e-6, atol=1e-7)
    grad = entropy_gradient(sup, alpha, x)
    eps = 1e-6
    for i in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[i] = eps
        with torch.no_grad():
            fd = (output_entropy(sup(alpha + step, x)) - output_entropy(sup(alpha - step, x))) / (2 * eps)
        assert abs(float(fd) - float(grad[i])) < 1e-7 * max(1.0, abs(float(fd)))


def test_output_entropy_by_hand():
    uniform = torch.zeros(3, 4)
    assert torch.allclose(output_entropy(uniform), torch.log(torch.tensor(4.0)))
    sure = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    assert float(output_entropy(sure)) < 1e-20
    # (p = softmax([0, ln 3]) = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4)) averaged with a uniform row (ln 2)
    row = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))], [0.0, 0.0]])
    h1 = -(0.25 * torch.log(torch.tensor(0.25)) + 0.75 * torch.log(torch.tensor(0.75)))
    assert torch.allclose(output_entropy(row), (h1 + torch.log(torch.tensor(2.0))) / 2)


def obvious_bank(num_tasks=4):
    """One SupermaskLinear 2T -> 4 with fixed varied weights; task t's mask keeps exactly the 8
    weights of input features 2t and 2t+1 (k = 8 / (8T)). A batch of task t is non-zero only on
    those features: under task t's mask its logits differ (low entropy), every other task's mask
    sees nothing (logits 0: maximal entropy, and exactly no gradient)."""
    layer = sm.SupermaskLinear(2 * num_tasks, 4, k=1 / num_tasks, seed=0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 2 * num_tasks, generator=torch.Generator().manual_seed(0)))
    bank = MaskBank(nn.Sequential(layer), num_tasks)
    for t in range(num_tasks):
        scores = torch.zeros(4, 2 * num_tasks)
        scores[:, 2 * t:2 * t + 2] = 1.0
        bank.scores[0][t].data.copy_(scores)
    return bank


def task_batch(t, num_tasks=4, n=16, seed=0):
    x = torch.zeros(n, 2 * num_tasks)
    x[:, 2 * t:2 * t + 2] = 3 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + t))
    return x


@pytest.mark.parametrize("method", ["one-shot", "binary"])
def test_the_obvious_task_is_picked_by_both_methods(method):
    bank = obvious_bank(5)
    sup = Superposition(bank)
    for t in range(5):
        guess = infer_task(sup, task_batch(t, 5), method)
        assert guess.task == t
        others = [s for i, s in enumerate(guess.scores.tolist()) if i != t]
        assert guess.scores[t] > 0 and others == [0.0] * 4  # -dH/dalpha: only the right task's mask matters
        if method == "binary":
            assert [len(r) for r in guess.rounds] == [5, 3, 2]  # halved, rounded up, until one is left
            assert all(t in r for r in guess.rounds)
    assert infer_task(bank, task_batch(3, 5), method).task == 3  # a MaskBank works too (masks taken now)


def test_inference_over_a_subset_of_tasks_names_bank_tasks():
    bank = obvious_bank(4)
    sup = Superposition(bank, [3, 1])
    assert infer_task(sup, task_batch(1), "one-shot").task == 1
    assert infer_task(sup, task_batch(3), "binary").task == 3


@pytest.mark.parametrize("call, error, match", [
    (lambda: infer_task(obvious_bank(), torch.zeros(0, 8)), ValueError, "non-empty batch"),
    (lambda: infer_task(obvious_bank(), torch.zeros(4, 8), "two-shot"), ValueError, "method must be one of"),
    (lambda: infer_task(MaskBank(obvious_bank().model, 1), torch.zeros(4, 8)), ValueError, "at least 2 tasks"),
    (lambda: infer_task(Superposition(obvious_bank(), [2]), torch.zeros(4, 8)), ValueError, "at least 2 tasks"),
    (lambda: Superposition(obvious_bank(), []), ValueError, "at least one task"),
    (lambda: Superposition(obvious_bank(), [4]), IndexError, r"task must be an int in \[0, 4\)"),
    (lambda: Superposition(obvious_bank())(torch.ones(3), torch.zeros(2, 8)), ValueError,
     r"alpha must have shape \(4,\)"),
    (lambda: infer_task(obvious_bank(), torch.full((4, 8), float("inf"))), ValueError, "not finite"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
