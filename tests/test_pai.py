"""Pruning at initialisation: SNIP, GraSP and SynFlow scores against hand computations, SynFlow's
conservation law and schedule, exact counts, and supermask.train --prune-at-init end to end."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from supermask import data as data_mod
from supermask import desc
from supermask import pai, pruning
from supermask import train as train_mod
from supermask.cli import run_main
from supermask.mask import num_kept
from supermask.models import build

FAST = ["--dataset", "synthetic", "--epochs", "1", "--no-progress", "--width", "0.25", "--dense"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def tiny_net(dtype=torch.float64):
    """2-3-2 ReLU net without biases, weights fixed by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False)).to(dtype)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5, -1.0], [1.5, 0.25], [-0.75, 2.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, -0.5, 0.25], [-2.0, 0.75, 1.25]]))
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.2]], dtype=dtype)
    y = torch.tensor([0, 1, 1])
    return net, x, y


def hand_gradients(w1, w2, x, y, temperature=1.0):
    """dL/dW1, dL/dW2 of mean cross entropy of (W2 relu(W1 x)) / T, by the chain rule (no autograd)."""
    pre = x @ w1.T
    h = pre.clamp(min=0)
    z = h @ w2.T / temperature
    p = torch.softmax(z, 1)
    dz = (p - F.one_hot(y, 2).to(p.dtype)) / len(y) / temperature
    dw2 = dz.T @ h
    dh = dz @ w2 * (pre > 0).to(p.dtype)
    dw1 = dh.T @ x
    return dw1, dw2


def test_snip_scores_are_abs_grad_times_weight_by_hand():
    net, x, y = tiny_net()
    w1, w2 = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    dw1, dw2 = hand_gradients(w1, w2, x, y)
    scores = pai.snip_scores(net, x, y)
    torch.testing.assert_close(scores["0"], (dw1 * w1).abs(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(scores["2"], (dw2 * w2).abs(), rtol=1e-12, atol=1e-15)
    assert net[0].weight.grad is None  # the model handed in is untouched


def test_grasp_scores_are_minus_w_times_hessian_gradient_and_the_smallest_are_kept():
    net, x, y = tiny_net()
    w1, w2 = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    T = pai.GRASP_TEMPERATURE

    def loss(flat):
        a, b = flat[:6].reshape(3, 2), flat[6:].reshape(2, 3)
        return F.cross_entropy((x @ a.T).clamp(min=0) @ b.T / T, y)

    flat = torch.cat([w1.reshape(-1), w2.reshape(-1)])
    hess = torch.autograd.functional.hessian(loss, flat)  # the full 12x12 Hessian
    g = torch.cat([d.reshape(-1) for d in hand_gradients(w1, w2, x, y, T)])
    expected = -(flat * (hess @ g))  # Wang et al. 2020 eq. 8: S(-w) = -w * Hg
    scores = pai.grasp_scores(net, x, y)
    got = torch.cat([scores["0"].reshape(-1), scores["2"].reshape(-1)])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-18)
    assert got.abs().max() > 0
    # GraSP removes the weights of largest S(-w): the mask keeps the num_kept smallest.
    masks = pai.pai_masks(net, "grasp", 0.5, batch=(x, y))
    kept = torch.cat([masks["0"].reshape(-1), masks["2"].reshape(-1)])
    assert int(kept.sum()) == num_kept(12, 0.5) == 6
    assert set(torch.nonzero(kept).reshape(-1).tolist()) == set(torch.argsort(expected)[:6].tolist())


@pytest.mark.parametrize("model,width", [("fc", 0.05), ("conv2", 0.0625)])
def test_synflow_conservation_every_layer_sums_to_R(model, width):
    net = build(model, (1, 28, 28), 10, width)
    scores = pai.synflow_scores(net, (1, 28, 28))
    # R = 1^T prod |W| 1, computed directly
    absnet = build(model, (1, 28, 28), 10, width).double()
    absnet.load_state_dict({k: v.abs().double() for k, v in net.state_dict().items()})
    r = absnet(torch.ones(1, 1, 28, 28, dtype=torch.float64)).sum().item()
    sums = [s.sum().item() for s in scores.values()]
    assert len(sums) == len(pruning.prunable_layers(net)) and r > 0
    for s in sums:
        assert s == pytest.approx(r, rel=1e-10)
    assert all(bool((s >= 0).all()) for s in scores.values())


def test_synflow_masked_weights_score_zero_and_conservation_holds_on_the_subnetwork():
    net = build("fc", (1, 28, 28), 10, 0.05)
    masks = pai.pai_masks(net, "random", 0.5, seed=3)
    scores = pai.synflow_scores(net, (1, 28, 28), masks)
    sums = [s.sum().item() for s in scores.values()]
    assert all(s == pytest.approx(sums[0], rel=1e-10) for s in sums)
    assert all(bool((scores[n][~masks[n]] == 0).all()) for n in masks)


@pytest.mark.parametrize("iterations", [1, 10, 100])
def test_iterative_synflow_follows_the_exponential_schedule_to_the_target(iterations):
    net = build("fc", (1, 28, 28), 10, 0.05)
    total = sum(m.weight.numel() for _, m in pruning.prunable_layers(net))
    history = []
    k = 0.02
    masks = pai.synflow_masks(net, (1, 28, 28), k, "global", iterations, history)
    assert history == [num_kept(total, k ** (r / iterations)) for r in range(1, iterations + 1)]
    assert sum(int(m.sum()) for m in masks.values()) == num_kept(total, k) == round(k * total)


def test_iterative_synflow_only_prunes_what_it_kept():
    net = build("fc", (1, 28, 28), 10, 0.05)
    prev = pai.synflow_masks(net, (1, 28, 28), 0.3, "global", iterations=3)
    # one more round from prev's state is a subset of prev
    nxt = pai.keep_top(pai.synflow_scores(net, (1, 28, 28), prev), 0.2, "global", alive=prev)
    assert all(bool((nxt[n] <= prev[n]).all()) for n in prev)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 1, 28, 28, generator=g), torch.randint(10, (32,), generator=g)


@pytest.mark.parametrize("method", pai.METHODS)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("k", [0.1, 0.02])
def test_every_method_keeps_exact_counts(method, scope, k):
    net = build("fc", (1, 28, 28), 10, 0.1)
    masks = pai.pai_masks(net, method, k, scope, batch=_batch(), seed=1, iterations=5)
    layers = pruning.prunable_layers(net)
    assert list(masks) == [n for n, _ in layers]
    for name, m in layers:
        assert masks[name].dtype == torch.bool and masks[name].shape == m.weight.shape
    if scope == "layer":
        assert [int(masks[n].sum()) for n, _ in layers] == [num_kept(m.weight.numel(), k) for _, m in layers]
    else:
        total = sum(m.weight.numel() for _, m in layers)
        assert sum(int(v.sum()) for v in masks.values()) == num_kept(total, k)  # round(k * N), half up


def test_magnitude_and_snip_keep_the_largest_scores_by_brute_force():
    net = build("fc", (1, 28, 28), 10, 0.05)
    x, y = _batch()
    for method, scores in (("magnitude", {n: m.weight.detach().abs() for n, m in pruning.prunable_layers(net)}),
                           ("snip", pai.snip_scores(net, x, y))):
        masks = pai.pai_masks(net, method, 0.2, "global", batch=(x, y))
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        order = sorted(range(len(flat)), key=lambda i: (-flat[i].item(), i))
        expected = torch.zeros(len(flat), dtype=torch.bool)
        expected[order[:num_kept(len(flat), 0.2)]] = True
        assert torch.equal(torch.cat([m.reshape(-1) for m in masks.values()]), expected), method


def test_scoring_leaves_the_model_and_the_global_rng_untouched():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 20, bias=False), nn.BatchNorm1d(20), nn.ReLU(),
                        nn.Linear(20, 10, bias=False))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    for method in pai.METHODS:
        pai.pai_masks(net, method, 0.1, batch=_batch(), iterations=3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_unknown_method_and_bad_k_raise():
    net = build("fc", (1, 28, 28), 10, 0.05)
    with pytest.raises(ValueError, match="unknown pruning-at-init method"):
        pai.pai_masks(net, "obd", 0.1, batch=_batch())
    for k in (0.0, 1.5):
        with pytest.raises(ValueError, match="k must be in"):
            pai.pai_masks(net, "magnitude", k)


# --- supermask.train --prune-at-init ---------------------------------------------------------

def run(argv):
    return run_main("python -m supermask.train", train_mod.main, argv)


def _layers_of(out):
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    return ckpt, {n: ckpt["model"][f"{n}.weight"] for n in ckpt["masks"]}


def test_train_prune_at_init_holds_the_mask_and_is_stored(tmp_path):
    out = tmp_path / "snip"
    assert run(FAST + ["--prune-at-init", "snip", "--k", "0.1", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["prune_at_init"] == "snip" and config["topk"] == "global" and config["k"] == 0.1
    ckpt, weights = _layers_of(out)
    masks = ckpt["masks"]
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == num_kept(total, 0.1)  # round(k * N), half up
    for n, w in weights.items():
        assert bool((w[~masks[n]] == 0).all())  # pruned weights exactly zero after training
        assert bool((w[masks[n]] != 0).all())
    results = json.loads((out / "results.json").read_text())
    assert results["params_kept"] == num_kept(total, 0.1)  # round(k * N), half up
    # the mask is the one pai_masks chooses on the untrained network of the config
    dataset = data_mod.load("synthetic")
    model = desc.build_model(config, dataset.input_shape, dataset.num_classes)
    again = pai.pai_masks(model, "snip", 0.1, "global", pai.scoring_batch(dataset, 128, 0))
    assert all(torch.equal(again[n], masks[n]) for n in masks)


def test_default_scope_is_the_papers_and_topk_overrides(tmp_path):
    a, b = tmp_path / "mag", tmp_path / "mag_global"
    assert run(FAST + ["--prune-at-init", "magnitude", "--k", "0.1", "--out", str(a)]) == 0
    assert run(FAST + ["--prune-at-init", "magnitude", "--k", "0.1", "--topk", "global", "--out", str(b)]) == 0
    ma, mb = (torch.load(o / "checkpoint.pt", weights_only=True)["masks"] for o in (a, b))
    assert [int(m.sum()) for m in ma.values()] == [num_kept(m.numel(), 0.1) for m in ma.values()]
    assert [int(m.sum()) for m in ma.values()] != [int(m.sum()) for m in mb.values()]


def test_sanity_checks_shuffle_and_reinit(tmp_path):
    base, shuf, rein = tmp_path / "base", tmp_path / "shuffle", tmp_path / "reinit"
    flags = FAST + ["--prune-at-init", "synflow", "--k", "0.05"]
    assert run(flags + ["--out", str(base)]) == 0
    assert run(flags + ["--pai-check", "shuffle", "--out", str(shuf)]) == 0
    assert run(flags + ["--pai-check", "reinit", "--out", str(rein)]) == 0
    mb, ms, mr = (torch.load(o / "checkpoint.pt", weights_only=True)["masks"] for o in (base, shuf, rein))
    for n in mb:
        assert int(ms[n].sum()) == int(mb[n].sum())  # same per-layer density
        assert torch.equal(mr[n], mb[n])  # reinit keeps the mask
    assert any(not torch.equal(ms[n], mb[n]) for n in mb)
    assert len({json.loads((o / "config.json").read_text()).get("pai_check") for o in (base, shuf, rein)}) == 3


def test_a_finished_pai_run_is_only_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = FAST + ["--prune-at-init", "random", "--k", "0.2"]
    assert run(flags) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("fc_w0.25_synthetic_random0.2_s0_")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}
    assert run(flags) == 0
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"} == before


# --- supermask.compare --pai --------------------------------------------------------------------

CMP = ["--dataset", "synthetic", "--widths", "0.05", "--imp-widths", "0.05", "--ks", "0.5,0.1", "--epochs", "1",
       "--rounds", "0", "--controls", "", "--seeds", "0", "--threads", "1", "--no-progress"]


def test_compare_trains_pai_methods_at_the_edge_popup_sparsities_once(tmp_path, capsys):
    from supermask import compare

    runs, out = tmp_path / "runs", tmp_path / "cmp"
    argv = [*CMP, "--pai", "snip,random", "--pai-checks", "shuffle", "--runs-dir", str(runs), "--out", str(out)]
    assert compare.main(argv) == 0
    with open(out / "table.csv") as f:
        rows = list(__import__("csv").DictReader(f))
    by = {(r["method"], r["setting"]): r for r in rows}
    for k in ("0.5", "0.1"):
        ep = by[("edge-popup", f"k={k}")]
        for method in ("PaI snip", "PaI random", "PaI snip shuffle", "PaI random shuffle"):
            assert by[(method, f"k={k}")]["weights_kept"] == ep["weights_kept"], (method, k)  # matched sparsity
    methods = [r["method"] for r in rows]
    assert methods.index("IMP ticket") < methods.index("PaI snip") < methods.index("PaI snip shuffle")
    table = (out / "table.md").read_text()
    assert "| PaI snip | 0.05 | k=0.1 |" in table
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")}
    assert len(before) == 1 + 2 * 5 + 2  # dense, 2 ks x (edge-popup + 4 PaI), IMP (its results and round 0)
    assert compare.main(argv) == 0  # all stored: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")} == before


@pytest.mark.parametrize("extra,message", [
    (["--pai", "obd"], "unknown pruning-at-init method 'obd'"),
    (["--pai", "snip", "--pai-checks", "flip"], "unknown --pai-checks entry 'flip'"),
    (["--pai-checks", "shuffle"], "--pai-checks needs --pai"),
])
def test_compare_pai_bad_input_one_line_exit_2(tmp_path, capsys, extra, message):
    from supermask import compare

    argv = [*CMP, "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), *extra]
    assert run_main(compare.PROG, compare.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "runs").exists()
