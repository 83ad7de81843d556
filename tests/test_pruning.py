"""Magnitude pruning: exact counts and tie rule, pruned weights stay zero, bit-exact rewinding."""
import pytest
import torch
import torch.nn as nn

from supermask import pruning
from supermask.models import build


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and immune to a busy machine
    yield


def tiny(seed=0, values=None):
    """fc at width 0.05 (784-15-5-10); values: draw weights from this small set (many ties)."""
    torch.manual_seed(seed)
    model = build("fc", (1, 28, 28), 10, 0.05)
    if values is not None:
        with torch.no_grad():
            for _, m in pruning.prunable_layers(model):
                m.weight.copy_(torch.tensor(values)[torch.randint(len(values), m.weight.shape)])
    return model


def reference_keep(magnitudes: torch.Tensor, alive: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Brute force: among alive entries, keep the n_keep largest |w|, lower flat index first on ties."""
    mag, alive = magnitudes.reshape(-1).tolist(), alive.reshape(-1).tolist()
    order = sorted((i for i in range(len(mag)) if alive[i]), key=lambda i: (-mag[i], i))
    keep = torch.zeros(len(mag), dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep.reshape(magnitudes.shape)


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.37])
def test_layer_scope_exact_count_and_ties(rate):
    model = tiny(values=[-2.0, -1.0, 0.0, 1.0, 2.0])  # almost every weight ties with many others
    masks = pruning.full_masks(model)
    for _ in range(3):
        new = pruning.magnitude_masks(model, masks, rate, "layer")
        for name, m in pruning.prunable_layers(model):
            alive = int(masks[name].sum())
            r = rate / 2 if name == pruning.output_layer(model) else rate
            expected = alive - int(alive * r + 0.5)
            assert int(new[name].sum()) == expected
            assert not (new[name] & ~masks[name]).any(), "a pruned weight came back"
            assert torch.equal(new[name], reference_keep(m.weight.abs(), masks[name], expected))
        masks = new


def test_global_scope_pools_all_but_the_output_layer():
    model = tiny(values=[-3.0, -1.0, 1.0, 0.5, 3.0])
    masks = pruning.full_masks(model)
    layers = pruning.prunable_layers(model)
    hidden, (out_name, _) = layers[:-1], layers[-1]
    for _ in range(2):
        new = pruning.magnitude_masks(model, masks, 0.3, "global")
        mags = torch.cat([m.weight.abs().reshape(-1) for _, m in hidden])
        alive = torch.cat([masks[n].reshape(-1) for n, _ in hidden])
        n_alive = int(alive.sum())
        expected = reference_keep(mags, alive, n_alive - int(n_alive * 0.3 + 0.5))
        got = torch.cat([new[n].reshape(-1) for n, _ in hidden])
        assert torch.equal(got, expected)
        n_out = int(masks[out_name].sum())
        assert int(new[out_name].sum()) == n_out - int(n_out * 0.15 + 0.5)
        masks = new
    # Global pruning really is global: layers end up at different sparsities.
    fractions = {round(float(masks[n].float().mean()), 3) for n, _ in hidden}
    assert len(fractions) > 1


def test_output_rate_and_bad_arguments():
    model = tiny()
    masks = pruning.magnitude_masks(model, None, 0.2, "layer", output_rate=0.0)
    assert masks[pruning.output_layer(model)].all()
    with pytest.raises(ValueError):
        pruning.magnitude_masks(model, None, 1.0)
    with pytest.raises(ValueError):
        pruning.magnitude_masks(model, None, 0.2, scope="neuron")
    assert pruning.num_to_prune(1, 0.9) == 0  # never prunes a layer's last weight
    assert pruning.num_to_prune(10, 0.25) == 3  # round half up


def _step_many(model, optimizer, steps=15):
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(10, (32,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1),
], ids=["sgd", "nesterov", "adam", "adamw"])
def test_pruned_weights_stay_exactly_zero_by_gradient_masking(make_opt):
    """The gradient hook alone (no re-zeroing after the step) keeps them at 0.0 and their
    optimiser state at 0 through momentum and weight decay."""
    model = tiny(seed=1)
    masks = pruning.magnitude_masks(model, None, 0.6, "layer")
    keeper = pruning.MaskKeeper(model, masks)  # zeroes pruned weights and masks their gradients
    optimizer = make_opt(model.parameters())
    before = {n: m.weight.detach().clone() for n, m in pruning.prunable_layers(model)}
    _step_many(model, optimizer)
    for name, m in pruning.prunable_layers(model):
        pruned = ~masks[name]
        assert pruned.any()
        assert (m.weight[pruned] == 0).all()
        assert (m.weight[pruned].view(torch.int32) == 0).all(), "-0.0 or denormal instead of +0.0"
        assert not torch.equal(m.weight[~pruned], before[name][~pruned]), "survivors did not train"
        for value in optimizer.state[m.weight].values():
            if torch.is_tensor(value) and value.shape == m.weight.shape:
                assert (value[pruned] == 0).all()
    keeper.remove()
    _step_many(model, make_opt(model.parameters()), steps=2)
    assert any((m.weight[~masks[n]] != 0).any() for n, m in pruning.prunable_layers(model)), \
        "without the hook pruned weights move: this test can fail"


def test_without_masking_pruned_weights_move():
    """The control for the test above: zeroing the weights once is not enough."""
    model = tiny(seed=1)
    masks = pruning.magnitude_masks(model, None, 0.6, "layer")
    pruning.apply_masks_(model, masks)
    _step_many(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2), steps=3)
    assert any((m.weight[~masks[n]] != 0).any() for n, m in pruning.prunable_layers(model))


def test_apply_masks_zeroes_nan_and_inf():
    model = tiny()
    masks = pruning.full_masks(model)
    name, layer = pruning.prunable_layers(model)[0]
    with torch.no_grad():
        layer.weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    masks[name][0, :3] = False
    pruning.apply_masks_(model, masks)
    assert (layer.weight[0, :3] == 0).all()


def test_rewind_is_bit_exact():
    model = tiny(seed=3)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _step_many(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=3)
    masks = pruning.magnitude_masks(model, None, 0.5, "layer")
    pruning.rewind_(model, init, masks)
    for name, m in pruning.prunable_layers(model):
        w, w0 = m.weight.detach(), init[f"{name}.weight"]
        assert torch.equal(w[masks[name]].view(torch.int32), w0[masks[name]].view(torch.int32))
        assert (w[~masks[name]] == 0).all()
    pruning.rewind_(model, init)  # no mask: the whole stored state, bit for bit
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int32), init[k].view(torch.int32))


def test_random_masks_keep_per_layer_counts():
    model = tiny(seed=4)
    ticket = pruning.magnitude_masks(model, pruning.magnitude_masks(model, None, 0.5), 0.5)
    rand = pruning.random_masks_like(ticket, seed=0)
    again = pruning.random_masks_like(ticket, seed=0)
    other = pruning.random_masks_like(ticket, seed=1)
    for name in ticket:
        assert int(rand[name].sum()) == int(ticket[name].sum())
        assert rand[name].shape == ticket[name].shape
        assert torch.equal(rand[name], again[name])
    big = pruning.prunable_layers(model)[0][0]
    assert not torch.equal(rand[big], ticket[big]) and not torch.equal(rand[big], other[big])
    assert pruning.sparsity(rand)["layers"] == pruning.sparsity(ticket)["layers"]


def test_reinit_is_fresh_and_deterministic():
    a, b = tiny(seed=0), tiny(seed=0)
    from supermask.init import init_dense_
    init_dense_(a, "kaiming_normal", 0)
    init_dense_(b, "kaiming_normal", 0)
    pruning.reinit_(b, "kaiming_normal", 0)
    c = pruning.reinit_(tiny(seed=9), "kaiming_normal", 0)
    for (_, ma), (_, mb), (_, mc) in zip(pruning.prunable_layers(a), pruning.prunable_layers(b),
                                         pruning.prunable_layers(c)):
        assert not torch.equal(ma.weight, mb.weight)
        assert torch.equal(mb.weight, mc.weight)
        assert abs(ma.weight.std() / mb.weight.std() - 1) < 0.3  # same distribution
