"""The options the official edge-popup code offers, each changing what it should and nothing else."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import supermask as sm
from supermask import desc
from supermask import train as train_mod
from supermask.cli import run_main
from supermask.mask import sampled_masked_weight
from supermask.training import TrainConfig, learning_rate

FAST = ["--dataset", "synthetic", "--epochs", "1", "--no-progress", "--width", "0.5"]


def run(argv):
    return run_main("python -m supermask.train", train_mod.main, argv)


def build(*extra):
    args = train_mod.parser().parse_args(FAST + list(extra))
    train_mod.validate(args)
    return desc.build_model(desc.train_identity(args), (1, 28, 28), 10)


def one_step(model, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    loss = F.cross_entropy(model(torch.randn(16, 1, 28, 28)), torch.randint(10, (16,)))
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_first_and_last_layer_dense_are_trainable_without_scores():
    model = build("--first-layer-dense", "--last-layer-dense")
    first, middle, last = model[1], model[3], model[5]
    assert type(first) is torch.nn.Linear and type(last) is torch.nn.Linear
    assert isinstance(middle, sm.SupermaskLinear)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(model)
    after = dict(model.named_parameters())
    assert not torch.equal(after["1.weight"], before["1.weight"])
    assert not torch.equal(after["5.weight"], before["5.weight"])
    assert torch.equal(after["3.weight"], before["3.weight"])  # supermask weight stays frozen
    assert not torch.equal(after["3.scores"], before["3.scores"])
    assert {n for n in after if n.endswith("scores")} == {"3.scores"}


def test_sampled_mask_keep_rate_matches_sigmoid_and_gradient_is_straight_through():
    torch.manual_seed(0)
    scores = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0]).repeat(4000, 1).requires_grad_()
    weight = torch.ones_like(scores)
    kept = (sampled_masked_weight(weight, scores, training=True) != 0).float().mean(0)
    assert torch.allclose(kept, torch.sigmoid(scores[0].detach()), atol=0.02)
    sampled_masked_weight(weight * 2, scores, training=True).sum().backward()
    p = torch.sigmoid(scores.detach())
    assert torch.allclose(scores.grad, 2 * p * (1 - p))
    expected = sampled_masked_weight(weight, scores.detach(), training=False, eval_mode="expected")
    assert torch.allclose(expected, p)
    thresholded = sampled_masked_weight(weight, scores.detach(), training=False, eval_mode="threshold")
    assert torch.equal(thresholded != 0, scores.detach() > 0)


def test_score_init_constant_and_sampled_model():
    model = build("--mask", "sampled", "--score-init-constant", "0.25")
    layers = [m for _, m in sm.supermask_layers(model)]
    assert all(m.mask_kind == "sampled" and torch.all(m.scores == 0.25) for m in layers)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(layers[0].effective_weight(), layers[0].weight * torch.sigmoid(torch.tensor(0.25)))


def test_random_subnet_keeps_exactly_k_and_changes_no_parameter(tmp_path):
    out = tmp_path / "rand"
    assert run(FAST + ["--random-subnet", "--k", "0.3", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    model = build("--random-subnet", "--k", "0.3")
    stored = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(stored[n], p) for n, p in model.state_dict().items())
    assert results["epochs"] == 0
    assert results["params_kept"] == sum(sm.num_kept(m.weight.numel(), 0.3) for _, m in sm.supermask_layers(model))
    assert not any(p.requires_grad for p in model.parameters())


def test_warmup_then_cosine_follows_the_formula():
    cfg = TrainConfig(lr=0.4, warmup_epochs=2, schedule="cosine")
    steps_per_epoch, total = 5, 50
    lrs = [learning_rate(cfg, s, total, steps_per_epoch) for s in range(total)]
    assert lrs[:10] == pytest.approx([0.4 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(0.4)
    assert lrs[30] == pytest.approx(0.2 * (1 + math.cos(math.pi * 20 / 40)))


def test_multistep_schedule():
    cfg = TrainConfig(lr=1.0, schedule="multistep", milestones=(2, 4), gamma=0.5)
    assert [learning_rate(cfg, s, 60, 10) for s in (0, 19, 20, 39, 40, 59)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_label_smoothing_nesterov_and_no_bn_decay_reach_the_optimiser_and_loss(tmp_path):
    from supermask.training import make_optimizer
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    opt = make_optimizer(model, TrainConfig(nesterov=True, no_bn_decay=True, weight_decay=1e-3))
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-3]
    assert all(g["nesterov"] for g in opt.param_groups)
    bn_ids = {id(p) for p in model[1].parameters()}
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if {id(p) for p in g["params"]} & bn_ids)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(FAST + ["--out", str(a)]) == 0
    assert run(FAST + ["--out", str(b), "--label-smoothing", "0.2"]) == 0
    la, lb = (json.loads((o / "metrics.jsonl").read_text())["train_loss"] for o in (a, b))
    assert la != lb


def test_evaluate_reproduces_stored_accuracy_exactly(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(FAST + ["--out", str(out)]) == 0
    stored = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert run(["--evaluate", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"test top-1 {stored['test_acc']:.2f}% (stored: {stored['test_acc']:.2f}%)" in line
    assert f"top-5 {stored['test_acc5']:.2f}%" in line
    assert run(["--evaluate", str(tmp_path / "nothing")]) == 2


def test_bad_combinations_are_usage_errors(tmp_path, capsys):
    assert run(FAST + ["--dense", "--random-subnet", "--out", str(tmp_path / "x")]) == 2
    assert run(FAST + ["--schedule", "multistep", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
