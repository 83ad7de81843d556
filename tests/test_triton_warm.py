"""The warm-started Triton threshold (kernels.threshold.warm_topk_threshold_device) against a stable
sort over drifting training steps: small drift (the band answers), a big jump (the band misses: the
cold select on the device), ties split inside the band and in the cold select, a band that overflows
its buffer; and the device state follows supermask.mask's policy functions. Triton's interpreter
(tests/conftest.py); small n, as the interpreter is slow."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from supermask import mask, ops  # noqa: E402
from supermask.kernels import _common, topk_threshold_device  # noqa: E402
from supermask.kernels import threshold as T  # noqa: E402

if not _common.interpreting():  # pragma: no cover
    pytest.skip("interpreter tests", allow_module_level=True)


def oracle(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The definition: the first n_keep entries of a stable descending sort of |s|."""
    flat = scores.abs().reshape(-1).float()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:n_keep]] = True
    return keep.reshape(scores.shape)


def device_mask(scores, value, ties, limit) -> torch.Tensor:
    """The mask the kernels apply: |s| > value, or == value at a flat index below limit."""
    a = scores.abs()
    index = torch.arange(scores.numel()).reshape(scores.shape)
    return (a > value) | ((a == value) & (index < limit))


def _run(s, n_keep, steps, move, warm=None):
    """Runs the warm threshold over `steps` steps, checking each against the oracle and the cold
    select; move(s, step) gives the next step's scores. Returns the state."""
    warm = warm or T.DeviceWarmStart()
    for step in range(steps):
        value, ties, limit = T.warm_topk_threshold_device(s, n_keep, warm)
        want = oracle(s, n_keep)
        got = device_mask(s, value, ties, limit)
        assert int(got.sum()) == n_keep, step
        assert torch.equal(got, want), step
        cold_value, cold_ties, _ = topk_threshold_device(s, n_keep)
        assert value.dtype == s.dtype and torch.equal(value, cold_value), step
        assert int(ties) == int(cold_ties), step  # -1 when every equal entry is kept
        s = move(s, step)
    return warm


def _drift(g, size=1e-3, jump_at=None, factor=4.0):
    def move(s, step):
        t = s.float() + size * torch.randn(s.shape, generator=g)
        if step == jump_at:
            t = t * factor  # the threshold moves far outside any band: the cold select answers
        return t.to(s.dtype)
    return move


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_drifting_steps_with_a_jump_equal_a_stable_sort(dtype):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(40, 100, generator=g).to(dtype)
    warm = _run(s, 1300, 6, _drift(g, jump_at=2))
    warm_steps, cold_steps = warm.steps()
    assert cold_steps == 2 and warm_steps == 4  # step 0 and the step after the jump were cold


def test_ties_split_inside_the_band():
    """Scores on a grid of 1e-3: several entries share each value near the threshold, so the band's
    answer keeps only some of the equal entries (the tie limit from the band's indices)."""
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(3000, generator=g) * 1000).round() / 1000
    warm = T.DeviceWarmStart()
    splits = 0
    for step in range(5):
        value, ties, limit = T.warm_topk_threshold_device(s, 1111, warm)
        assert torch.equal(device_mask(s, value, ties, limit), oracle(s, 1111)), step
        splits += int(ties) >= 0
        s = s + torch.randint(-1, 2, s.shape, generator=g).float() / 1000  # drift on the same grid
    assert warm.steps()[0] >= 3 and splits >= 3  # the band answered, ties were split


def test_heavy_ties_in_the_cold_select():
    """Few levels: the density ranks hold one value (no band: every step cold), the cold tie limit
    found through the per-chunk counts."""
    g = torch.Generator().manual_seed(3)
    s = torch.randint(-4, 5, (2500,), generator=g).float() / 4
    move = lambda s, step: s[torch.randperm(s.numel(), generator=g)]  # noqa: E731
    warm = _run(s, 700, 3, move)
    assert warm.steps() == (0, 3)


def test_a_band_over_its_buffer_falls_back_to_the_cold_select(monkeypatch):
    monkeypatch.setattr(T, "_BAND_CAP", 16)  # the band of a 4000-entry layer holds ~128: overflow
    g = torch.Generator().manual_seed(4)
    warm = _run(torch.randn(4000, generator=g), 2000, 3, _drift(g))
    assert warm.steps() == (0, 3)


def test_edge_ranks_and_non_contiguous_scores():
    g = torch.Generator().manual_seed(5)
    for n_keep in (1, 2, 2999, 3000):
        _run(torch.randn(3000, generator=g), n_keep, 2, _drift(g))
    s = torch.randn(60, 50, generator=g).t()  # non-contiguous: the cold select, same answer
    _run(s, 1000, 1, lambda s, step: s)


def test_the_device_state_follows_the_policy_functions():
    """After a cold step the density is mask.cold_density of the selections q ranks either side; after
    a band step, mask.band_moved's running mean and shift over the band mask.band_half_width and
    mask.band_edges drew (fp32 on the device)."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(5000, generator=g)
    n, n_keep = s.numel(), 1800
    warm = T.DeviceWarmStart()
    T.warm_topk_threshold_device(s, n_keep, warm)
    q = mask.density_ranks(n, n_keep)
    kth = lambda t, r: float(t.abs().sort(descending=True).values[r - 1])  # noqa: E731
    value, density, shift = warm.floats[:3].tolist()
    assert value == kth(s, n_keep) and shift == 0.0
    assert density == pytest.approx(mask.cold_density(q, kth(s, n_keep - q) - kth(s, n_keep + q)), rel=1e-5)
    s2 = s + 1e-3 * torch.randn(n, generator=g)
    T.warm_topk_threshold_device(s2, n_keep, warm)
    assert warm.steps() == (1, 1)
    half = mask.band_half_width(mask.band_target(n), density, shift, mask._BAND_SHIFT)
    lo, hi = mask.band_edges(value, half)
    assert warm.floats[3:5].tolist() == pytest.approx([lo, hi], rel=1e-5)
    n_band = int(((s2.abs() >= warm.floats[3]) & (s2.abs() <= warm.floats[4])).sum())
    want_density, want_shift = mask.band_moved(value, density, kth(s2, n_keep), n_band,
                                               float(warm.floats[4] - warm.floats[3]))
    assert warm.floats[:3].tolist() == pytest.approx([kth(s2, n_keep), want_density, want_shift], rel=1e-5)


def test_training_steps_through_the_ops_equal_the_reference():
    """supermask::masked_linear on the Triton path with a layer state (the warm start) over SGD
    steps: the output and gradients of the reference path for the same scores, every step."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(30, 80, generator=g)
    scores = torch.randn(30, 80, generator=g).requires_grad_()
    n_keep = mask.num_kept(scores.numel(), 0.4)
    sid = ops.new_state()
    for step in range(4):
        x = torch.randn(8, 80, generator=g).requires_grad_()
        got = []
        for path, state in (("triton", sid), ("reference", -1)):
            y = ops.masked_linear(x, w, scores, n_keep, state, path)
            y.square().sum().backward()
            got.append((y.detach(), x.grad, scores.grad))
            x.grad = scores.grad = None
        value, limit = ops.get_state(sid).saved[1]  # the forward's threshold, read by the kernels
        assert torch.equal(device_mask(scores.detach(), value, None, limit), oracle(scores.detach(), n_keep)), step
        torch.testing.assert_close(got[0], got[1], rtol=1e-4, atol=1e-4)  # fp32 sums in another order
        with torch.no_grad():
            scores -= 1e-4 * got[0][2]  # a small step: the threshold drifts, the band holds it
    warm = ops.get_state(sid).device_warm
    assert warm is not None and warm.steps()[0] >= 2


_COMPILE = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from supermask import mask
from supermask.kernels import threshold as T

I, F = "i32", "*fp32"
P = {a: "*i32" for a in ("ints_ptr", "radix_ptr", "hist_ptr", "band_bits_ptr", "band_index_ptr", "counts_ptr")}
KERNELS = [  # (kernel, its signature, constexprs): the launches of warm_topk_threshold_device
    (T._warm_plan_kernel, dict(floats_ptr=F, n_hist_words=I, n_keep=I, k_above=I, k_below=I, target=I),
     dict(BAND_SHIFT=mask._BAND_SHIFT, HBLOCK=1024)),
    (T._warm_gather_kernel, dict(x_ptr="*bf16", n=I, floats_ptr=F), dict(CAP=T._BAND_CAP, BLOCK=4096)),
    (T._warm_select_kernel, dict(floats_ptr=F, value_ptr="*fp16", ties_ptr="*i64", limit_ptr="*i64", n=I, n_keep=I),
     dict(CAP=T._BAND_CAP)),
    (T._radix_histogram_kernel, dict(x_ptr=F, n=I, state_ptr="*i32", gate_ptr="*i32"),
     dict(SHIFT=16, BLOCK=4096, RANKS=3, GATED=True)),
    (T._radix_scan_kernel, dict(state_ptr="*i32", n_hist=I, gate_ptr="*i32"), dict(SHIFT=8, RANKS=3, GATED=True)),
    (T._tie_count_kernel, dict(x_ptr=F, n=I, chunk=I), dict(RANKS=3, BLOCK=4096)),
    (T._cold_finish_kernel, dict(x_ptr=F, n=I, q=I, floats_ptr=F, n_chunks=I, chunk=I, value_ptr=F, ties_ptr="*i64",
     limit_ptr="*i64"), dict(RANKS=3, MAX_CHUNKS=1024, BLOCK=4096)),
]
arch = int(sys.argv[1])
target = GPUTarget("cuda", arch, 32)
for fn, sig, consts in KERNELS:
    full = {a: sig.get(a, P.get(a)) for a in fn.arg_names if a not in consts}
    full.update({c: "constexpr" for c in consts})
    opts = triton.compiler.make_backend(target).parse_options({"num_warps": 8, "num_stages": 3})
    cc = triton.compile(ASTSource(fn, full, consts), target=target, options=opts.__dict__)
    assert cc.asm["cubin"], fn
    print("compiled", fn.fn.__name__, arch)
'''


@pytest.mark.parametrize("arch", [90])
def test_the_warm_kernels_compile_for_the_gpu(arch):
    """What the interpreter cannot show: every kernel of a warm step compiles for a real GPU (Hopper;
    Triton's wheel ships ptxas): no non-constexpr global, the policy functions of supermask.mask
    compiled by triton.jit, runtime loops and branches."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, str(arch)], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == 7, r.stdout
