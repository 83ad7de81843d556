"""Supermask layers, inits and convert()."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import supermask as sm
from supermask.init import init_weight, layer_generator
from supermask.models import MODELS, build


def test_weight_frozen_scores_learned_and_bit_identical_after_training():
    torch.manual_seed(0)
    model = sm.convert(build("conv2", (1, 12, 12), 10, 0.25), k=0.3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    scores = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("scores")}
    assert frozen and scores and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9,
                          weight_decay=1e-4)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 12, 12)), torch.randint(10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in frozen.items())
    assert all(not torch.equal(params[n], s) for n, s in scores.items())


def test_no_biases_and_non_affine_batchnorm():
    model = sm.convert(torchvision.models.resnet18(num_classes=10), k=0.5)
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            assert m.bias is None
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert isinstance(m, sm.NonAffineBatchNorm) and not m.affine
            assert m.weight is None and m.bias is None
    learned = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert learned == {"scores"}


def test_convert_resnet18_keeps_shapes_and_layer_geometry():
    dense = torchvision.models.resnet18(num_classes=10)
    model = sm.convert(dense, k=0.5)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == dense(x).shape == (2, 10)
    pairs = list(zip(dense.modules(), model.modules()))
    for d, s in pairs:
        if isinstance(d, nn.Conv2d):
            assert isinstance(s, sm.SupermaskConv2d)
            for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
                assert getattr(s, attr) == getattr(d, attr)
        if isinstance(d, nn.Linear):
            assert isinstance(s, sm.SupermaskLinear) and s.weight.shape == d.weight.shape
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())


def test_convert_keeps_groups_and_dilation_and_inplace():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2), nn.BatchNorm2d(8))
    out = sm.convert(net, k=0.5, inplace=True)
    assert out is net and isinstance(net[0], sm.SupermaskConv2d) and net[0].groups == 2
    assert net[0].dilation == (2, 2) and net(torch.randn(1, 4, 9, 9)).shape == (1, 8, 5, 5)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_adapts_to_input_shape(name):
    for shape in ((1, 28, 28), (3, 32, 32)):
        model = sm.convert(build(name, shape, 10, 0.25), k=0.5)
        assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("k", [0.05, 0.5, 1.0])
def test_every_layer_keeps_exactly_k(k):
    model = sm.convert(build("conv4", (3, 32, 32), 10, 0.25), k=k)
    for _, layer in sm.supermask_layers(model):
        assert int(layer.mask().sum()) == sm.num_kept(layer.weight.numel(), k)
        assert int((layer.effective_weight() != 0).sum()) == sm.num_kept(layer.weight.numel(), k)


def test_global_topk_keeps_exactly_k_of_all_weights():
    model = sm.convert(build("fc", (1, 28, 28), 10, 0.5), k=0.3, topk="global")
    model(torch.randn(2, 1, 28, 28))
    layers = [m for _, m in sm.supermask_layers(model)]
    total = sum(m.weight.numel() for m in layers)
    kept = [int(m.mask().sum()) for m in layers]
    assert sum(kept) == sm.num_kept(total, 0.3)
    assert len(set(k / m.weight.numel() for k, m in zip(kept, layers))) > 1  # not per-layer


def test_eval_mask_follows_every_scores_change():
    layer = sm.SupermaskLinear(20, 10, k=0.5).eval()
    with torch.no_grad():
        w1 = layer.effective_weight()
        layer.scores.mul_(-1).add_(torch.randn_like(layer.scores))
        w2 = layer.effective_weight()
        layer.scores.data.copy_(torch.randn_like(layer.scores))  # bypasses the version counter
        w3 = layer.effective_weight()
    assert not torch.equal(w1, w2) and not torch.equal(w2, w3)
    assert torch.equal(w3, layer.weight * layer.mask())
    layer.train()
    assert layer.effective_weight().requires_grad


@pytest.mark.parametrize("init", sm.init.INITS)
@pytest.mark.parametrize("scale_fan", [False, True])
def test_init_standard_deviations(init, scale_fan):
    shape, k = (400, 300), 0.25
    w = init_weight(shape, init, layer_generator(0, "x"), k, scale_fan)
    expected = math.sqrt(2 / (300 * (k if scale_fan else 1)))
    if init in sm.init.XAVIER:  # Glorot: 2 / (fan_in + fan_out), no scale_fan (as hidden-networks)
        expected = math.sqrt(2 / (300 + 400))
    assert abs(w.std().item() - expected) / expected < 0.02
    if init in ("signed_constant", "xavier_constant"):
        assert torch.allclose(w.abs(), torch.full(shape, expected))
        assert 0.45 < (w > 0).float().mean() < 0.55


def test_weights_depend_only_on_seed_not_on_global_rng():
    torch.manual_seed(1)
    a = sm.convert(build("fc", (1, 28, 28), 10, 0.2), k=0.5, seed=7)
    torch.manual_seed(2)
    torch.rand(100)
    b = sm.convert(build("fc", (1, 28, 28), 10, 0.2), k=0.5, seed=7)
    c = sm.convert(build("fc", (1, 28, 28), 10, 0.2), k=0.5, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not torch.equal(sa["1.weight"], sc["1.weight"])
