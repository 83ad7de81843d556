"""convert() on every classification builder of torchvision (issue 15's acceptance test).

After ``convert(model, k=0.3, strict=True)``: (a) the scores are the only parameters with
requires_grad; (b) in train and eval mode the output equals that of a deep copy whose supermask
weights were replaced by plain tensors ``weight * mask`` (the mask is in effect wherever a weight is
read); (c) one forward+backward gives every scores tensor a nonzero gradient; (d) a state_dict round
trip into a freshly converted model (other seed) gives identical outputs.

Models above DEFAULT_MAX_PARAMS weights run only with --slow (2 CPU cores: the default part stays
within a few minutes); the transformer families the issue names (Swin, Swin V2, ConvNeXt, ViT) are
also covered at small size in test_convert.py.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.utils import parametrize

import supermask as sm
from supermask.convert import _GlobalTopK
from supermask.parametrize import SupermaskParametrization

BUILDERS = torchvision.models.list_models(module=torchvision.models)
# Weights (millions, num_classes=10) above which a model runs only in the slow set.
DEFAULT_MAX_PARAMS = 12.0
PARAMS_M = {  # from the builders with num_classes=10 (checked by test_param_table_is_complete)
    "shufflenet_v2_x0_5": 0.4, "squeezenet1_1": 0.7, "squeezenet1_0": 0.7, "mnasnet0_5": 1.0,
    "shufflenet_v2_x1_0": 1.3, "mobilenet_v3_small": 1.5, "mnasnet0_75": 1.9, "mobilenet_v2": 2.2,
    "shufflenet_v2_x1_5": 2.5, "mnasnet1_0": 3.1, "regnet_y_400mf": 3.9, "efficientnet_b0": 4.0,
    "mobilenet_v3_large": 4.2, "mnasnet1_3": 5.0, "regnet_x_400mf": 5.1, "shufflenet_v2_x2_0": 5.4,
    "regnet_y_800mf": 5.7, "efficientnet_b1": 6.5, "regnet_x_800mf": 6.6, "densenet121": 7.0,
    "efficientnet_b2": 7.7, "regnet_x_1_6gf": 8.3, "googlenet": 10.0, "regnet_y_1_6gf": 10.3,
    "efficientnet_b3": 10.7, "resnet18": 11.2, "densenet169": 12.5, "regnet_x_3_2gf": 14.3,
    "efficientnet_b4": 17.6, "regnet_y_3_2gf": 17.9, "densenet201": 18.1, "efficientnet_v2_s": 20.2,
    "resnet34": 21.3, "resnext50_32x4d": 23.0, "resnet50": 23.5, "inception_v3": 24.4,
    "densenet161": 26.5, "swin_t": 27.5, "swin_v2_t": 27.6, "convnext_tiny": 27.8,
    "efficientnet_b5": 28.4, "maxvit_t": 30.4, "regnet_y_8gf": 37.4, "regnet_x_8gf": 37.7,
    "efficientnet_b6": 40.8, "resnet101": 42.5, "swin_s": 48.8, "swin_v2_s": 49.0,
    "convnext_small": 49.5, "regnet_x_16gf": 52.3, "efficientnet_v2_m": 52.9, "alexnet": 57.0,
    "resnet152": 58.2, "efficientnet_b7": 63.8, "wide_resnet50_2": 66.9, "regnet_y_16gf": 80.6,
    "resnext101_64x4d": 81.4, "vit_b_16": 85.8, "swin_b": 86.8, "resnext101_32x8d": 86.8,
    "swin_v2_b": 86.9, "vit_b_32": 87.5, "convnext_base": 87.6, "regnet_x_32gf": 105.3,
    "efficientnet_v2_l": 117.2, "wide_resnet101_2": 124.9, "vgg11": 128.8, "vgg11_bn": 128.8,
    "vgg13": 129.0, "vgg13_bn": 129.0, "vgg16": 134.3, "vgg16_bn": 134.3, "vgg19": 139.6,
    "vgg19_bn": 139.6, "regnet_y_32gf": 141.4, "convnext_large": 196.2, "vit_l_16": 303.3,
    "vit_l_32": 305.5, "vit_h_14": 630.8, "regnet_y_128gf": 637.5,
}
# The smallest input each architecture takes (pooling depth, maxvit's 7x7 partitions).
IMAGE_SIZE = {"alexnet": 64, "inception_v3": 80, "maxvit_t": 224}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kw = {"num_classes": 10}
    if name.startswith("vit_"):
        kw["image_size"] = 32 if name != "vit_h_14" else 28
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(name, **kw)


def image_size(name: str) -> int:
    return 28 if name == "vit_h_14" else IMAGE_SIZE.get(name, 32)


@torch.no_grad()
def masked_reference(model: nn.Module) -> nn.Module:
    """A deep copy of a converted model made of plain modules: every fused supermask layer an
    nn.Linear / nn.Conv2d and every parametrized tensor a plain frozen Parameter, each holding
    weight * layer.mask() (the mask definition, not the layer's forward path)."""
    ref = copy.deepcopy(model)
    for key, hook in list(ref._forward_pre_hooks.items()):  # global top-k: thresholds already set
        if isinstance(hook, _GlobalTopK):
            del ref._forward_pre_hooks[key]
    plain: dict[int, nn.Module] = {}
    for parent in list(ref.modules()):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, sm.SupermaskLinear | sm.SupermaskConv2d):
                if id(child) not in plain:
                    if isinstance(child, sm.SupermaskLinear):
                        new = nn.Linear(child.in_features, child.out_features, bias=False)
                    else:
                        new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                        child.padding, child.dilation, child.groups, bias=False,
                                        padding_mode=child.padding_mode)
                    new.weight.copy_(child.weight * child.mask())
                    plain[id(child)] = new.requires_grad_(False).train(child.training)
                setattr(parent, attr, plain[id(child)])
    for m in list(ref.modules()):
        if not parametrize.is_parametrized(m):
            continue
        tensors = {}
        for name, plist in m.parametrizations.items():
            assert len(plist) == 1 and isinstance(plist[0], SupermaskParametrization)
            tensors[name] = (plist.original * plist[0].mask()).detach().clone()
        # Not parametrize.remove_parametrizations: the copy shares its Parametrized class with the
        # original model, and removal deletes the property from that class.
        m.__class__ = type(m).__bases__[0]
        del m._modules["parametrizations"]
        for name, t in tensors.items():
            m.register_parameter(name, nn.Parameter(t, requires_grad=False))
    assert not sm.supermask_layers(ref)
    return ref


def check_converted(dense: nn.Module, fresh: nn.Module, size: int, k: float = 0.3) -> None:
    """Checks (a)-(d) of the module docstring for a dense model and a second copy of it."""
    model = sm.convert(dense, k=k, strict=True)
    layers = sm.supermask_layers(model)
    assert layers
    # (a) only scores are trained
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith("scores") for n in trained), [n for n in trained if not n.endswith("scores")]
    assert len(trained) == len(layers)
    x = torch.randn(2, 3, size, size)
    ref = masked_reference(model)
    # (b) train mode (same dropout / stochastic-depth draws in both), then eval mode
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)
    with torch.no_grad():
        y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    # (c) every scores tensor gets a gradient (in train mode stochastic depth may drop a whole
    # block for both images, so the nonzero check runs on the eval-mode forward)
    y.square().sum().backward()
    assert all(layer.scores.grad is not None for _, layer in layers)
    model.zero_grad()
    model.eval()
    ref.eval()
    y_eval = model(x)
    with torch.no_grad():
        torch.testing.assert_close(y_eval, ref(x), rtol=1e-4, atol=1e-5)
        # without grad, nn.MultiheadAttention takes its fused inference kernel
        y_no_grad = model(x)
        torch.testing.assert_close(y_no_grad, y_eval, rtol=1e-4, atol=1e-5)
    y_eval.square().sum().backward()
    for name, layer in layers:
        assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0, name
    # (d) state_dict round trip into a freshly converted model with other weights and scores
    other = sm.convert(fresh, k=k, seed=1, strict=True).eval()
    with torch.no_grad():
        assert not torch.allclose(other(x), y_no_grad)
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(other(x), y_no_grad, rtol=0, atol=0)


def _marks(name):
    return [pytest.mark.slow] if PARAMS_M[name] > DEFAULT_MAX_PARAMS else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in BUILDERS])
def test_convert_every_torchvision_classifier(name):
    check_converted(build(name), build(name, seed=1), image_size(name))


def test_param_table_is_complete():
    assert set(PARAMS_M) == set(BUILDERS)
