"""Shared helpers for the Triton kernels: interpreter detection, output allocation, precision.

The kernels are written for CUDA GPUs (Ampere sm_80, Hopper sm_90). On a machine without one they
run in Triton's interpreter, which has to be switched on with ``TRITON_INTERPRET=1`` *before*
``import triton``; the interpreter then runs the same kernel source on CPU tensors.
"""
from __future__ import annotations

import contextlib
import os

import torch

# Fill every output buffer with NaN before a launch (tests switch this on, so that an element a
# kernel forgets to write shows up as NaN instead of as whatever the allocator left there).
_POISON = False

# How tl.dot treats fp32 operands. None (the default): as torch does for its own fp32 matmuls,
# torch.get_float32_matmul_precision(): "highest" -> "ieee" (full fp32, no tensor cores, torch's
# default), "high"/"medium" -> "tf32" (10-bit mantissa, fp32 accumulation). set_fp32_precision asks
# for one regardless: "tf32", "tf32x3" (the 3-pass split, ~fp32 accuracy on tensor cores) or "ieee".
# fp16/bf16 are unaffected.
_FP32_PRECISION: str | None = None
FP32_PRECISIONS = ("tf32", "tf32x3", "ieee")
_FROM_TORCH = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(*tensors: torch.Tensor) -> None:
    """Refuse tensors a kernel launch cannot take: raises ValueError when they are not all on one
    device, RuntimeError when that device is not CUDA and Triton's interpreter is off (CPU tensors
    need TRITON_INTERPRET=1 set before ``import triton``). Any shapes and dtypes; returns None."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError("supermask.kernels needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "triton is imported (CPU interpreter)")


def empty(shape, dtype, device) -> torch.Tensor:
    """An uninitialized output buffer, torch.empty(shape, dtype, device); inside
    ``poisoned_outputs()`` a floating-point one is filled with NaN first, so that an element a kernel
    forgets to write shows up in the tests."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


@contextlib.contextmanager
def poisoned_outputs(on: bool = True):
    """Within this block every kernel output starts as NaN (testing aid)."""
    global _POISON
    old, _POISON = _POISON, on
    try:
        yield
    finally:
        _POISON = old


def set_fp32_precision(precision: str | None) -> None:
    """How tl.dot treats fp32 operands: "tf32", "tf32x3" or "ieee"; None: follow
    torch.get_float32_matmul_precision() (the default). Raises ValueError for another name."""
    global _FP32_PRECISION
    if precision is not None and precision not in FP32_PRECISIONS:
        raise ValueError(f"precision must be one of {FP32_PRECISIONS} or None, got {precision!r}")
    _FP32_PRECISION = precision


def get_fp32_precision() -> str:
    """The fp32 dot precision in effect: the one asked for, else torch's fp32 matmul precision."""
    if _FP32_PRECISION is not None:
        return _FP32_PRECISION
    return _FROM_TORCH.get(torch.get_float32_matmul_precision(), "ieee")


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of tl.dot for operands of this dtype: ``get_fp32_precision()`` ("tf32",
    "tf32x3" or "ieee") for float32; "ieee" for fp16/bf16, which tensor cores take as they are
    (accumulated in fp32)."""
    return get_fp32_precision() if dtype == torch.float32 else "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels convert tiles of this dtype to fp32 before tl.dot (the UPCAST constexpr):
    True only for bfloat16 in Triton's interpreter, whose tl.dot on bf16 operands is wrong in Triton
    3.8 (garbage of order 1e10); the fp32 products of bf16 values are exact. Never on a GPU."""
    return interpreting() and dtype == torch.bfloat16


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (sizes persistent grids, e.g. the radix
    histogram's); 2 for any other device (the interpreter: few, larger programs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def max_shared_memory(device: torch.device) -> int:
    """Shared memory one block may use on a CUDA device, in bytes (the opt-in limit,
    ``shared_memory_per_block_optin``: about 163 KiB on A100, 227 KiB on H100; 99 KiB if torch does
    not report it); 1 GiB (no limit) for any other device. Autotune prunes configs above it."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    return 1 << 30
