"""convert(): the mask in effect wherever a weight is read, only scores trained (issue 15's faults,
one test each, against outputs worked out from weight * mask by hand)."""
import copy
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.utils import parametrize
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

import supermask as sm
from supermask.convert import ConvertError
from supermask.parametrize import SupermaskParametrization
from test_convert_torchvision import check_converted, masked_reference


def trained(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def masked(layer) -> torch.Tensor:
    """weight * mask from the mask definition (not from the layer's forward path)."""
    return (layer.weight * layer.mask()).detach()


def plist(module, name="weight"):
    return module.parametrizations[name][0]


def small_swin(v2: bool) -> SwinTransformer:
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=[2, 2],
                           num_classes=5, **kw)


def small_vit() -> VisionTransformer:
    return VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                             num_classes=5)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_attention_reads_masked_qkv_and_proj(v2):
    torch.manual_seed(0)
    model = sm.convert(small_swin(v2), k=0.3, strict=True)
    attn = model.features[1][0].attn
    for lin in (attn.qkv, attn.proj):  # read by the attention itself, so parametrized
        assert not isinstance(lin, sm.SupermaskLinear) and parametrize.is_parametrized(lin, "weight")
        torch.testing.assert_close(lin.weight, masked(plist(lin)), rtol=0, atol=0)
        assert int((lin.weight != 0).sum()) == sm.num_kept(lin.weight.numel(), 0.3)
    # the output is the masked computation (the issue measured a difference of up to 2.7)
    x = torch.randn(2, 3, 16, 16)
    ref = masked_reference(model).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    model(x).sum().backward()
    assert plist(attn.qkv).scores.grad.abs().sum() > 0 and plist(attn.proj).scores.grad.abs().sum() > 0


@pytest.mark.parametrize("v2", [False, True])
def test_small_swin_and_vit_pass_the_every_builder_checks(v2):
    check_converted(small_swin(v2), small_swin(v2), 16)
    check_converted(small_vit(), small_vit(), 16)


def test_multihead_attention_out_proj_masked_and_scores_get_gradients():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = sm.convert(nn.Sequential(mha), k=0.5, strict=True)
    mha = model[0]
    p_in, p_out = plist(mha, "in_proj_weight"), plist(mha.out_proj)
    assert sorted(trained(model)) == ["0.out_proj.parametrizations.weight.0.scores",
                                      "0.parametrizations.in_proj_weight.0.scores"]
    # biases the fused kernel needs stay, as frozen zeros
    assert torch.equal(mha.in_proj_bias, torch.zeros(24)) and not mha.in_proj_bias.requires_grad
    assert torch.equal(mha.out_proj.bias, torch.zeros(8)) and not mha.out_proj.bias.requires_grad
    x = torch.randn(3, 5, 8)
    # right values: attention worked out by hand from weight * mask
    w_in, w_out = masked(p_in), masked(p_out)
    q, k, v = (x @ w_in.T).split(8, dim=-1)
    heads = lambda t: t.view(3, 5, 2, 4).transpose(1, 2)  # noqa: E731
    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, dim=-1) @ heads(v)
    expected = att.transpose(1, 2).reshape(3, 5, 8) @ w_out.T
    out, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert p_out.scores.grad is not None and p_out.scores.grad.abs().sum() > 0
    assert p_in.scores.grad is not None and p_in.scores.grad.abs().sum() > 0
    mha.eval()
    with torch.no_grad():  # the fused inference kernel (_native_multi_head_attention)
        torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 86M weights; small_vit in test_small_swin_and_vit_pass_the_every_builder_checks takes the same path
def test_vit_b_16_eval_works():
    torch.manual_seed(0)
    model = sm.convert(torchvision.models.vit_b_16(image_size=32, num_classes=10), k=0.3, strict=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)  # crashed: _native_multi_head_attention(): argument 'proj_bias' must be Tensor
    torch.testing.assert_close(fused, model(x).detach(), rtol=1e-4, atol=1e-5)  # with grad: the python path
    assert trained(model) and all(n.endswith("scores") for n in trained(model))


def test_shared_module_stays_shared_with_one_set_of_scores():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    model = sm.convert(nn.Sequential(lin, nn.ReLU(), lin), k=0.5, strict=True)
    assert isinstance(model[0], sm.SupermaskLinear) and model[0] is model[2]
    assert trained(model) == ["0.scores"]
    x = torch.randn(4, 6)
    w = masked(model[0]).requires_grad_()
    expected = F.relu(x @ w.T) @ w.T
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # the straight-through gradient sums both uses: dL/dscores = dL/dW_eff * weight * sign(scores)
    out.square().sum().backward()
    expected.square().sum().backward()
    layer = model[0]
    torch.testing.assert_close(layer.scores.grad, w.grad * layer.weight * layer.scores.sign(), rtol=1e-5, atol=1e-6)


def test_tied_weights_stay_tied_with_one_set_of_scores():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False)
    b.weight = a.weight
    emb = nn.Embedding(5, 5)
    emb.weight = a.weight  # an embedding tied to an output layer (language-model style)
    model, report = sm.convert(nn.ModuleList([a, b, emb]), k=0.4, strict=True, return_report=True)
    a, b, emb = model
    p = plist(a)
    assert plist(b) is p and plist(emb) is p
    assert a.parametrizations.weight.original is b.parametrizations.weight.original
    assert trained(model) == ["0.parametrizations.weight.0.scores"]
    assert report.masked == ["0.weight"] and report.fused == 0
    for m in (a, b, emb):
        torch.testing.assert_close(m.weight, masked(p), rtol=0, atol=0)


def test_every_normalisation_made_non_affine():
    norms = [nn.SyncBatchNorm(4), nn.BatchNorm3d(4), nn.BatchNorm2d(4), nn.BatchNorm1d(4), nn.LayerNorm([4, 3]),
             nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True), nn.RMSNorm(3)]
    shapes = [(2, 4, 3, 3), (2, 4, 3, 3, 3), (2, 4, 3, 3), (2, 4), (2, 4, 3), (2, 4, 3, 3), (2, 4, 3, 3), (2, 4, 3)]
    model, report = sm.convert(nn.ModuleList(norms), strict=True, return_report=True)
    assert list(model.parameters()) == []
    assert len(report.non_affine) == 15  # weight and bias of each, RMSNorm has a weight only
    for m in model:
        assert getattr(m, "weight", None) is None and getattr(m, "bias", None) is None
    torch.manual_seed(0)
    xs = [torch.randn(s) * 3 + 1 for s in shapes]
    # right values: plain normalisation, no scale or shift (train mode: batch statistics)
    expected = [F.batch_norm(xs[0], None, None, training=True), F.batch_norm(xs[1], None, None, training=True),
                F.batch_norm(xs[2], None, None, training=True), F.batch_norm(xs[3], None, None, training=True),
                F.layer_norm(xs[4], [4, 3]), F.group_norm(xs[5], 2), F.instance_norm(xs[6]), F.rms_norm(xs[7], [3])]
    for m, x, e in zip(model, xs, expected):
        torch.testing.assert_close(m(x), e, rtol=1e-5, atol=1e-5)
    assert isinstance(model[0], nn.SyncBatchNorm) and isinstance(model[1], nn.BatchNorm3d)


@pytest.mark.parametrize("make, x_shape, op", [
    (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7), lambda x, w: F.conv1d(x, w, padding=1)),
    (lambda: nn.Conv3d(3, 4, 3, stride=2), (2, 3, 5, 5, 5), lambda x, w: F.conv3d(x, w, stride=2)),
    (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5), lambda x, w: F.conv_transpose1d(x, w, stride=2)),
    (lambda: nn.ConvTranspose2d(3, 4, 3, groups=1, output_padding=1, stride=2), (2, 3, 4, 4),
     lambda x, w: F.conv_transpose2d(x, w, stride=2, output_padding=1)),
    (lambda: nn.ConvTranspose3d(3, 4, 2), (2, 3, 3, 3, 3), lambda x, w: F.conv_transpose3d(x, w)),
])
def test_conv1d_conv3d_and_transposed_convs_masked(make, x_shape, op):
    torch.manual_seed(0)
    model, report = sm.convert(nn.Sequential(make()), k=0.3, strict=True, return_report=True)
    conv = model[0]
    assert trained(model) == ["0.parametrizations.weight.0.scores"] and conv.bias is None
    assert report.masked == ["0.weight"] and report.removed == ["0.bias"]
    layer = plist(conv)
    assert int(layer.mask().sum()) == sm.num_kept(conv.weight.numel(), 0.3)
    x = torch.randn(x_shape)
    out = model(x)
    torch.testing.assert_close(out, op(x, masked(layer)), rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert layer.scores.grad.abs().sum() > 0


class Unsqueeze(nn.Module):
    def forward(self, t):
        return t.unsqueeze(1)


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.lin(x)
        return self.attn(h, h, h, need_weights=False)[0]


@pytest.mark.parametrize("topk", ["layer", "global"])
def test_eval_forward_follows_scores_written_through_data(topk):
    """Scores changed through .data (which bypasses the version counter) change the eval forward."""
    torch.manual_seed(0)
    model = sm.convert(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), Unsqueeze(), nn.Conv1d(1, 2, 3)), k=0.3,
                       topk=topk)
    fused, param = model[0], plist(model[3])
    model.eval()
    x = torch.randn(4, 10)

    def expected():
        return F.conv1d(F.relu(x @ masked(fused).T).unsqueeze(1), masked(param))

    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(), rtol=1e-5, atol=1e-6)
        before = model(x)
        for layer in (fused, param):
            layer.scores.data.copy_(torch.randn_like(layer.scores))  # no version bump
        out = model(x)
    assert not torch.allclose(out, before)
    torch.testing.assert_close(out, expected(), rtol=1e-5, atol=1e-6)
    if topk == "global":
        total = fused.weight.numel() + param.weight.numel()
        assert int(fused.mask().sum() + param.mask().sum()) == sm.num_kept(total, 0.3)


def test_global_topk_spans_fused_and_parametrized_layers():
    torch.manual_seed(0)
    model = sm.convert(AttentionNet(), k=0.25, topk="global", strict=True)
    layers = [m for _, m in sm.supermask_layers(model)]
    assert len(layers) == 3 and sum(isinstance(m, SupermaskParametrization) for m in layers) == 2
    x = torch.randn(2, 3, 8)
    out = model(x)  # the model's forward pre-hook sets the shared threshold
    total = sum(m.weight.numel() for m in layers)
    assert sum(int(m.mask().sum()) for m in layers) == sm.num_kept(total, 0.25)
    assert len({int(m.mask().sum()) * 1000 // m.weight.numel() for m in layers}) > 1  # not per layer
    ref = masked_reference(model)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(m.scores.grad.abs().sum() > 0 for m in layers)


@pytest.mark.parametrize("module, what", [
    (nn.Embedding(10, 4), "0.weight (Embedding)"),
    (nn.LSTM(4, 4), "0.weight_ih_l0 (LSTM)"),
    (nn.PReLU(), "0.weight (PReLU)"),
])
def test_strict_raises_on_what_it_cannot_mask(module, what):
    model = nn.Sequential(module)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConvertError, match=re.escape(what)):
        sm.convert(model, strict=True, inplace=True)
    assert model.state_dict().keys() == before.keys()  # nothing changed
    with pytest.warns(UserWarning, match="cannot mask"):
        out, report = sm.convert(model, return_report=True)
    assert report.unhandled and report.unhandled[0].startswith(what)
    assert not trained(out)  # frozen, and reported, never trained silently


def test_lazy_layer_not_initialised_raises():
    with pytest.raises(ConvertError, match="0.weight: lazy LazyLinear not initialised"):
        sm.convert(nn.Sequential(nn.LazyLinear(3)))
    model = nn.Sequential(nn.LazyLinear(3))
    model(torch.randn(2, 4))
    assert trained(sm.convert(model, strict=True)) == ["0.scores"]


def test_report_counts_and_log(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="supermask.convert"):
        model, report = sm.convert(small_vit(), k=0.3, strict=True, return_report=True)
    # conv_proj, per layer: in_proj, out_proj, mlp.0, mlp.3; the head
    assert len(report.masked) == 1 + 2 * 4 + 1
    assert report.masked_numel == sum(m.weight.numel() for _, m in sm.supermask_layers(model))
    assert sorted(report.frozen) == ["class_token", "encoder.pos_embedding"]
    assert len(report.non_affine) == 2 * (2 * 2 + 1)  # ln_1, ln_2 per layer, the final ln
    assert len(report.zeroed) == 2 * 2 and len(report.removed) == 1 + 2 * 2 + 1
    assert report.fused + len([n for n in report.masked if "in_proj" in n or "out_proj" in n]) == len(report.masked)
    assert "convert: masked 10 weight tensors" in caplog.text


@pytest.mark.parametrize("kwargs, error", [
    ({"topk": "bad"}, "topk must be one of"),
    ({"mask": "bad"}, "mask must be one of"),
    ({"k": 0.0}, "k must be in"),
    ({"k": 1.5}, "k must be in"),
])
def test_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        sm.convert(nn.Sequential(nn.Conv1d(2, 2, 3), nn.Linear(3, 3)), **kwargs)


def test_cpu_backend_on_parametrized_layers_gives_the_same_output():
    from supermask import cpu_kernels
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.why_unavailable())
    torch.manual_seed(0)
    model = sm.convert(small_vit(), k=0.3)
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    sm.set_backend(model, "cpu")
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_supermask_models_still_convert_to_fused_layers():
    """The paper architectures keep the fused layers (their training speed depends on it)."""
    from supermask.models import MODELS, build
    for name in MODELS:
        model, report = sm.convert(build(name, (3, 32, 32), 10, 0.25), k=0.5, return_report=True)
        assert report.fused == len(report.masked)
        assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_readme_vit_example_runs_as_written(capsys):
    page = (Path(__file__).resolve().parents[1] / "docs" / "library.md").read_text()
    code = page.split("<!-- example: vit -->\n```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/library.md", "exec"), {})
    out = capsys.readouterr().out
    assert "2 other tensors frozen (class_token, encoder.pos_embedding)" in out
    loss, acc = re.search(r"loss ([0-9.]+), train accuracy ([0-9.]+)", out).groups()
    assert float(loss) < 1.0 and float(acc) > 0.9  # random labels: ln(10) = 2.3 before training


def test_deepcopy_of_a_converted_model_reads_its_own_weights():
    model = sm.convert(nn.Sequential(nn.Conv1d(2, 3, 3)), k=0.5)
    other = copy.deepcopy(model)
    p, q = plist(model[0]), plist(other[0])
    assert q is not p and q.weight is other[0].parametrizations.weight.original
    assert q.weight is not p.weight and q.scores is not p.scores
    with torch.no_grad():
        other[0].parametrizations.weight.original.mul_(2)
    torch.testing.assert_close(other[0].weight, 2 * model[0].weight, rtol=0, atol=0)


def test_mask_parameter_masks_what_convert_cannot_then_strict_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    p = sm.mask_parameter([(model[0], "weight")], k=0.5, seed=0, name="0")
    model = sm.convert(model, k=0.5, strict=True)
    assert sorted(trained(model)) == ["0.parametrizations.weight.0.scores", "1.scores"]
    idx = torch.tensor([[1, 7]])
    torch.testing.assert_close(model[0](idx), masked(p)[idx], rtol=0, atol=0)
    assert len(sm.supermask_layers(model)) == 2


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_called_again_before_backward_keeps_the_saved_masked_weight(mode):
    """A second call (here without grad, as an eval pass between a forward and its backward) must
    not reuse the buffer of the masked weight the first call's graph saved."""
    torch.manual_seed(0)
    layer = getattr(sm.SupermaskLinear(768, 10, k=0.3), mode)()
    x = torch.randn(2, 768, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        layer(x)
    layer(x)  # and one with grad (gradient accumulation)
    y.sum().backward()
    torch.testing.assert_close(x.grad, masked(layer).sum(0).expand(2, 768), rtol=1e-5, atol=1e-6)
