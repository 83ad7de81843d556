"""Mask banks (issue #26, item 3; SupSup, Wortsman, Ramanujan et al. 2020): one frozen network,
T task masks; set_task switches fast layers and parametrized weights together; training one task
never touches another's scores or outputs (bit for bit); a task stored at 1 bit per weight."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import supermask as sm
from supermask.bank import MaskBank
from supermask.parametrize import SupermaskParametrization


P0 = "0.parametrizations.weight.0"  # the Conv1d's supermask, as supermask_layers names it


def small_model():
    """A Conv1d (masked through the parametrization) and two fused SupermaskLinear layers."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    return sm.convert(dense, k=0.5, seed=0, strict=True)


def data(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_task(bank, task, steps=5, seed=1):
    bank.set_task(task)
    opt = torch.optim.SGD(bank.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)  # every task's scores
    x, y = data(seed)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(bank(x), y).backward()
        opt.step()


def snapshot(bank):
    return [[p.detach().clone() for p in tasks] for tasks in bank.scores]


def test_set_task_switches_fast_and_parametrized_layers_in_one_call():
    model = small_model()
    kinds = {type(m) for _, m in sm.supermask_layers(model)}
    assert SupermaskParametrization in kinds and sm.SupermaskLinear in kinds
    bank = MaskBank(model, 3)
    for t in (2, 0, 1):
        bank.set_task(t)
        for (_, layer), tasks in zip(sm.supermask_layers(model), bank.scores):
            assert layer.scores is tasks[t]
    # different tasks, different masks; the frozen weights are shared
    masks = []
    for t in range(3):
        bank.set_task(t)
        masks.append(torch.cat([m.mask().flatten() for _, m in sm.supermask_layers(model)]))
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.parametrizations.weight.0.scores", "3.scores", "5.scores"]


def test_task0_keeps_the_models_scores_and_other_tasks_are_deterministic():
    model = small_model()
    before = [m.scores.detach().clone() for _, m in sm.supermask_layers(model)]
    a, b = MaskBank(model, 3, seed=7), MaskBank(small_model(), 3, seed=7)
    for s, tasks in zip(before, a.scores):
        assert torch.equal(tasks[0], s)
    for ta, tb in zip(a.scores, b.scores):
        assert all(torch.equal(p, q) for p, q in zip(ta, tb))


def test_training_one_task_touches_only_its_scores_and_no_other_tasks_outputs():
    bank = MaskBank(small_model(), 3)
    x, _ = data(seed=5)
    train_task(bank, 0)
    bank.set_task(0)
    with torch.no_grad():
        out0 = bank(x)
    before = snapshot(bank)
    train_task(bank, 1)
    after = snapshot(bank)
    for i, tasks in enumerate(bank.scores):
        assert tasks[0].grad is None and tasks[2].grad is None  # never in task 1's graph
        assert torch.equal(after[i][0], before[i][0]) and torch.equal(after[i][2], before[i][2])
        assert not torch.equal(after[i][1], before[i][1])  # task 1 did train
    bank.set_task(0)
    with torch.no_grad():
        assert torch.equal(bank(x), out0)  # bit for bit


def test_a_task_stored_at_one_bit_per_weight_round_trips():
    bank = MaskBank(small_model(), 2)
    train_task(bank, 1)
    bank.set_task(1)
    x, _ = data(seed=3)
    with torch.no_grad():
        want = bank(x)
    packed = bank.pack_task(1)
    assert bank.task == 1
    numels = [m.weight.numel() for _, m in sm.supermask_layers(bank.model)]
    assert [t.dtype for t in packed.values()] == [torch.uint8] * len(numels)
    assert sum(t.numel() for t in packed.values()) == sum(math.ceil(n / 8) for n in numels)  # 2 + 112 + 6 bytes
    fresh = MaskBank(small_model(), 2)
    fresh.load_task(1, packed)
    fresh.set_task(1)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


@pytest.mark.parametrize("call, error, match", [
    (lambda: MaskBank(small_model(), 0), ValueError, "num_tasks must be an int >= 1"),
    (lambda: MaskBank(small_model(), True), ValueError, "num_tasks must be an int >= 1"),
    (lambda: MaskBank(nn.Linear(2, 2), 2), ValueError, "no supermask layers"),
    (lambda: MaskBank(small_model(), 2).set_task(2), IndexError, r"task must be an int in \[0, 2\)"),
    (lambda: MaskBank(small_model(), 2).set_task(-1), IndexError, r"task must be an int in \[0, 2\)"),
    (lambda: MaskBank(small_model(), 2).load_task(0, {}), KeyError, "0.parametrizations.weight.0"),
    (lambda: MaskBank(small_model(), 2).load_task(0, {P0: torch.zeros(3, dtype=torch.uint8)}), ValueError,
     "3 bytes for 12 weights"),
    (lambda: MaskBank(small_model(), 2).load_task(0, {P0: torch.zeros(2, dtype=torch.uint8)}), ValueError,
     "the mask keeps 0 weights, the layer keeps 6"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_gpt2_bank_tied_embedding_one_scores_per_task_and_task0_unchanged():
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install '.[hf]')")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = sm.convert(transformers.GPT2LMHeadModel(cfg).eval(), k=0.5, strict=True, embeddings="mask")
    bank = MaskBank(model, 2)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out0 = bank(input_ids=ids).logits
    bank.set_task(1)
    assert model.lm_head.parametrizations.weight[0].scores is model.transformer.wte.parametrizations.weight[0].scores
    opt = torch.optim.SGD(bank.task_parameters(1), lr=1.0)
    bank(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(p.grad is None for tasks in bank.scores for p in tasks[:1])
    bank.set_task(0)
    with torch.no_grad():
        assert torch.equal(bank(input_ids=ids).logits, out0)
