"""The hidden-networks-compatible mode (--hn-compat; on for a --config file of theirs): what
their code computes where ours differs (allenai/hidden-networks: args.py defaults, main.py's Adam,
utils/builder.py's scale_fan, utils/net_utils.py's freeze_model_weights), each against values worked
out here; and off, nothing changes (run names: tests/test_run_names.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import supermask as sm

from supermask import desc
from supermask import train as train_mod
from supermask.errors import UsageError
from supermask.layers import supermask_layers
from supermask.training import TrainConfig, learning_rate, make_optimizer

RELU_GAIN = math.sqrt(2)


def sm_linear(n):
    """A supermask layer with n weights (one output)."""
    return sm.SupermaskLinear(n, 1, k=0.5, seed=0)


def parsed(tmp_path, text, *flags):
    path = tmp_path / "c.yml"
    path.write_text(text)
    args = train_mod.parse_args(["--config", str(path), *flags])
    train_mod.validate(args)
    return args


def test_keys_a_file_leaves_out_take_hidden_networks_defaults(tmp_path):
    args = parsed(tmp_path, "arch: Conv4\nconv_type: SubnetConv\nprune_rate: 0.5\n")
    # args.py: 90 epochs, batch 256, constant_lr, kaiming_normal, ImageNet; no validation split there
    assert (args.hn_compat, args.epochs, args.batch_size, args.schedule, args.init, args.dataset, args.val_size,
            args.k, args.weight_decay, args.lr) == (True, 90, 256, "none", "kaiming_normal", "imagenet", 0, 0.5,
                                                    1e-4, 0.1)
    ours = parsed(tmp_path, "hn_compat: false\narch: Conv4\nconv_type: SubnetConv\nprune_rate: 0.5\n")
    assert (ours.hn_compat, ours.epochs, ours.batch_size, ours.schedule, ours.init, ours.dataset, ours.val_size) == (
        False, 15, 128, "cosine", "signed_constant", "mnist", 5000)
    assert "hn_compat" not in desc.train_identity(ours)  # off: the identity (and name) of before
    # --hn-compat asks for the mode with a file of ours too; flags still override the file
    forced = parsed(tmp_path, "hn_compat: false\narch: Conv4\nprune_rate: 0.5\n", "--hn-compat", "--epochs", "3")
    assert (forced.hn_compat, forced.epochs, forced.batch_size) == (True, 3, 256)


def test_without_prune_rate_their_default_keeps_nothing_so_k_is_asked_for(tmp_path):
    with pytest.raises(UsageError, match="pass --k"):
        parsed(tmp_path, "arch: Conv4\nconv_type: SubnetConv\n")
    assert parsed(tmp_path, "arch: Conv4\nconv_type: DenseConv\nbn_type: LearnedBatchNorm\n").dense


@pytest.mark.parametrize("compat, expected", [(True, 0.0), (False, 5e-4)])
def test_adam_takes_no_weight_decay_in_hidden_networks(tmp_path, compat, expected):
    text = f"hn_compat: {str(compat).lower()}\narch: FC\noptimizer: adam\nweight_decay: 0.0005\nconv_type: DenseConv\n"
    args = parsed(tmp_path, text, "--dataset", "synthetic")
    config = desc.train_identity(args)
    assert config["weight_decay"] == expected  # config.json says what is computed
    opt = make_optimizer(desc.build_model(config, (1, 28, 28), 10), desc.training_config(config))
    assert all(g["weight_decay"] == expected for g in opt.param_groups)
    sgd = parsed(tmp_path, text.replace("adam", "sgd"), "--dataset", "synthetic")
    assert sgd.weight_decay == 5e-4  # their SGD does take it


def first_weight(tmp_path, init, compat, k=0.3, scale_fan=True):
    text = (f"hn_compat: {str(compat).lower()}\narch: FC\nset: MNIST\nconv_type: SubnetConv\ninit: {init}\n"
            f"scale_fan: {scale_fan}\nprune_rate: {k}\n")
    config = desc.train_identity(parsed(tmp_path, text, "--dataset", "synthetic"))
    model = desc.build_model(config, (1, 28, 28), 10)
    return next(layer for _, layer in supermask_layers(model)).weight  # 784 -> 300


@pytest.mark.parametrize("k", [0.3, 0.5, 0.9])
def test_scale_fan_is_fan_in_times_one_minus_k_in_hidden_networks(tmp_path, k):
    # signed_constant: every weight +-gain / sqrt(fan); fan_in 784. Theirs fan 784 * (1 - k), ours 784 * k.
    theirs = first_weight(tmp_path, "signed_constant", True, k)
    ours = first_weight(tmp_path, "signed_constant", False, k)
    assert torch.allclose(theirs.abs(), torch.tensor(RELU_GAIN / math.sqrt(784 * (1 - k))))
    assert torch.allclose(ours.abs(), torch.tensor(RELU_GAIN / math.sqrt(784 * k)))
    assert torch.equal(theirs.sign(), ours.sign())  # the same draw, only the scale differs
    kn_theirs = first_weight(tmp_path, "kaiming_normal", True, k)
    kn_ours = first_weight(tmp_path, "kaiming_normal", False, k)
    assert torch.allclose(kn_theirs, kn_ours * math.sqrt(k / (1 - k)))


def test_inits_that_take_no_scale_fan_there_take_none_in_the_mode(tmp_path):
    for init in ("kaiming_uniform", "xavier_normal", "xavier_constant"):
        unscaled = first_weight(tmp_path, init, False, scale_fan=False)
        assert torch.allclose(first_weight(tmp_path, init, True), unscaled), init


def test_dense_first_and_last_layers_are_frozen_at_their_init_in_hidden_networks(tmp_path):
    text = ("arch: FC\nset: MNIST\nconv_type: SubnetConv\nprune_rate: 0.5\nfirst_layer_dense: True\n"
            "last_layer_dense: True\n")
    for compat, trained in ((True, False), (False, True)):
        prefix = "" if compat else "hn_compat: false\n"
        config = desc.train_identity(parsed(tmp_path, prefix + text, "--dataset", "synthetic"))
        model = desc.build_model(config, (1, 28, 28), 10)
        first, last = model[1], model[5]
        assert type(first) is torch.nn.Linear and first.weight.requires_grad is trained
        assert last.weight.requires_grad is trained
        before = first.weight.detach().clone()
        opt = make_optimizer(model, desc.training_config(config))
        F.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.randint(10, (8,))).backward()
        opt.step()
        assert torch.equal(first.weight, before) is not trained


def get_subnet(scores: torch.Tensor, k: float) -> torch.Tensor:
    """hidden-networks' GetSubnet.forward (utils/conv_type.py), written out: sort the scores
    ascending, zero the first j = int((1 - k) * n), keep the rest (among equal scores the sort keeps
    flat order, so the higher index is kept)."""
    out = torch.empty(scores.numel())
    _, idx = scores.flatten().sort(stable=True)
    j = int((1 - k) * scores.numel())
    out[idx[:j]] = 0
    out[idx[j:]] = 1
    return out.reshape(scores.shape)


# k as a YAML file writes it (0.01 steps and the paper's values), n from 1 to 64 and a few layer sizes
K_GRID = sorted({round(0.01 * i, 2) for i in range(1, 101)} | {0.3, 0.7, 0.9, 0.95, 0.99})
N_GRID = [*range(1, 65), 100, 128, 300, 1000, 4608]


def test_kept_count_and_mask_equal_get_subnets_for_every_n_and_k():
    differs = 0
    for n in N_GRID:
        layer = sm_linear(n)
        g = torch.Generator().manual_seed(n)
        layer.scores.data = (torch.randperm(n, generator=g).float() + 1).reshape(1, n)  # distinct |scores|
        layer.kept_count = "hn"
        for k in K_GRID:
            layer.k = k
            theirs = get_subnet(layer.scores.detach().abs(), k)
            assert torch.equal(layer.mask().float(), theirs), (n, k)
            assert torch.equal(layer.effective_weight(), layer.weight * theirs), (n, k)
            differs += int(theirs.sum()) != sm.num_kept(n, k)
    assert differs > 0.2 * len(N_GRID) * len(K_GRID)  # the two counts really differ on much of the grid


def test_the_mode_gives_every_layer_their_count(tmp_path):
    text = "arch: Conv4\nset: CIFAR10\nconv_type: SubnetConv\nprune_rate: 0.9\n"
    for compat in (True, False):
        prefix = "" if compat else "hn_compat: false\n"
        config = desc.train_identity(parsed(tmp_path, prefix + text, "--dataset", "synthetic"))
        model = desc.build_model(config, (1, 28, 28), 10)
        for _, layer in supermask_layers(model):
            n = layer.weight.numel()
            count = n - int((1 - 0.9) * n) if compat else sm.num_kept(n, 0.9)
            assert int(layer.mask().sum()) == count


@pytest.mark.parametrize("schedule, warmup, expected", [
    # epochs 10, lr 0.1, 3 iterations per epoch; by hand from their utils/schedulers.py:
    # cosine: epoch e -> 0.05 * (1 + cos(pi * e / 10)), constant over the epoch's iterations
    ("cosine", 0, [0.05 * (1 + math.cos(math.pi * e / 10)) for e in range(10)]),
    # warm-up 2: 0.1 * (e + 1) / 2 for e < 2, then 0.05 * (1 + cos(pi * (e - 2) / 8))
    ("cosine", 2, [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * (e - 2) / 8)) for e in range(2, 10)]),
    ("none", 2, [0.05] + [0.1] * 9),
    # multistep (adjust 4, gamma 0.5: milestones 4, 8): 0.1 * 0.5 ** (e // 4), no warm-up there
    ("multistep", 2, [0.1] * 4 + [0.05] * 4 + [0.025] * 2),
])
def test_the_learning_rate_is_set_once_per_epoch_as_hidden_networks_does(schedule, warmup, expected):
    cfg = TrainConfig(epochs=10, lr=0.1, schedule=schedule, warmup_epochs=warmup, milestones=(4, 8), gamma=0.5,
                      hn_compat=True)
    got = [learning_rate(cfg, step, 30, steps_per_epoch=3) for step in range(30)]
    assert got == pytest.approx([lr for lr in expected for _ in range(3)], rel=1e-12)
    ours = TrainConfig(epochs=10, lr=0.1, schedule=schedule, warmup_epochs=warmup, milestones=(4, 8), gamma=0.5)
    if schedule == "cosine":  # ours anneals every iteration
        assert [learning_rate(ours, s, 30, 3) for s in range(30)] != pytest.approx(got)


def test_the_mode_reaches_the_training_config(tmp_path):
    config = desc.train_identity(parsed(tmp_path, "arch: FC\nconv_type: DenseConv\n", "--dataset", "synthetic"))
    assert desc.training_config(config).hn_compat is True
    ours = desc.train_identity(parsed(tmp_path, "hn_compat: false\narch: FC\nconv_type: DenseConv\n"))
    assert desc.training_config(ours).hn_compat is False


@pytest.mark.parametrize("arch, compat, width", [("Conv4", True, 1.0), ("Conv4", False, 2.0), ("cResNet18", True, 1.0),
                                                 ("Conv4Wide", True, 2.0), ("Conv6Wide", False, 2.0)])
def test_width_mult_scales_only_the_wide_convs_in_hidden_networks(tmp_path, arch, compat, width):
    text = f"hn_compat: {str(compat).lower()}\narch: {arch}\nwidth_mult: 2\nprune_rate: 0.5\n"
    assert parsed(tmp_path, text).width == width
    assert parsed(tmp_path, text, "--width", "0.5").width == 0.5  # our flag still scales any model


@pytest.mark.parametrize("dataset, compat, data_dir", [("ImageNet", True, "/d/imagenet"),
                                                       ("CIFAR10", True, "/d/cifar10"),
                                                       ("ImageNet", False, "/d")])
def test_their_data_root_is_read_as_their_loaders_do(tmp_path, dataset, compat, data_dir):
    text = f"hn_compat: {str(compat).lower()}\narch: Conv4\nset: {dataset}\ndata: /d\nprune_rate: 0.5\n"
    assert parsed(tmp_path, text).data_dir == data_dir
