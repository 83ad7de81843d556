"""The supermask operations as PyTorch operators (``torch.library`` custom ops, namespace "supermask").

    torch.ops.supermask.masked_weight(weight, scores, n_keep, state) -> weight * mask
    torch.ops.supermask.masked_weight_at(weight, scores, value, ties) -> weight * mask (given threshold)
    torch.ops.supermask.masked_linear(x, weight, scores, n_keep, state) -> x @ (weight * mask)^T
    torch.ops.supermask.topk_threshold(scores, n_keep) -> (value, ties)

The mask is the one of ``supermask.mask``: the n_keep entries of largest |score|, ties in flat order.
Gradients (registered with ``torch.library.register_autograd``): edge-popup's straight-through
estimator, d loss / d scores = (d loss / d masked weight) * weight * sign(scores) for every entry;
the frozen weight gets none; masked_linear's input gets dy @ (weight * mask).

Why custom ops: ``torch.compile`` (fullgraph), ``torch.export`` and autocast see one opaque operator
with a shape function (``register_fake``) instead of ctypes calls, data pointers and a warm-start
state they cannot trace.

One op, one implementation per device, registered with PyTorch (``register_kernel("cpu")`` and
``register_kernel("cuda")``; the op's own body, the reference, serves any other device). Every op
takes a last argument ``path`` (one of PATHS), which the *layer* passes (its ``path`` attribute, set
by ``supermask.set_backend(model, name)``); there is no process-wide setting:

* "auto" (the default): the device decides. CPU: the fused C kernels (``supermask.cpu_kernels``;
  float32/float64 contiguous tensors), else the reference. CUDA: the Triton kernels
  (``supermask.kernels``) when Triton is installed, else the reference;
* "reference": plain torch (``supermask.mask``), the ground truth every other implementation is
  tested against (``--backend torch``);
* "triton": the Triton kernels, on CPU tensors too (in Triton's interpreter, TRITON_INTERPRET=1,
  for tests).

The Triton path never reads the device from the host in a forward or backward: the threshold and
its tie limit stay on the device as tensors that the kernels load (``kernels.topk_threshold_device``).
CUDA graphs: not verified (no GPU has been lent); the warm-start state registry below is host state
updated per call, so the ops are not tagged as graph-safe and ``torch.compile(mode="reduce-overhead")``
is unmeasured. NaN scores are refused on every path (see NAN_MESSAGE).

Warm-start state. Between training steps the threshold moves little, so each layer keeps state
(its last threshold, the density of |s| around it; on the CPU also its masked weight, updated in
place, and a byte per entry for the backward). That state lives here, in a registry keyed by an
integer (``new_state()`` / ``StateHandle``), passed to the ops as an int argument: to the compiler
it is a constant, so the state stays invisible to tracing. It only decides speed: every answer is
exact (tests compare with the cold selection). ``state=-1`` runs without one. A cached masked weight
or threshold is reused by the backward only when the weight and scores are the very tensors (data
pointer and version counter) and n_keep the forward used; else it is recomputed. (Like autograd's
own saved tensors, this trusts that the scores are not changed behind the version counter, e.g.
through .data, between a forward and its backward.)

Autocast: ``masked_linear`` under ``torch.autocast`` computes in the autocast dtype as ``F.linear``
does (x and the masked weight cast to it, the output in it), while the mask is selected from the
scores in their own dtype, as the reference path (weight * mask, then F.linear) does, so the masks
are the same with and without autocast. ``masked_weight`` and ``topk_threshold`` are not cast
(like the elementwise ops of the reference path).
"""
from __future__ import annotations

import itertools
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels
from .mask import NAN_MESSAGE, Threshold, TopKWarmStart, refuse_nan, warm_topk_threshold
from .mask import _masked as _masked_product, topk_threshold as _cold_threshold

PATHS = ("auto", "reference", "triton")


def check_path(path: str) -> str:
    """path itself when it is one of PATHS; else ValueError naming the argument."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


# ---------------------------------------------------------------------------------------------
# Per-layer state registry.
# ---------------------------------------------------------------------------------------------
class LayerState(TopKWarmStart):
    """A layer's warm-start selection state (mask.TopKWarmStart) plus what the kernels reuse between
    steps and what the backward reuses from the forward: ``saved`` = (key, threshold) of the last
    forward (reference and Triton paths); the CPU kernels' masked weight ``buf`` (updated in place,
    valid for the weight ``buf_key``) and state bytes ``bits``, both valid for the forward
    ``fwd_key``; masked_weight's state bytes ``fresh_bits`` for ``fresh_key``; the band lists
    ``band`` and the signed-constant weight test ``wconst`` (see supermask.cpu_kernels); the Triton
    path's warm-start state in device memory ``device_warm`` (kernels.DeviceWarmStart)."""

    __slots__ = ("saved", "fwd_key", "fresh_bits", "fresh_key", "buf", "buf_key", "bits", "band", "wconst",
                 "device_warm")

    def __init__(self):
        super().__init__()
        self.saved = None
        self.fwd_key = None
        self.fresh_bits = self.fresh_key = None
        self.buf = self.buf_key = self.bits = self.band = self.wconst = None
        self.device_warm = None


_states: dict[int, LayerState] = {}
_ids = itertools.count()
_lock = threading.Lock()


def new_state() -> int:
    """A fresh state id (never reused in this process)."""
    with _lock:
        i = next(_ids)
        _states[i] = LayerState()
    return i


def get_state(i: int) -> LayerState:
    """The state of id i (created if unknown, e.g. an id from a graph compiled before the layer went
    away); -1: a throwaway state (no warm start, nothing cached)."""
    if i < 0:
        return LayerState()
    s = _states.get(i)
    if s is None:
        with _lock:
            s = _states.setdefault(i, LayerState())
    return s


def drop_state(i: int) -> None:
    """Forget the state of id i (its warm-start threshold and cached buffers); an unknown id is
    ignored. Called when the layer's StateHandle goes away."""
    _states.pop(i, None)


class StateHandle:
    """A layer's state id. Copies (copy.deepcopy, pickling) get a new id, so two layers never share
    cached masked weights; the state goes away with the handle."""

    __slots__ = ("id", "__weakref__")

    def __init__(self):
        self.id = new_state()

    def state(self) -> LayerState:
        """This layer's LayerState in the registry (``get_state(self.id)``)."""
        return get_state(self.id)

    def __deepcopy__(self, memo):
        return StateHandle()

    def __reduce__(self):
        return (StateHandle, ())

    def __del__(self):
        try:
            drop_state(self.id)
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass


_key = cpu_kernels._fwd_key  # one key for "the forward of these very tensors", on every path


def _check_n_keep(scores: Tensor, n_keep: int) -> None:
    if not 1 <= n_keep <= scores.numel():
        raise ValueError(f"n_keep must be in [1, {scores.numel()}], got {n_keep}")


def _check_shapes(weight: Tensor, scores: Tensor) -> None:
    if weight.shape != scores.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")


# ---------------------------------------------------------------------------------------------
# Which implementation.
# ---------------------------------------------------------------------------------------------
_have_triton: bool | None = None


def _triton_ok(*tensors: Tensor) -> bool:
    global _have_triton
    if _have_triton is None:  # imported once, when first needed (Triton only where it is used)
        try:
            from . import kernels  # noqa: F401, PLC0415
            _have_triton = True
        except ImportError:
            _have_triton = False
    return _have_triton and all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in tensors)


def _cpu_kind(path: str, *tensors: Tensor) -> str:
    """The CPU kernel's choice: "reference", "cpu" (the C kernels) or "triton" (Triton's interpreter,
    for tests: only when the layer asks for it)."""
    if path == "reference":
        return "reference"
    if path == "triton":
        return "triton" if _triton_ok(*tensors) else "reference"
    return "cpu" if cpu_kernels.available() and cpu_kernels.supports(*tensors) else "reference"


def _cuda_kind(path: str, *tensors: Tensor) -> str:
    """The CUDA kernel's choice: "reference" (asked for, or a dtype Triton does not take) or "triton"."""
    if path == "reference":
        return "reference"
    return "triton" if _triton_ok(*tensors) else "reference"


def _other_kind(path: str, *tensors: Tensor) -> str:
    return "reference"


# One implementation per device (registered below with register_kernel); every other device gets
# the reference (the ops' default implementation).
_KINDS = {"cpu": _cpu_kind, "cuda": _cuda_kind}


def _kind(path: str, *tensors: Tensor) -> str:
    """What the kernel registered for the tensors' device runs for this path (the eager shortcut
    calls the same function the dispatcher would)."""
    check_path(path)
    return _KINDS.get(tensors[0].device.type, _other_kind)(path, *tensors)


def _register(op, impl, first: int = 0, count: int = 2) -> None:
    """Registers op's CPU and CUDA kernels: impl(kind, *args, path) with the kind that device picks
    from the path (the op's last argument; the dispatcher leaves it out when it is the default) and
    the args[first:first + count] tensors."""
    n_args = len(op._opoverload._schema.arguments) - 1  # (without path)
    for device, choose in _KINDS.items():
        def kernel(*args, _choose=choose, **kwargs):
            path = args[n_args] if len(args) > n_args else kwargs.get("path", "auto")
            return impl(_choose(check_path(path), *args[first:first + count]), *args[:n_args])
        op.register_kernel(device)(kernel)


# ---------------------------------------------------------------------------------------------
# NaN policy (every path, see supermask.mask.NAN_MESSAGE): NaN scores are refused by the ops that
# select (masked_weight, masked_linear, topk_threshold): ValueError on the CPU paths (reference, C
# kernels); on the Triton path, which must not read the device from the host, a device-side assert
# (torch._assert_async, no host sync) with the same message: a RuntimeError at the next
# synchronisation on CUDA (at once on CPU tensors in the interpreter).
# ---------------------------------------------------------------------------------------------
def _refuse_nan(scores: Tensor, kind: str) -> None:
    if kind != "triton":
        refuse_nan(scores.detach())
        return
    torch._assert_async(~torch.isnan(scores.detach()).any(), NAN_MESSAGE)


# ---------------------------------------------------------------------------------------------
# Thresholds. Reference and C paths: a Threshold (host ints), warm-started from the layer's state.
# Triton path: (value, limit) device tensors, no host sync: entries with |s| > value are kept, and
# those equal to value whose flat index is below limit (see kernels.topk_threshold_device).
# ---------------------------------------------------------------------------------------------
def _threshold(scores: Tensor, n_keep: int, state: LayerState | None) -> Threshold:
    s = scores.detach()
    if state is not None:
        return warm_topk_threshold(s, n_keep, state)
    return _cold_threshold(s.abs(), n_keep)


def _device_threshold(scores: Tensor, n_keep: int, state: LayerState | None = None) -> tuple[Tensor, Tensor]:
    from .kernels import topk_threshold_device  # noqa: PLC0415
    from .kernels.threshold import DeviceWarmStart, warm_topk_threshold_device  # noqa: PLC0415
    if state is None:
        value, _, limit = topk_threshold_device(scores.detach(), n_keep)
        return value, limit
    if state.device_warm is None:
        state.device_warm = DeviceWarmStart()
    value, _, limit = warm_topk_threshold_device(scores.detach(), n_keep, state.device_warm)
    return value, limit


def _saved(weight, scores, n_keep, state: LayerState, kind: str):
    """The forward's threshold (Threshold, or (value, limit) on the Triton path) when the state holds
    this forward's, else recomputed."""
    saved = state.saved
    if saved is not None and saved[0] == _key(weight, scores, n_keep):
        return saved[1]
    return _device_threshold(scores, n_keep) if kind == "triton" else _threshold(scores, n_keep, None)


def _masked_ref(weight: Tensor, scores: Tensor, th: Threshold) -> Tensor:
    """weight * mask, by the mask definition's own product (mask._masked, as mask.MaskedWeight)."""
    return _masked_product(weight, scores.detach(), th)


def _ste_ref(grad: Tensor, weight: Tensor, scores: Tensor) -> Tensor:
    """(grad * weight) * sign(scores) in scores' dtype, in mask.MaskedWeight's order."""
    if grad.dtype == weight.dtype == scores.dtype:
        return torch.mul(grad, weight).mul_(torch.sign(scores))
    return (grad.to(scores.dtype) * weight * torch.sign(scores)).to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# supermask::topk_threshold
# ---------------------------------------------------------------------------------------------
def _tt_impl(kind: str, scores: Tensor, n_keep: int, path: str = "auto") -> tuple[Tensor, Tensor]:
    _check_n_keep(scores, n_keep)
    _refuse_nan(scores, kind)
    if kind == "triton":  # on the device: ties = -1 where every equal entry is kept
        from .kernels import topk_threshold_device  # noqa: PLC0415
        value, ties, _ = topk_threshold_device(scores.detach(), n_keep)
        return value.clone(), ties
    # no C selection over a whole layer: the torch band selection is the CPU one
    th = _threshold(scores, n_keep, None)
    ties = th.ties if th.split else -1
    return th.value.detach().clone().reshape(()), torch.tensor(ties, dtype=torch.int64, device=scores.device)


@torch.library.custom_op("supermask::topk_threshold", mutates_args=())
def _topk_threshold_op(scores: Tensor, n_keep: int, path: str = "auto") -> tuple[Tensor, Tensor]:
    """(value, ties): the n_keep-th largest |score| (0-dim, scores' dtype) and how many entries equal
    to it are kept, first in flat order (0-dim int64; -1: all of them). path: see PATHS."""
    return _tt_impl("reference", scores, n_keep, path)


_register(_topk_threshold_op, _tt_impl, count=1)


@_topk_threshold_op.register_fake
def _(scores, n_keep, path="auto"):
    return scores.new_empty(()), scores.new_empty((), dtype=torch.int64)


def topk_threshold(scores: Tensor, n_keep: int, path: str = "auto") -> Threshold:
    """The Threshold keeping the n_keep largest |scores| through the op (one host sync for ties)."""
    value, ties = torch.ops.supermask.topk_threshold(scores, n_keep, path)
    t = int(ties)
    return Threshold(value, t if t >= 0 else 1, t >= 0)


# ---------------------------------------------------------------------------------------------
# supermask::ste_grad (the backward of the masked-weight ops)
# ---------------------------------------------------------------------------------------------
def _ste_impl(kind: str, grad: Tensor, weight: Tensor, scores: Tensor, n_keep: int, state: int,
              path: str = "auto") -> Tensor:
    if kind == "cpu" and state >= 0:
        st = get_state(state)
        if st.fresh_key == _key(weight, scores, n_keep):
            return cpu_kernels.ste_from_state(grad.contiguous(), weight, st, st.fresh_bits)
    if kind == "triton":
        from .kernels import ste_grad_kernel  # noqa: PLC0415
        return ste_grad_kernel(grad, weight, scores)
    return _ste_ref(grad, weight, scores)


@torch.library.custom_op("supermask::ste_grad", mutates_args=())
def _ste_grad_op(grad: Tensor, weight: Tensor, scores: Tensor, n_keep: int, state: int,
                 path: str = "auto") -> Tensor:
    """(grad * weight) * sign(scores) in scores' dtype (the straight-through gradient of the scores).
    n_keep and state: the forward's, so the CPU kernels can reuse its state bytes."""
    return _ste_impl("reference", grad, weight, scores, n_keep, state, path)


_register(_ste_grad_op, _ste_impl, count=3)


@_ste_grad_op.register_fake
def _(grad, weight, scores, n_keep, state, path="auto"):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# supermask::masked_weight (top-k inside, warm-started)
# ---------------------------------------------------------------------------------------------
def _mw_impl(kind: str, weight: Tensor, scores: Tensor, n_keep: int, state: int, path: str = "auto") -> Tensor:
    _check_shapes(weight, scores)
    _check_n_keep(scores, n_keep)
    _refuse_nan(scores, kind)
    st = get_state(state) if state >= 0 else None
    if kind == "cpu":
        return cpu_kernels.masked_weight_fresh(weight, scores.detach(), n_keep, st or LayerState())
    if kind == "triton":
        from .kernels import masked_weight_kernel  # noqa: PLC0415
        th = _device_threshold(scores, n_keep, st)
        out = masked_weight_kernel(weight.detach(), scores.detach(), th[0], th[1])
    else:
        th = _threshold(scores, n_keep, st)
        out = _masked_ref(weight.detach(), scores, th).contiguous()
    if st is not None:
        st.saved = (_key(weight, scores, n_keep), th)
    return out


@torch.library.custom_op("supermask::masked_weight", mutates_args=())
def _masked_weight_op(weight: Tensor, scores: Tensor, n_keep: int, state: int, path: str = "auto") -> Tensor:
    """weight * (top-n_keep mask of |scores|), a new contiguous tensor of weight's shape and dtype."""
    return _mw_impl("reference", weight, scores, n_keep, state, path)


_register(_masked_weight_op, _mw_impl)


@_masked_weight_op.register_fake
def _fake_like_weight(weight, scores, *_):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _mw_setup(ctx, inputs, output):
    weight, scores, n_keep, state, path = inputs
    ctx.save_for_backward(weight, scores)
    ctx.n_keep, ctx.state, ctx.path = n_keep, state, path


def _mw_backward(ctx, grad):
    weight, scores = ctx.saved_tensors
    gs = None
    if ctx.needs_input_grad[1]:
        gs = torch.ops.supermask.ste_grad(grad, weight, scores, ctx.n_keep, ctx.state, ctx.path)
    return None, gs, None, None, None


_masked_weight_op.register_autograd(_mw_backward, setup_context=_mw_setup)


def masked_weight(weight: Tensor, scores: Tensor, n_keep: int, state: int = -1, path: str = "auto") -> Tensor:
    """weight * mask, the mask keeping the n_keep largest |scores| (ties: lowest flat index), with
    the straight-through gradient to the scores (the weight gets none).

    weight, scores: one shape, float dtypes, one device. n_keep: 1..numel (``mask.num_kept(n, k)``).
    state: a ``new_state()`` id for warm-started selection across steps (-1: none). path: one of
    PATHS ("auto": the device's kernels; "reference": plain torch; "triton": the Triton kernels,
    on CPU tensors in Triton's interpreter). Returns a new tensor of weight's shape and dtype.
    Raises ValueError on mismatched shapes, n_keep out of range, an unknown path or NaN scores
    (see NAN_MESSAGE: a device-side assert on the Triton path)."""
    if _eager(weight, scores):
        return _EagerMaskedWeight.apply(weight, scores, n_keep, state, path)
    return torch.ops.supermask.masked_weight(weight, scores, n_keep, state, path)


# ---------------------------------------------------------------------------------------------
# supermask::masked_weight_at (a given threshold, e.g. global top-k)
# ---------------------------------------------------------------------------------------------
def _mwa_impl(kind: str, weight: Tensor, scores: Tensor, value: Tensor, ties: int, path: str = "auto") -> Tensor:
    _check_shapes(weight, scores)
    if kind == "triton":
        from .kernels import masked_weight_kernel, tie_limit  # noqa: PLC0415
        limit = tie_limit(scores.detach(), value, ties) if ties >= 0 else None
        return masked_weight_kernel(weight.detach(), scores.detach(), value, limit)
    return _masked_ref(weight.detach(), scores, Threshold(value, max(ties, 0), ties >= 0)).contiguous()


@torch.library.custom_op("supermask::masked_weight_at", mutates_args=())
def _masked_weight_at_op(weight: Tensor, scores: Tensor, value: Tensor, ties: int, path: str = "auto") -> Tensor:
    """weight where |scores| > value, and where |scores| == value for the first ``ties`` such
    entries in flat order (ties=-1: all of them); else 0."""
    return _mwa_impl("reference", weight, scores, value, ties, path)


_register(_masked_weight_at_op, _mwa_impl)
_masked_weight_at_op.register_fake(_fake_like_weight)


def _mwa_setup(ctx, inputs, output):
    weight, scores, _, _, path = inputs
    ctx.save_for_backward(weight, scores)
    ctx.n_keep, ctx.state, ctx.path = 0, -1, path  # the mask is given: ste_grad needs no selection state


_masked_weight_at_op.register_autograd(_mw_backward, setup_context=_mwa_setup)


def masked_weight_at(weight: Tensor, scores: Tensor, threshold: Threshold, path: str = "auto") -> Tensor:
    """weight * mask for a given ``mask.Threshold`` (e.g. one of ``mask.global_thresholds``), with
    the straight-through gradient to the scores. Returns a new tensor of weight's shape and dtype."""
    return torch.ops.supermask.masked_weight_at(weight, scores, threshold.value,
                                                int(threshold.ties) if threshold.split else -1, path)


# ---------------------------------------------------------------------------------------------
# supermask::masked_linear (fused)
# ---------------------------------------------------------------------------------------------
def _ml_impl(kind: str, x: Tensor, weight: Tensor, scores: Tensor, n_keep: int, state: int,
             path: str = "auto") -> Tensor:
    _check_shapes(weight, scores)
    _check_n_keep(scores, n_keep)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight has shape {tuple(weight.shape)}")
    _refuse_nan(scores, kind)
    st = get_state(state) if state >= 0 else None
    if kind == "cpu":
        masked = cpu_kernels.masked_weight_cached(weight, scores.detach(), n_keep, st or LayerState())
        return F.linear(x, masked.to(x.dtype))
    if kind == "triton":
        from .kernels import masked_linear_forward  # noqa: PLC0415
        th = _device_threshold(scores, n_keep, st)
        y = masked_linear_forward(x, weight.detach().to(x.dtype), scores.detach(), th[0], th[1])
    else:
        th = _threshold(scores, n_keep, st)
        y = F.linear(x, _masked_ref(weight.detach(), scores, th).to(x.dtype))
    if st is not None:
        st.saved = (_key(weight, scores, n_keep), th)
    return y


@torch.library.custom_op("supermask::masked_linear", mutates_args=())
def _masked_linear_op(x: Tensor, weight: Tensor, scores: Tensor, n_keep: int, state: int,
                      path: str = "auto") -> Tensor:
    """x @ (weight * mask)^T for x (..., in_features), weight and scores (out_features, in_features);
    the output in x's dtype (the masked weight is cast to it: autocast, see the module docstring)."""
    return _ml_impl("reference", x, weight, scores, n_keep, state, path)


_register(_masked_linear_op, _ml_impl, first=1)


@_masked_linear_op.register_fake
def _(x, weight, scores, n_keep, state, path="auto"):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _mlb_impl(kind: str, grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, n_keep: int, state: int,
              need_x: bool, need_scores: bool, path: str = "auto") -> tuple[Tensor, Tensor]:
    K = weight.shape[1]
    gy2, x2 = grad_y.reshape(-1, weight.shape[0]), x.reshape(-1, K)
    st = get_state(state)  # (-1: a throwaway state)
    empty = grad_y.new_empty(0)
    if kind == "cpu":
        cached = st.fwd_key == _key(weight, scores, n_keep)
        gx, gs = cpu_kernels.linear_backward(gy2, x2, weight, scores, n_keep, st, cached, need_x, need_scores)
        gx = gx.reshape(x.shape) if need_x else empty
        return gx, gs if need_scores else empty
    th = _saved(weight, scores, n_keep, st, kind)
    gx = gs = empty
    if kind == "triton":
        from .kernels import masked_linear_backward  # noqa: PLC0415
        gx, gs = masked_linear_backward(gy2, x2, weight.detach().to(gy2.dtype), scores.detach(), th[0],
                                        need_x, need_scores, limit=th[1])
        return (gx.reshape(x.shape) if need_x else empty), (gs if need_scores else empty)
    if need_x:
        masked = _masked_ref(weight.detach(), scores, th).to(gy2.dtype)
        gx = gy2.mm(masked).reshape(x.shape)
    if need_scores:
        gs = _ste_ref(gy2.t().mm(x2).to(scores.dtype), weight, scores)
    return gx, gs


@torch.library.custom_op("supermask::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, scores: Tensor, n_keep: int,
                               state: int, need_x: bool, need_scores: bool,
                               path: str = "auto") -> tuple[Tensor, Tensor]:
    """(grad_x, grad_scores) of masked_linear; an empty tensor for a gradient not asked for."""
    return _mlb_impl("reference", grad_y, x, weight, scores, n_keep, state, need_x, need_scores, path)


_register(_masked_linear_backward_op, _mlb_impl, first=2)


@_masked_linear_backward_op.register_fake
def _(grad_y, x, weight, scores, n_keep, state, need_x, need_scores, path="auto"):
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else grad_y.new_empty(0)
    gs = torch.empty_like(scores, memory_format=torch.contiguous_format) if need_scores else grad_y.new_empty(0)
    return gx, gs


def _ml_setup(ctx, inputs, output):
    x, weight, scores, n_keep, state, path = inputs
    ctx.save_for_backward(x, weight, scores)
    ctx.n_keep, ctx.state, ctx.path = n_keep, state, path


def _ml_backward(ctx, grad_y):
    x, weight, scores = ctx.saved_tensors
    need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_x or need_s):
        return None, None, None, None, None, None
    gx, gs = torch.ops.supermask.masked_linear_backward(grad_y, x, weight, scores, ctx.n_keep, ctx.state,
                                                        need_x, need_s, ctx.path)
    return (gx if need_x else None), None, (gs if need_s else None), None, None, None


_masked_linear_op.register_autograd(_ml_backward, setup_context=_ml_setup)


def _register_linear_autocast(device_type: str) -> None:
    """Autocast for masked_linear as F.linear has it: x goes to the autocast dtype (the op casts the
    masked weight to x's dtype); weight and scores stay as they are, so the mask is selected from
    the scores in their own dtype. Mirrors torch.library.register_autocast, which would cast every
    floating input (the scores too) and so change the masks."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = torch.ops.supermask.masked_linear.default

    def autocast_impl(x, weight, scores, n_keep, state, path="auto"):
        dtype = torch.get_autocast_dtype(device_type)
        if x.is_floating_point() and x.dtype != torch.float64 and x.dtype != dtype:
            x = x.to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(x, weight, scores, n_keep, state, path)

    op.py_impl(key)(autocast_impl)  # what tracing (torch.compile, export) runs
    _lib.impl("masked_linear", lambda _, *args: autocast_impl(*args), key_name, with_keyset=True)


_lib = torch.library.Library("supermask", "FRAGMENT")
for _device in ("cpu", "cuda"):
    _register_linear_autocast(_device)


def masked_linear(x: Tensor, weight: Tensor, scores: Tensor, n_keep: int, state: int = -1,
                  path: str = "auto") -> Tensor:
    """F.linear(x, masked_weight(weight, scores, n_keep)) as one op (no bias).

    x: (..., in_features); weight, scores: (out_features, in_features). Output (..., out_features)
    in x's dtype. Backward: dx = dy @ (weight * mask), d scores = (dy^T @ x) * weight * sign(scores).
    state, path: see masked_weight. Raises ValueError on mismatched shapes, n_keep out of range, an
    unknown path or NaN scores."""
    if _eager(x, weight, scores):
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # as the op's autocast kernel does
            dtype = torch.get_autocast_dtype(device_type)
            if x.is_floating_point() and x.dtype != torch.float64 and x.dtype != dtype:
                x = x.to(dtype)
        return _EagerMaskedLinear.apply(x, weight, scores, n_keep, state, path)
    return torch.ops.supermask.masked_linear(x, weight, scores, n_keep, state, path)


# ---------------------------------------------------------------------------------------------
# Eager calls. Going through the dispatcher costs a custom op a few hundred microseconds per call
# and its backward (measured here: a 16 x 16 layer's training step 0.6 ms before the ops, 1.5 ms
# through them), which on the CPU is a tenth of a small network's step. In plain eager mode (no
# torch.compile or export tracing, no tensor subclass, no torch function / dispatch mode, no
# functorch transform) masked_weight and masked_linear therefore call the same implementations
# through an autograd.Function; anything that traces or intercepts gets the registered op.
# tests/test_ops.py checks that both give the same bits. EAGER_SHORTCUT = False turns it off.
# ---------------------------------------------------------------------------------------------
EAGER_SHORTCUT = True
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(*tensors: Tensor) -> bool:
    return (EAGER_SHORTCUT and not torch.compiler.is_compiling()
            and all(type(t) in _PLAIN and not t.is_meta for t in tensors)  # meta: the ops' fake kernels
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active())


class _EagerMaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, n_keep, state, path):
        ctx.save_for_backward(x, weight, scores)
        ctx.n_keep, ctx.state, ctx.kind = n_keep, state, _kind(path, weight, scores)
        return _ml_impl(ctx.kind, x, weight, scores, n_keep, state)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, scores = ctx.saved_tensors
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_x or need_s):
            return None, None, None, None, None, None
        gx, gs = _mlb_impl(ctx.kind, grad_y, x, weight, scores, ctx.n_keep, ctx.state, need_x, need_s)
        return (gx if need_x else None), None, (gs if need_s else None), None, None, None


class _EagerMaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scores, n_keep, state, path):
        ctx.save_for_backward(weight, scores)
        ctx.n_keep, ctx.state, ctx.path = n_keep, state, path
        return _mw_impl(_kind(path, weight, scores), weight, scores, n_keep, state)

    @staticmethod
    def backward(ctx, grad):
        weight, scores = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        kind = _kind(ctx.path, grad, weight, scores)  # as the ste_grad op's kernel for this device
        return None, _ste_impl(kind, grad, weight, scores, ctx.n_keep, ctx.state), None, None, None
