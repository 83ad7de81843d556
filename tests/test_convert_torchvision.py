"""convert() on every classification builder of torchvision (issue 15's acceptance test).

After ``convert(model, k=0.3, strict=True)``: (a) the scores are the only parameters with
requires_grad; (b) in train and eval mode the output equals that of a deep copy whose supermask
weights were replaced by plain tensors ``weight * mask`` (the mask is in effect wherever a weight is
read); (c) one forward+backward gives every scores tensor a nonzero gradient; (d) a state_dict round
trip into a freshly converted model (other seed) gives identical outputs.

Builders outside DEFAULT_RUN run only with --slow (2 CPU cores); the transformer families the issue
names (Swin, Swin V2, ViT) are covered at small size by test_convert.py in the default run.
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
# The default run: one or more members of each family whose check took <= 35 s here (2 cores
# shared with four other developers' jobs; all 27 of the <= 12M-weight models together took 25 min
# under that load, densenet121 alone 8 min, efficientnet_b0 2.5 min). Every other builder runs with --slow.
DEFAULT_RUN = {
    "resnet18", "googlenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5",
    "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5", "squeezenet1_0", "squeezenet1_1", "regnet_y_400mf", "regnet_x_400mf",
    "regnet_y_1_6gf",
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
    return [] if name in DEFAULT_RUN else [pytest.mark.slow]


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in BUILDERS])
def test_convert_every_torchvision_classifier(name):
    check_converted(build(name), build(name, seed=1), image_size(name))


def test_default_run_names_are_builders():
    assert DEFAULT_RUN <= set(BUILDERS)
