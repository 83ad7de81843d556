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
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError("supermask.kernels needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "triton is imported (CPU interpreter)")


def empty(shape, dtype, device) -> torch.Tensor:
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
    return get_fp32_precision() if dtype == torch.float32 else "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    # Triton 3.8's interpreter computes tl.dot on bf16 operands wrongly (garbage of order 1e10);
    # in the interpreter only, bf16 tiles are converted to fp32 before the dot (exact products).
    return interpreting() and dtype == torch.bfloat16


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def max_shared_memory(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    return 1 << 30
