"""The CUDA implementation of the ops never reads the device from the host (issue 22, item 3), and
how many kernels a masked layer launches per training step.

The CUDA kernels of the ops run the "triton" implementation (supermask.ops._cuda_kind). Here it
runs on CPU tensors in Triton's interpreter, under instrumentation: a TorchDispatchMode that fails
on ``aten._local_scalar_dense`` (what .item(), .tolist(), int(t), float(t), bool(t) dispatch to) and
counts every other aten op that would be a device kernel, ``torch.tensor`` / ``Tensor.item`` /
``tolist`` / ``__int__`` / ``__float__`` / ``__bool__`` patched to raise, and Triton's launches counted.
The interpreter's own host copies (it runs the kernel on numpy arrays) are not the op's and are let
through; ``torch._assert_async`` (the NaN refusal) is a device kernel on CUDA, whose CPU version
reads its argument, so it is counted as one launch and let through.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from supermask import ops
from supermask.mask import num_kept, topk_mask

triton_interp = pytest.importorskip("triton.runtime.interpreter")

# Ops that only make views or read metadata: no kernel launch on a GPU.
_NO_LAUNCH = {"view", "_unsafe_view", "t", "transpose", "reshape", "_reshape_alias", "as_strided", "detach",
              "alias", "expand", "select", "slice", "unsqueeze", "squeeze", "permute", "lift_fresh"}
# Allocations without a fill: the caching allocator, no kernel launch either.
_ALLOCATIONS = {"empty", "new_empty", "empty_like", "empty_strided"}


class _Audit(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches: list[str] = []
        self.inside_triton = False
        self.armed = False

    def __enter__(self):
        self.armed = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.armed = False
        return super().__exit__(*exc)

    def allows_host_reads(self) -> bool:
        return self.inside_triton or not self.armed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.inside_triton:
            return func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host read of a device tensor (.item(), .tolist(), int(), float(), bool())")
        if name == "_assert_async":  # a device-side assert on CUDA (see the module docstring)
            self.launches.append(name)
            self.inside_triton = True
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.inside_triton = False
        if name not in _NO_LAUNCH:
            self.launches.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def audit(monkeypatch):
    mode = _Audit()
    run = triton_interp.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        mode.launches.append("triton:" + self.fn.__name__)
        mode.inside_triton = True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.inside_triton = False

    monkeypatch.setattr(triton_interp.InterpretedFunction, "run", counted_run)
    real_tensor = torch.tensor

    def no_python_numbers(*args, **kwargs):
        if not mode.allows_host_reads():
            raise AssertionError("torch.tensor(python number) in the CUDA path")
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", no_python_numbers)
    for attr in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, attr)

        def guarded(self, *a, _real=real, _attr=attr, **k):
            if not mode.allows_host_reads():
                raise AssertionError(f"Tensor.{_attr} in the CUDA path")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, guarded)
    return mode


def _layer(n_out=24, n_in=40, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    s = torch.randn(n_out, n_in, generator=g)
    if ties:
        s[: n_out // 2] = 1.0  # many equal |scores|: the threshold splits a tie
        s[0] = 3.0
    return w, s, torch.randn(6, n_in, generator=g), torch.randn(6, n_out, generator=g)


# Kernel launches of a masked layer's warm-started threshold per training step, fp32 scores (see
# kernels/threshold.py): plan, gather, select, the cold radix select (2 per byte, 4 bytes; they return
# at once when the band answered), tie count, finish. The same every step, band or cold.
THRESHOLD_LAUNCHES = 3 + 2 * 4 + 2
# Before the warm start (a cold radix select every step, its tie limit and ties by torch ops):
# 8 Triton + 10 torch launches for the threshold, 26 launches per layer step in all.
NAN_CHECK = ["isnan", "any", "bitwise_not", "_assert_async"]


@pytest.mark.parametrize("ties", [False, True])
def test_cuda_implementation_of_a_training_step_makes_no_host_read(audit, ties):
    w, s, x, gy = _layer(ties=ties)
    n_keep = num_kept(s.numel(), 0.3)
    sid = ops.new_state()
    for step in range(4):
        if step == 2:
            s = s * 5  # a jump: the band misses, the cold select answers on the device
        mask = topk_mask(s, 0.3)
        audit.launches.clear()
        with audit:
            y = ops._ml_impl("triton", x, w, s, n_keep, sid)
            gx, gs = ops._mlb_impl("triton", gy, x, w, s, n_keep, sid, True, True)
        forward_and_backward = list(audit.launches)
        torch.testing.assert_close(y, x @ (w * mask).t())
        torch.testing.assert_close(gx, gy @ (w * mask))
        torch.testing.assert_close(gs, (gy.t() @ x) * w * torch.sign(s))
        triton = [n for n in forward_and_backward if n.startswith("triton:")]
        # per masked layer per step: the warm-started threshold, the fused forward, dX and dS; the
        # backward reuses the forward's threshold (no second select)
        assert len(triton) == THRESHOLD_LAUNCHES + 3, forward_and_backward
        launches = [n for n in forward_and_backward if n not in _ALLOCATIONS]
        if step > 0:  # the layer's device state exists: no other launch than the NaN refusal's
            assert launches == NAN_CHECK + triton, forward_and_backward
    warm_steps, cold_steps = ops.get_state(sid).device_warm.steps()
    if ties:  # half the layer at one value: no density, every step cold (with split ties)
        assert (warm_steps, cold_steps) == (0, 4)
    else:  # cold at step 0 and after the jump, the band at steps 1 and 3
        assert (warm_steps, cold_steps) == (2, 2)
    with audit:
        ops._mw_impl("triton", w, s, n_keep, -1)
        ops._ste_impl("triton", gy.new_ones(w.shape), w, s, n_keep, -1)
        ops._tt_impl("triton", s, n_keep)


def test_cuda_implementation_of_masked_weight_at_makes_no_host_read(audit):
    w, s, _, _ = _layer(ties=True)
    th = ops.topk_threshold(s, 100, "reference")
    with audit:
        out = ops._mwa_impl("triton", w, s, th.value, th.ties if th.split else -1)
    assert torch.equal(out != 0, topk_mask(s, 100 / s.numel()) & (w != 0))


def test_the_audit_catches_host_reads(audit):
    t = torch.ones(3)
    for bad in (lambda: t.sum().item(), lambda: int(t.sum()), lambda: t.tolist(), lambda: torch.tensor(1.0),
                lambda: bool(t.any())):
        with audit, pytest.raises(AssertionError):
            bad()
