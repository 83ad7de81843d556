"""The fused CPU kernels (the supermask ops' CPU implementation) against the reference path: the
same masks, masked weights and gradients, bit for bit, step after step, for every input the
kernels take."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import supermask
from supermask import cpu_kernels as ck
from supermask import ops
from supermask.mask import masked_weight, num_kept, topk_mask, topk_threshold

pytestmark = pytest.mark.skipif(not ck.available(), reason=f"CPU kernels unavailable: {ck.why_unavailable()}")


def bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def reference(weight, scores, n_keep):
    """Masked weight and scores gradient (for grad g) of the reference path."""
    s = scores.detach().clone().requires_grad_()
    out = masked_weight(weight, s, topk_threshold(s.detach().abs(), n_keep))
    return out, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_matches_a_sort(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 3000, (1,), generator=g))
        levels = int(torch.randint(1, 50, (1,), generator=g)) if trial % 2 else 0
        x = (torch.randint(-levels, levels + 1, (n,), generator=g).to(dtype) if levels
             else torch.randn(n, generator=g, dtype=dtype))
        r = int(torch.randint(1, n + 1, (1,), generator=g))
        absolute = bool(trial % 3)
        v, above, equal = ck.select(x, r, absolute=absolute)
        a = x.abs() if absolute else x
        want = a.sort(descending=True).values[r - 1]
        assert v == float(want)
        assert above == int((a > want).sum()) and equal == int((a == want).sum())


def drift(scores, g, size):
    scores.add_(torch.randn(scores.shape, generator=g, dtype=scores.dtype) * size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, k", [((30, 40), 0.5), ((300, 200), 0.5), ((256, 257), 0.05), ((256, 257), 0.97)])
def test_training_like_steps_give_the_reference_mask_weight_and_gradient(dtype, shape, k):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=g, dtype=dtype)
    scores = torch.randn(shape, generator=g, dtype=dtype)
    n_keep = num_kept(scores.numel(), k)
    sid = ops.new_state()
    state = ops.get_state(sid)
    for step in range(25):
        # small moves (the band answers), a jump now and then (the band misses: fallback)
        drift(scores, g, 1.0 if step == 12 else 1e-3)
        s = scores.clone().requires_grad_()
        out = ops.masked_weight(weight, s, n_keep, sid)
        ref, s_ref = reference(weight, scores, n_keep)
        assert torch.equal(bits(out), bits(ref)), step
        grad = torch.randn(shape, generator=g, dtype=dtype)
        out.backward(grad)
        ref.backward(grad)
        assert torch.equal(bits(s.grad), bits(s_ref.grad)), step
    # the one-pass path answered (the rest: the first step and the jump), small layers too
    assert state.fused >= 20, (state.fused, state.cold)


@pytest.mark.parametrize("shape", [(200, 150), (40, 50)])  # above and below ck.SMALL
@pytest.mark.parametrize("levels", [1, 3, 40])
def test_heavy_ties_are_split_in_flat_order(levels, shape):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(shape, generator=g)
    sid = ops.new_state()
    for step in range(6):
        # scores on a few levels: the threshold value is shared by many entries, some dropped
        scores = (torch.randint(1, levels + 2, shape, generator=g).float() * 0.25
                  * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0))
        if step % 2:
            scores.view(-1)[: 1000] += 1e-3 * step  # a few distinct values near the levels
        out = ops.masked_weight(weight, scores, num_kept(scores.numel(), 0.5), sid)
        mask = topk_mask(scores, 0.5)
        assert int(mask.sum()) == num_kept(scores.numel(), 0.5)
        assert torch.equal(out != 0, mask), step
        assert torch.equal(bits(out), bits(weight * mask))


def test_a_masked_weight_still_held_is_never_overwritten():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 300, generator=g)
    scores = torch.randn(300, 300, generator=g)
    sid = ops.new_state()
    n_keep = num_kept(scores.numel(), 0.5)
    first = ops.masked_weight(weight, scores, n_keep, sid)
    first_copy = first.clone()
    drift(scores, g, 0.5)
    second = ops.masked_weight(weight, scores, n_keep, sid)
    assert torch.equal(first, first_copy)
    assert torch.equal(second, weight * topk_mask(scores, 0.5))


def test_graphs_run_backward_late_and_out_of_order_get_their_own_gradients():
    # two forwards (the second rewrites the layer's buffer, the second time with other scores),
    # then backwards in reverse order: each equals the reference path's
    g = torch.Generator().manual_seed(4)
    layer = supermask.SupermaskLinear(300, 200, k=0.5, init="kaiming_normal", seed=0, name="l")
    x0, x1 = torch.randn(5, 300, generator=g), torch.randn(5, 300, generator=g)
    gy = torch.randn(5, 200, generator=g)
    for _ in range(3):  # warm: the buffer is updated in place between steps
        layer(x0).sum().backward()
    for shared_scores in (True, False):
        scores = layer.scores if shared_scores else nn.Parameter(layer.scores.detach() * 1.01 + 0.001)
        x0g, x1g = x0.clone().requires_grad_(), x1.clone().requires_grad_()
        y0 = layer(x0g)
        layer.scores, old = scores, layer.scores
        y1 = layer(x1g)
        layer.scores = old
        y1.backward(gy)
        y0.backward(gy)
        for xg, s in ((x0g, old), (x1g, scores)):
            assert torch.equal(xg.grad, gy @ (layer.weight * topk_mask(s, 0.5)))


def test_input_gradient_passes_gradcheck_and_scores_gradient_is_straight_through():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(20, 30, generator=g, dtype=torch.float64)
    scores = torch.randn(20, 30, generator=g, dtype=torch.float64)
    sid = ops.new_state()
    n_keep = num_kept(scores.numel(), 0.4)
    x = torch.randn(7, 30, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.masked_linear(x, weight, scores, n_keep, sid), (x,))
    s = scores.clone().requires_grad_()
    gy = torch.randn(7, 20, generator=g, dtype=torch.float64)
    ops.masked_linear(x, weight, s, n_keep, sid).backward(gy)
    want = (gy.t() @ x.detach()) * weight * torch.sign(scores)
    assert torch.equal(s.grad, want)


def _model(init):
    return nn.Sequential(
        supermask.SupermaskConv2d(3, 6, 3, padding=1, k=0.4, init=init, seed=1, name="c1"), nn.ReLU(),
        supermask.SupermaskConv2d(6, 8, 3, stride=2, k=0.6, init=init, seed=1, name="c2"), nn.ReLU(), nn.Flatten(),
        supermask.SupermaskLinear(8 * 3 * 3, 300, k=0.5, init=init, seed=1, name="f1"), nn.ReLU(),
        supermask.SupermaskLinear(300, 10, k=0.5, init=init, seed=1, name="f2"))


@pytest.mark.parametrize("init", ["signed_constant", "kaiming_normal"])
@pytest.mark.parametrize("topk", ["layer", "global"])
def test_training_is_bit_identical_to_the_reference_backend(init, topk):
    torch.manual_seed(0)
    ref_model = _model(init)
    if topk == "global":
        supermask.use_global_topk(ref_model, 0.5)
    cpu_model = supermask.set_backend(copy.deepcopy(ref_model), "cpu")
    supermask.set_backend(ref_model, "torch")
    g = torch.Generator().manual_seed(6)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=1e-4)
            for m in (ref_model, cpu_model)]
    for step in range(12):
        x = torch.randn(16, 3, 8, 8, generator=g)
        target = torch.randint(0, 10, (16,), generator=g)
        for model, opt in zip((ref_model, cpu_model), opts):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            opt.step()
        for (n, a), (_, b) in zip(ref_model.named_parameters(), cpu_model.named_parameters()):
            assert torch.equal(bits(a.detach()), bits(b.detach())), (n, step)
    for (_, a), (_, b) in zip(supermask.supermask_layers(ref_model), supermask.supermask_layers(cpu_model)):
        assert torch.equal(a.mask(), b.mask())
    if topk == "layer":  # the 300 x 72 layer was answered by the one-pass band
        assert supermask.supermask_layers(cpu_model)[2][1]._state.state().fused >= 10
    ref_model.eval()
    cpu_model.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, 8, 8, generator=g)
        want = ref_model(x)
        assert torch.equal(want, cpu_model(x))


def test_tensors_the_kernels_do_not_take_go_the_reference_way():
    layer = supermask.SupermaskLinear(40, 30, k=0.5, seed=0, name="l").to(torch.bfloat16)
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    want = supermask.set_backend(ref, "torch")(x)
    assert torch.equal(layer(x), want)


def test_without_a_compiler_the_backend_says_why_and_auto_falls_back(tmp_path):
    code = ("import supermask, torch.nn as nn\n"
            "from supermask.cli import resolve_backend\n"
            "import torch\n"
            "print(resolve_backend('auto', torch.device('cpu')))\n"
            "try:\n"
            "    supermask.set_backend(nn.Sequential(supermask.SupermaskLinear(4, 4)), 'cpu')\n"
            "except RuntimeError as e:\n"
            "    print('error:', e)\n")
    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "torch"
    assert lines[1].startswith("error: the CPU kernels could not be built") and "no-such-compiler" in lines[1]


def test_the_build_is_cached_and_shared(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    code = "import supermask.cpu_kernels as ck; assert ck.available(), ck.why_unavailable()"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    assert len(list((tmp_path / "supermask").glob("cpu_kernels-*.so"))) == 1
