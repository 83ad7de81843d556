"""Fused masked linear (forward, dX, dS) and fused masked weight against the reference path.

Every kernel output is poisoned with NaN before the launch (``poisoned_outputs``), so an element
a kernel fails to write fails the comparison. Interpreter on CPU by default (tests/conftest.py).
"""
import copy
import os
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import supermask
from supermask import mask as ref
from supermask.kernels import (get_fp32_precision, interpreting, masked_linear, masked_matmul,
                               masked_weight_fused, matmul_ste, poisoned_outputs)

DEVICE = "cuda" if os.environ.get("SUPERMASK_TEST_ON_GPU") == "1" else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tol(dtype):
    """Max error allowed, relative to max(1, max |reference|), per dtype. fp32 goes through TF32
    tensor cores on a GPU (10-bit mantissa); the interpreter computes fp32 exactly."""
    if dtype == torch.float32:
        return 1e-5 if interpreting() or get_fp32_precision() == "ieee" else 5e-3
    # fp16: 11-bit mantissa; bf16: 8 bits, and Triton 3.8's interpreter truncates fp32->bf16.
    return {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


def close(got, want, dtype, what=""):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == dtype, (what, got.dtype)
    assert not torch.isnan(got).any(), f"{what}: NaN (unwritten output element?)"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item() if want.numel() else 0.0)
    assert err <= tol(dtype) * scale, f"{what}: max error {err:.3g} > {tol(dtype) * scale:.3g}"


def _scores(g, shape, dtype, ties):
    if ties:
        s = torch.randint(-3, 4, shape, generator=g).float() * 0.5
    else:
        s = torch.randn(shape, generator=g)
    return s.to(dtype)


def _reference(x, w, s, thr, gy):
    """The reference path's math in float64: y = x (w*m)^T, dx = dy (w*m), ds = (dy^T x) w sign(s),
    with m the reference mask (supermask.mask.mask_from_threshold, ties included)."""
    N, K = w.shape
    wm = w.double() * ref.mask_from_threshold(s.detach().abs(), thr)
    x2 = x.detach().double().reshape(-1, K)
    gy2 = gy.double().reshape(-1, N)
    y = (x2 @ wm.t()).reshape(*x.shape[:-1], N)
    gx = (gy2 @ wm).reshape(x.shape)
    gs = (gy2.t() @ x2) * w.double() * torch.sign(s.detach().double())
    return y, gx, gs


def _linear_cases(n):
    rng = random.Random(7)
    out = []
    for i in range(n):
        dtype = DTYPES[i % 3]
        m, nn_, k = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 70)
        lead = rng.choice([(), (), (2,)])
        layout = rng.choice(["contig", "contig", "x_t", "w_t", "all_t"])
        ties = rng.random() < 0.35
        frac = rng.choice([1e-9, 0.05, 0.5, 0.9, 1.0, rng.random()])
        out.append(pytest.param(rng.randrange(1 << 30), m, nn_, k, lead, layout, ties, frac, dtype,
                                id=(f"{i}-{dtype}-{m}x{nn_}x{k}-{lead}-{layout}-"
                                    f"{'ties' if ties else 'noties'}-{frac:.2g}")))
    return out


@pytest.mark.parametrize("seed,M,N,K,lead,layout,ties,frac,dtype", _linear_cases(150))
def test_masked_linear_forward_backward(seed, M, N, K, lead, layout, ties, frac, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    s = _scores(g, (N, K), dtype, ties)
    if layout in ("x_t", "all_t") and not lead:
        x = x.t().contiguous().t()  # same values, column-major storage
    if layout in ("w_t", "all_t"):
        w = w.t().contiguous().t()
        s = s.t().contiguous().t()
    x, w, s = x.to(DEVICE), w.to(DEVICE), s.to(DEVICE)
    thr = ref.topk_threshold(s.abs(), supermask.num_kept(s.numel(), frac))
    x.requires_grad_()
    s.requires_grad_()
    with poisoned_outputs():
        y = masked_linear(x, w, s, thr)
        gy = torch.randn(y.shape, generator=g).to(dtype).to(DEVICE)
        gx, gs = torch.autograd.grad(y, (x, s), gy)
    yr, gxr, gsr = _reference(x, w, s, thr, gy)
    close(y, yr.to(dtype).double(), dtype, "y")
    close(gx, gxr, dtype, "dx")
    close(gs, gsr, dtype, "dscores")


def test_split_threshold_falls_back_exactly():
    g = torch.Generator().manual_seed(0)
    s = (torch.randint(-2, 3, (16, 24), generator=g).float() * 0.5).to(DEVICE)
    w = torch.randn(16, 24, generator=g).to(DEVICE)
    x = torch.randn(5, 24, generator=g).to(DEVICE)
    thr = ref.topk_threshold(s.abs(), 101)
    assert thr.split, "the test needs ties split at the threshold"
    with poisoned_outputs():
        y = masked_linear(x, w, s, thr)
    wm = w * ref.mask_from_threshold(s.abs(), thr)
    close(y, x @ wm.t(), torch.float32, "split y")
    # A mask that ignored the tie-break (|s| >= v) would be measurably different here.
    wrong = x @ (w * (s.abs() >= thr.value)).t()
    assert (wrong - x @ wm.t()).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_matmul_without_mask_and_ste(dtype):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 19, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(19, 45, generator=g).to(dtype).to(DEVICE)
    with poisoned_outputs():
        c = masked_matmul(a, None, None, b)
    close(c, a.double() @ b.double(), dtype, "plain")
    w = torch.randn(37, 45, generator=g).to(dtype).to(DEVICE)
    s = torch.randn(37, 45, generator=g).to(dtype).to(DEVICE)
    s[0, :5] = 0  # sign(0) = 0
    with poisoned_outputs():
        d = matmul_ste(a, b, w, s)
    close(d, (a.double() @ b.double()) * w.double() * torch.sign(s.double()), dtype, "ste")
    assert (d[0, :5] == 0).all()


def test_shape_checks():
    w = torch.randn(4, 5, device=DEVICE)
    thr = ref.topk_threshold(w.abs(), 10)
    with pytest.raises(ValueError):
        masked_linear(torch.randn(3, 6, device=DEVICE), w, w, thr)
    with pytest.raises(ValueError):
        masked_linear(torch.randn(3, 5, device=DEVICE), w, torch.randn(5, 4, device=DEVICE), thr)
    with pytest.raises(TypeError):
        masked_linear(torch.randn(3, 5, device=DEVICE, dtype=torch.float16), w, w, thr)


def _weight_cases(n):
    rng = random.Random(11)
    shapes = [(1,), (7,), (5, 9), (33, 20), (4, 3, 3, 3), (6, 2, 5, 5), (3, 4, 1, 7), (17, 1000 // 17)]
    out = []
    for i in range(n):
        dtype = DTYPES[i % 3]
        shape = rng.choice(shapes)
        strided = rng.random() < 0.4
        ties = rng.random() < 0.4
        frac = rng.choice([1e-9, 0.3, 0.5, 0.99, 1.0, rng.random()])
        out.append(pytest.param(rng.randrange(1 << 30), shape, strided, ties, frac, dtype,
                                id=f"{i}-{dtype}-{shape}-{'strided' if strided else 'contig'}-{ties}-{frac:.2g}"))
    return out


@pytest.mark.parametrize("seed,shape,strided,ties,frac,dtype", _weight_cases(90))
def test_masked_weight_fused(seed, shape, strided, ties, frac, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    s = _scores(g, shape, dtype, ties)
    gout = torch.randn(shape, generator=g).to(dtype)
    if strided and len(shape) >= 2:
        w, s, gout = (t.transpose(0, -1).contiguous().transpose(0, -1) for t in (w, s, gout))
    w, s, gout = w.to(DEVICE), s.to(DEVICE), gout.to(DEVICE)
    thr = ref.topk_threshold(s.abs(), supermask.num_kept(s.numel(), frac))
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    with poisoned_outputs():
        mw = masked_weight_fused(w, s1, thr)
        (gs,) = torch.autograd.grad(mw, s1, gout)
    mr = ref.masked_weight(w, s2, thr)
    (gsr,) = torch.autograd.grad(mr, s2, gout)
    assert torch.equal(mw, mr)  # selection is exact in every dtype
    assert int((mw != 0).sum()) <= supermask.num_kept(s.numel(), frac)
    want = gout.double() * w.double() * torch.sign(s.double())
    close(gs, want, dtype, "dscores")
    if dtype != torch.bfloat16 or not interpreting():
        assert torch.equal(gs, gsr)


def _model():
    return nn.Sequential(
        supermask.SupermaskConv2d(3, 6, 3, padding=1, k=0.4, seed=1, name="c1"), nn.ReLU(),
        supermask.SupermaskConv2d(6, 4, 3, stride=2, k=0.6, seed=1, name="c2"), nn.ReLU(), nn.Flatten(),
        supermask.SupermaskLinear(4 * 3 * 3, 12, k=0.5, seed=1, name="f1"), nn.ReLU(),
        supermask.SupermaskLinear(12, 5, k=0.5, seed=1, name="f2")).to(DEVICE)


@pytest.mark.parametrize("topk", ["layer", "global"])
def test_training_step_matches_reference_backend(topk):
    torch.manual_seed(0)
    ref_model = _model()
    if topk == "global":
        supermask.use_global_topk(ref_model, 0.5)
    tri_model = supermask.set_backend(copy.deepcopy(ref_model), "triton")
    supermask.set_backend(ref_model, "torch")
    x = torch.randn(8, 3, 7, 7, device=DEVICE)
    target = torch.randint(0, 5, (8,), device=DEVICE)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
            for m in (ref_model, tri_model)]
    for step in range(3):
        losses = []
        for model, opt in zip((ref_model, tri_model), opts):
            opt.zero_grad()
            with poisoned_outputs():
                loss = F.cross_entropy(model(x), target)
                loss.backward()
            opt.step()
            losses.append(loss.detach())
        close(losses[1], losses[0], torch.float32, f"loss step {step}")
        for (n, a), (_, b) in zip(ref_model.named_parameters(), tri_model.named_parameters()):
            if a.grad is not None:
                close(b.grad, a.grad, torch.float32, f"grad {n} step {step}")
            close(b.detach(), a.detach(), torch.float32, f"{n} step {step}")
    supermask.set_backend(tri_model, "torch")
    for (_, a), (_, b) in zip(supermask.supermask_layers(ref_model), supermask.supermask_layers(tri_model)):
        assert torch.equal(a.mask(), b.mask())
