"""The edge-popup paper's architectures (supermask.models) against hidden-networks' (allenai/
hidden-networks: models/frankle.py, models/resnet_cifar.py, models/resnet.py): parameter counts
worked out by hand from those definitions, and the inits of its utils/builder.py (supermask.init).

hidden-networks' layers have no biases (its builder passes bias=False; its Linear layers are 1x1
convolutions, the same count), so a network's prunable weights are its conv/linear weights; its
NonAffineBatchNorm has no parameters, its LearnedBatchNorm two per channel."""
import math

import pytest
import torch
from torch import nn

import supermask as sm
from supermask.init import init_weight, layer_generator
from supermask.models import build


def counts(model):
    """(conv/linear weights, BatchNorm channels) of a model."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return weights, channels


# Conv4 (CIFAR-10, 3x32x32): convs 3*64*9 + 64*64*9 + 64*128*9 + 128*128*9 = 1728 + 36864 + 73728
# + 147456 = 259776; FC (128*8*8)*256 + 256*256 + 256*10 = 2097152 + 65536 + 2560 = 2165248.
CONV4 = 259776 + 2165248  # 2425024
# Conv6: convs 259776 + 128*256*9 + 256*256*9 = 259776 + 294912 + 589824 = 1144512; FC (256*4*4)*256
# + 65536 + 2560 = 1048576 + 68096 = 1116672.
CONV6 = 1144512 + 1116672  # 2261184
# Conv4Wide, width_mult 2.5 (the paper's widest): 160, 320, 640 channels/units. Convs 3*160*9 +
# 160*160*9 + 160*320*9 + 320*320*9 = 4320 + 230400 + 460800 + 921600 = 1617120; FC (320*8*8)*640 +
# 640*640 + 640*10 = 13107200 + 409600 + 6400 = 13523200.
CONV4WIDE_2_5 = 1617120 + 13523200  # 15140320
# Conv4Wide, width_mult 0.15: int() truncates 9.6, 19.2, 38.4 to 9, 19, 38 (rounding would give 10).
# Convs 3*9*9 + 9*9*9 + 9*19*9 + 19*19*9 = 243 + 729 + 1539 + 3249 = 5760; FC (19*8*8)*38 + 38*38 +
# 38*10 = 46208 + 1444 + 380 = 48032.
CONV4WIDE_0_15 = 5760 + 48032  # 53792
# Conv6Wide, width_mult 0.5: 32, 64, 128. Convs 3*32*9 + 32*32*9 + 32*64*9 + 64*64*9 + 64*128*9 +
# 128*128*9 = 864 + 9216 + 18432 + 36864 + 73728 + 147456 = 286560; FC (128*4*4)*128 + 128*128 + 128*10
# = 262144 + 16384 + 1280 = 279808.
CONV6WIDE_0_5 = 286560 + 279808  # 566368
# cResNet18 (resnet_cifar.py, 10 classes): stem 3*64*9 = 1728; layer1 4 * 64*64*9 = 147456; layer2
# 64*128*9 + 3 * 128*128*9 + shortcut 64*128 = 73728 + 442368 + 8192 = 524288; layer3 128*256*9 +
# 3 * 256*256*9 + 128*256 = 294912 + 1769472 + 32768 = 2097152; layer4 256*512*9 + 3 * 512*512*9 +
# 256*512 = 1179648 + 7077888 + 131072 = 8388608; fc 512*10 = 5120.
CRESNET18 = 1728 + 147456 + 524288 + 2097152 + 8388608 + 5120  # 11164352
# BatchNorm channels: stem 64, layer1 4*64, layer2 5*128 (with the shortcut's), layer3 5*256, layer4 5*512
CRESNET18_BN = 64 + 256 + 640 + 1280 + 2560  # 4800; + 2 * 4800 + fc bias 10 = 11173962, kuangliu's count
# ResNet101 (resnet.py, ImageNet 3x224x224, 1000 classes): bottleneck width w, out 4p; a stage's first
# block in*w + w*w*9 + w*4p + downsample in*4p, the others 4p*w + w*w*9 + w*4p.
#   stem 3*64*7*7 = 9408
#   layer1 (w 64): 4096 + 36864 + 16384 + 16384 = 73728; 2 * (16384 + 36864 + 16384) = 139264 -> 212992
#   layer2 (w 128): 32768 + 147456 + 65536 + 131072 = 376832; 3 * 278528 = 835584 -> 1212416
#   layer3 (w 256): 131072 + 589824 + 262144 + 524288 = 1507328; 22 * 1114112 = 24510464 -> 26017792
#   layer4 (w 512): 524288 + 2359296 + 1048576 + 2097152 = 6029312; 2 * 4456448 = 8912896 -> 14942208
#   fc 2048*1000 = 2048000
RESNET101 = 9408 + 212992 + 1212416 + 26017792 + 14942208 + 2048000  # 44442816
RESNET101_BN = 52672  # 44442816 + 2 * 52672 = 44548160 = torchvision's 44549160 less the fc's 1000 biases
# WideResNet101_2: w = 2p.
#   layer1 (w 128): 8192 + 147456 + 32768 + 16384 = 204800; 2 * (32768 + 147456 + 32768) = 425984 -> 630784
#   layer2 (w 256): 65536 + 589824 + 131072 + 131072 = 917504; 3 * 851968 = 2555904 -> 3473408
#   layer3 (w 512): 262144 + 2359296 + 524288 + 524288 = 3670016; 22 * 3407872 = 74973184 -> 78643200
#   layer4 (w 1024): 1048576 + 9437184 + 2097152 + 2097152 = 14680064; 2 * 13631488 = 27262976 -> 41943040
WIDE_RESNET101_2 = 9408 + 630784 + 3473408 + 78643200 + 41943040 + 2048000  # 126747840
WIDE_RESNET101_2_BN = 68928  # + 2 * 68928 = 126885696 = torchvision's 126886696 less 1000 biases


@pytest.mark.parametrize("name, shape, classes, width, weights, bn", [
    ("conv4", (3, 32, 32), 10, 1.0, CONV4, 0),
    ("conv6", (3, 32, 32), 10, 1.0, CONV6, 0),
    ("conv4wide", (3, 32, 32), 10, 2.5, CONV4WIDE_2_5, 0),
    ("conv4wide", (3, 32, 32), 10, 0.15, CONV4WIDE_0_15, 0),
    ("conv4wide", (3, 32, 32), 10, 1.0, CONV4, 0),
    ("conv6wide", (3, 32, 32), 10, 0.5, CONV6WIDE_0_5, 0),
    ("conv6wide", (3, 32, 32), 10, 1.0, CONV6, 0),
    ("cresnet18", (3, 32, 32), 10, 1.0, CRESNET18, CRESNET18_BN),
    ("resnet101", (3, 224, 224), 1000, 1.0, RESNET101, RESNET101_BN),
    ("wide_resnet101_2", (3, 224, 224), 1000, 1.0, WIDE_RESNET101_2, WIDE_RESNET101_2_BN),
])
def test_parameter_counts_match_hidden_networks(name, shape, classes, width, weights, bn):
    with torch.device("meta"):  # shapes only: ResNet101 costs no memory
        model = build(name, shape, classes, width)
    assert counts(model) == (weights, bn)
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


def test_rounded_width_differs_from_truncated_where_hidden_networks_truncates():
    with torch.device("meta"):
        assert counts(build("conv4", (3, 32, 32), 10, 0.15))[0] != CONV4WIDE_0_15
        assert counts(build("conv4wide", (3, 32, 32), 10, 0.15))[0] == CONV4WIDE_0_15


def test_cresnet18_keeps_the_cifar_stem_at_any_input_size_resnet18_does_not():
    big = (3, 96, 96)
    c, r = build("cresnet18", big, 10), build("resnet18", big, 10)
    assert (c.conv1.kernel_size, c.conv1.stride, type(c.maxpool)) == ((3, 3), (1, 1), nn.Identity)
    assert (r.conv1.kernel_size, r.conv1.stride, type(r.maxpool)) == ((7, 7), (2, 2), nn.MaxPool2d)
    assert c(torch.randn(2, *big)).shape == (2, 10)


@pytest.mark.parametrize("name, width", [("conv4wide", 0.5), ("conv6wide", 0.5), ("cresnet18", 0.25),
                                         ("resnet101", 0.125), ("wide_resnet101_2", 0.125)])
def test_supermask_version_has_one_score_per_weight_and_non_affine_batchnorm(name, width):
    dense = build(name, (3, 32, 32), 10, width)
    weights, _ = counts(dense)
    model = sm.convert(dense, k=0.5)
    layers = [layer for _, layer in sm.supermask_layers(model)]
    assert sum(layer.scores.numel() for layer in layers) == weights
    assert all(not m.affine for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# xavier (Glorot & Bengio 2010; hidden-networks' builder: nn.init.xavier_normal_, and for
# xavier_constant sign(w) * sqrt(2 / (fan_in + fan_out))), std by hand for a 3x3 conv 16 -> 32:
# fan_in 16*9 = 144, fan_out 32*9 = 288, std sqrt(2 / 432) = 0.068041...
XAVIER_STD = math.sqrt(2 / 432)


@pytest.mark.parametrize("scale_fan", [False, True])
def test_xavier_inits_match_hidden_networks(scale_fan):
    shape = (32, 16, 3, 3)
    # scale_fan does not change them in hidden-networks (only the kaiming and constant inits scale)
    const = init_weight(shape, "xavier_constant", layer_generator(0, "c"), 0.3, scale_fan)
    assert torch.allclose(const.abs(), torch.full(shape, XAVIER_STD))
    assert 0.4 < (const > 0).float().mean() < 0.6  # random signs
    normal = init_weight(torch.Size((512, 256, 3, 3)), "xavier_normal", layer_generator(0, "n"), 0.3, scale_fan)
    # torch's own xavier_normal_ std for this shape: sqrt(2 / (256*9 + 512*9))
    expected = math.sqrt(2 / (256 * 9 + 512 * 9))
    assert abs(normal.std().item() / expected - 1) < 0.01 and abs(normal.mean().item()) < 0.01 * expected
    reference = torch.nn.init.xavier_normal_(torch.empty(512, 256, 3, 3), generator=torch.Generator().manual_seed(0))
    assert abs(normal.std().item() / reference.std().item() - 1) < 0.01


def test_xavier_draws_are_deterministic_per_seed_and_layer():
    a = init_weight((8, 4), "xavier_normal", layer_generator(1, "fc1"))
    assert torch.equal(a, init_weight((8, 4), "xavier_normal", layer_generator(1, "fc1")))
    assert not torch.equal(a, init_weight((8, 4), "xavier_normal", layer_generator(2, "fc1")))
