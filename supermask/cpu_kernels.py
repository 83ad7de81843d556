"""Fused CPU kernels, the CPU implementation of the supermask ops (``supermask.ops``): the masked
weight and its straight-through gradient in one pass each, and the top-k selection folded into the
masked-weight pass.

Why: on a CPU these element-wise passes run at memory speed, so their number is their cost. The
reference path (supermask.mask) needs about eight weight-sized passes a step (|s|, compares,
counts, weight * mask; sign, two multiplies); eager PyTorch cannot fuse them. The C kernels in
cpu_kernels.c do it in two: one forward pass that updates the layer's masked weight in place
(kept from the last step) and lists the few entries near the last threshold, whose exact selection
finishes it, and one backward pass. The answer is the reference path's, exactly
(tests/test_cpu_kernels.py compares masks, masked weights and gradients bit for bit).

The C file is compiled on first use with the system C compiler (``cc``, or $CC) and OpenMP, and
cached under ~/.cache/supermask (or $XDG_CACHE_HOME/supermask), keyed by the source, the compiler
and the CPU (it is built with -march=native).
``available()`` says whether that worked; ``why_unavailable()`` says why not.

Why a runtime ``cc`` build through ctypes rather than a torch C++ extension
(torch.utils.cpp_extension): the kernels are plain C on raw pointers (no ATen), so they need no
C++ toolchain matching torch's ABI, build in a second with any C compiler and are loaded lazily;
PyTorch still sees them only as the supermask ops' CPU implementation (registered with
torch.library in supermask.ops), so compile, export and autocast treat them like any operator.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from .mask import (_threshold_from_counts, _warm_key, accept_band, band_bounds, mask_from_threshold, start_cold,
                   warm_topk_threshold)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
DTYPES = (torch.float32, torch.float64)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_CTYPE = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


class CPUKernelsUnavailable(RuntimeError):
    """The C kernels could not be built or loaded on this machine (no C compiler, the compiler
    refused cpu_kernels.c with every flag set tried, the cache folder not writable, the shared
    library not loadable); the message says which. Raised by the first use that needs them, and
    again (the same message, no rebuild) by every later one in the process;
    ``supermask.set_backend(model, "cpu")`` raises it too. The "auto" path never does: it falls
    back to the reference."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "supermask"


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


def _compile(cc: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(source + version.encode() + platform.machine().encode() + _cpu_id().encode())
    target = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed (storage.atomic_write): two processes building at once
    # both succeed.
    from .storage import atomic_write  # noqa: PLC0415

    def build(tmp):
        # -march=native: the vector width of this CPU (AVX-512 halves a pass against the SSE2
        # baseline); the cache key holds the CPU, so a cache folder shared by other CPUs is safe.
        # Without -march=native, then without OpenMP (one thread) if the compiler refuses them.
        errors = []
        for flags in (["-march=native", "-fopenmp"], ["-fopenmp"], []):
            cmd = [cc, "-O3", *flags, "-fPIC", "-shared", "-o", str(tmp), str(SOURCE)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                return
            errors.append(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[:400]}")
        raise CPUKernelsUnavailable("; ".join(errors))

    atomic_write(target, build)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for dtype, sfx in _SUFFIX.items():
        t = _CTYPE[dtype]
        for name, args, res in (("sm_mask", [p, p, p, p, i64, t, i32], i64),
                                ("sm_state", [p, p, p, p, i64, i32], None),
                                ("sm_grad", [p, p, t, p, p, i64, i32], None),
                                ("sm_select", [p, i64, i64, i32, p, p], t),
                                ("sm_topk", [p, p, p, p, i64, i64, t, t, i32, i64, p, p, p, p, i32], i32)):
            fn = getattr(lib, f"{name}_{sfx}")
            fn.argtypes, fn.restype = args, res


def _load() -> ctypes.CDLL:
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise CPUKernelsUnavailable(_error)
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        try:
            if cc is None:
                raise CPUKernelsUnavailable("no C compiler found (install gcc, or set CC)")
            # torch is imported, so its OpenMP runtime (libgomp.so.1) is loaded: the kernels link
            # to the same one and share its threads.
            lib = ctypes.CDLL(str(_compile(cc)))
            _declare(lib)
        except (OSError, subprocess.SubprocessError, CPUKernelsUnavailable) as e:
            _error = f"the CPU kernels could not be built: {e}"
            raise CPUKernelsUnavailable(_error) from None
        _lib = lib
        return lib


def available() -> bool:
    """Whether the C kernels are usable in this process: the first call compiles cpu_kernels.c (or
    finds it in the cache) and loads it, under a lock; the answer is then kept for the process (a
    failure is not retried). Never raises: CPUKernelsUnavailable becomes False."""
    if _lib is not None:  # (asked on every op call: no lock once loaded)
        return True
    try:
        _load()
    except CPUKernelsUnavailable:
        return False
    return True


def why_unavailable() -> str | None:
    """None when ``available()``; else the one-line reason the C kernels could not be built or loaded
    (the compiler's commands and the start of their stderr), as CPUKernelsUnavailable carries it."""
    return None if available() else _error


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: CPU, contiguous, one float32/float64 dtype, one size."""
    t0 = tensors[0]
    dtype, n = t0.dtype, t0.numel()
    if dtype not in DTYPES:
        return False
    for t in tensors:
        if t.dtype is not dtype or not t.is_cpu or not t.is_contiguous() or t.numel() != n:
            return False
    return True


def _threads(n: int) -> int:
    # Below ~32k entries a pass takes microseconds: waking a second thread costs more.
    return 1 if n < 32768 else torch.get_num_threads()


_fns: dict = {}


def _fn(name: str, dtype: torch.dtype):
    """The C function `name` for dtype (looked up once: a step calls a few of them per layer)."""
    fn = _fns.get((name, dtype))
    if fn is None:
        fn = _fns[(name, dtype)] = getattr(_load(), f"{name}_{_SUFFIX[dtype]}")
    return fn


# The kernels keep a byte of state per entry beside the masked weight (st: uint8): kept, the sign
# of the score, the sign of the weight (see cpu_kernels.c).
def masked_weight_into(out: torch.Tensor, st: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                       value) -> int:
    """out = weight where |scores| >= value, else 0, and st (one pass); returns how many were kept."""
    n = scores.numel()
    return _fn("sm_mask", scores.dtype)(scores.data_ptr(), weight.data_ptr(), out.data_ptr(), st.data_ptr(), n,
                                        float(value), _threads(n))


def state_from(st: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor) -> None:
    """st for a masked weight out built some other way."""
    n = out.numel()
    _fn("sm_state", out.dtype)(scores.data_ptr(), weight.data_ptr(), out.data_ptr(), st.data_ptr(), n, _threads(n))


def select(x: torch.Tensor, r: int, absolute: bool = False) -> tuple[float, int, int]:
    """(v, above, equal): the r-th largest of x (of |x| with absolute) and the counts of entries
    above and equal to it. For up to a few ten thousand values: one quickselect on a copy."""
    n = x.numel()
    if not 1 <= r <= n:
        raise ValueError(f"r must be in [1, {n}], got {r}")
    scratch = torch.empty(n, dtype=x.dtype)
    counts = (ctypes.c_int64 * 2)()
    v = _fn("sm_select", x.dtype)(x.data_ptr(), n, r, int(absolute), scratch.data_ptr(), ctypes.addressof(counts))
    return v, counts[0], counts[1]


def ste_grad(grad: torch.Tensor, weight: torch.Tensor, st: torch.Tensor, sigma: float | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """(grad * weight) * sign(scores) in one pass, sign(scores) from st, equal bit for bit to the
    eager expression. sigma: every weight is +-sigma (its sign in st), so the weight is not read.
    Into out (which may be grad itself) or a new tensor."""
    out = torch.empty_like(grad) if out is None else out
    n = grad.numel()
    w = None if sigma is not None else weight.data_ptr()
    _fn("sm_grad", grad.dtype)(grad.data_ptr(), w, sigma or 0.0, st.data_ptr(), out.data_ptr(), n, _threads(n))
    return out


# ---------------------------------------------------------------------------------------------
# A layer's masked weight, top-k selection included, and its straight-through backward.
# masked_linear's masked weight lives in one buffer per layer (state.buf) that is kept from step to
# step: the forward pass updates it in place, writing only the entries whose mask changed.
# ---------------------------------------------------------------------------------------------
# The band of the forward pass (supermask.mask's warm-start policy: band_bounds, accept_band,
# start_cold), its entries listed in buffers of _BAND_CAP per thread.
_BAND_CAP = 16384
SMALL = 16384  # layers up to this size start (or restart after a miss) with one quickselect over all of |s|


class _Band:
    """A layer's band lists (cap entries per thread), the selection's scratch and sm_topk's results."""

    def __init__(self, threads: int, cap: int, dtype: torch.dtype):
        self.threads, self.cap, self.dtype = threads, cap, dtype
        self.idx = torch.empty(cap * threads, dtype=torch.int64)
        self.vals = torch.empty(cap * threads, dtype=dtype)
        self.scratch = torch.empty(cap * threads, dtype=dtype)
        self.res = (ctypes.c_double * 3)()
        self.ptrs = (self.idx.data_ptr(), self.vals.data_ptr(), self.scratch.data_ptr(), ctypes.addressof(self.res))


def _band_buffers(state, n: int, dtype: torch.dtype) -> _Band:
    threads, cap = _threads(n), min(_BAND_CAP, n)
    band = state.band
    if band is None or band.threads != threads or band.cap != cap or band.dtype != dtype:
        band = state.band = _Band(threads, cap, dtype)
    return band


def _topk_into(out: torch.Tensor, st: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, n_keep: int, state,
               update: bool):
    """out = weight * (top-k mask of |s|), exactly the reference mask, and st.

    One pass when the threshold lies in a band around the previous one: the pass sets out outside
    the band and lists the band's entries; the exact selection among those (their count above
    the band proves it) decides the listed entries. Otherwise (the first step, or the band
    missed): small layers one selection over all of |s|, larger ones the reference warm-started
    selection, then one mask pass."""
    n = s.numel()
    key = _warm_key(s, n_keep)
    if state.key == key and state.density > 0:
        lo, hi, _ = band_bounds(state, n, s.dtype)
        band = _band_buffers(state, n, s.dtype)
        # band pass, selection among the listed entries and their fix-up, in one call (sm_topk)
        missed = _fn("sm_topk", s.dtype)(s.data_ptr(), weight.data_ptr(), out.data_ptr(), st.data_ptr(), n, n_keep,
                                         lo, hi, int(update), band.cap, *band.ptrs, band.threads)
        if not missed:
            accept_band(state, band.res[0], band.res[1], lo, hi)
            state.fused += 1
            return
    if n <= SMALL:  # cold (or missed): one quickselect over all of |s|
        v, above, equal = select(s, n_keep, absolute=True)
        start_cold(state, key, v, n, n_keep, lambda r: select(s, r, absolute=True)[0])
        if n_keep - above == equal:  # every entry equal to v is kept: one mask pass
            masked_weight_into(out, st, weight, s, v)
        else:
            _threshold_into(out, st, weight, s, _threshold_from_counts(torch.tensor(v, dtype=s.dtype), above,
                                                                       equal, n_keep))
        return
    _threshold_into(out, st, weight, s, warm_topk_threshold(s, n_keep, state))


def _threshold_into(out: torch.Tensor, st: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, th) -> None:
    if th.split:  # ties cut in flat order: the reference mask (rare)
        torch.mul(mask_from_threshold(s.abs(), th), weight, out=out)
        state_from(st, out, weight, s)
    else:
        masked_weight_into(out, st, weight, s, th.value.to(s.dtype))


def _constant_magnitude(weight: torch.Tensor, weight_key, state) -> float | None:
    """sigma when every weight is +-sigma (signed-constant init), else None; cached per weight."""
    if state.wconst is None or state.wconst[0] != weight_key:
        a = weight.detach().abs().reshape(-1)
        sigma = float(a[0]) if a.numel() else 0.0
        state.wconst = (weight_key, sigma if sigma > 0 and bool((a == a[0]).all()) else None)
    return state.wconst[1]


def _ensure_bits(state, n: int) -> torch.Tensor:
    st = state.bits
    if st is None or st.numel() != n:
        st = state.bits = torch.empty(n, dtype=torch.uint8)
        state.buf_key = None  # the bytes no longer describe any masked weight
    return st


def _fwd_key(weight, scores, n_keep):
    """Identifies a forward's tensors (storage, version, shape, dtype) and n_keep: the backward
    reuses what a forward left only for these very tensors, unchanged. supermask.ops uses it too."""
    return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype,
            scores.data_ptr(), scores._version, tuple(scores.shape), scores.dtype, n_keep)


def masked_weight_cached(weight: torch.Tensor, s: torch.Tensor, n_keep: int, state) -> torch.Tensor:
    """The masked weight in the layer's own buffer (state.buf), updated in place from the last step:
    only the entries whose mask changed are written. The buffer never leaves the state (the op
    returns F.linear of it), so nothing outside can hold it while it changes; the backward reads it
    (and the state bytes) only when state.fwd_key says it still holds this forward's masked weight."""
    n = s.numel()
    weight_key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype)
    out = state.buf
    if out is None or out.numel() != n or out.dtype != s.dtype:
        out = state.buf = torch.empty(n, dtype=s.dtype)
        state.buf_key = None
    st = _ensure_bits(state, n)
    update = state.buf_key == weight_key
    state.buf_key = state.fwd_key = None  # while being rewritten
    out = out.view(s.shape)
    _topk_into(out, st, weight, s, n_keep, state, update)
    state.buf_key = weight_key
    state.fwd_key = _fwd_key(weight, s, n_keep)
    return out


def masked_weight_fresh(weight: torch.Tensor, s: torch.Tensor, n_keep: int, state) -> torch.Tensor:
    """The masked weight in a new tensor (what the masked_weight op hands out, e.g. for a conv); its
    state bytes stay in state.fresh_bits for the backward (ste_from_state), valid for state.fresh_key."""
    out = torch.empty(s.shape, dtype=s.dtype)
    n = s.numel()
    st = state.fresh_bits
    if st is None or st.numel() != n:
        st = state.fresh_bits = torch.empty(n, dtype=torch.uint8)
    state.fresh_key = None  # while being rewritten
    _topk_into(out, st, weight, s, n_keep, state, False)
    state.fresh_key = _fwd_key(weight, s, n_keep)
    return out


def ste_from_state(grad: torch.Tensor, weight: torch.Tensor, state, bits: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """(grad * weight) * sign(scores) in one pass, sign(scores) (and for a signed-constant weight the
    weight) read from the state bytes a forward left (the caller checked they are this forward's)."""
    weight_key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype)
    sigma = _constant_magnitude(weight, weight_key, state)
    return ste_grad(grad, weight, bits, sigma, out=out)


def linear_backward(gy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, n_keep: int,
                    state, cached: bool, need_x: bool, need_scores: bool):
    """(grad_x, grad_scores) of F.linear(x, masked weight) for 2-D gy2 (M, out) and x2 (M, in): the
    masked weight and state bytes of the forward when the state still holds them (cached, checked by
    the caller), else recomputed
    (the reference mask). grad_scores: (gy2^T @ x2) turned into the straight-through gradient in
    place, in the one pass."""
    from .mask import topk_threshold  # noqa: PLC0415

    gx = gs = None
    if need_x:
        if cached:
            masked = state.buf.view(weight.shape)
        else:
            masked = torch.mul(mask_from_threshold(scores.detach().abs(), topk_threshold(scores.detach().abs(),
                                                                                          n_keep)).to(weight.dtype),
                               weight)
        gx = gy2.mm(masked if masked.dtype == gy2.dtype else masked.to(gy2.dtype))
    if need_scores:
        G = gy2.t().mm(x2)
        if G.dtype != scores.dtype:
            G = G.to(scores.dtype)
        if cached and supports(G, weight, scores):
            gs = ste_from_state(G, weight, state, state.bits, out=G)
        else:
            gs = torch.mul(G, weight).mul_(torch.sign(scores))
    return gx, gs
