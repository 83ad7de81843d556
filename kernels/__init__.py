"""Triton kernels for supermasks (installed as supermask.kernels).

* ``topk_threshold`` / ``global_thresholds``: exact top-k threshold by radix select (no sort);
* ``masked_linear``: fused Y = X @ (W * mask)^T with fused backward (dX, and dS with the
  straight-through product in the GEMM epilogue);
* ``masked_weight_fused``: W * mask in one pass, backward grad * W * sign(S) in one pass (convs).

On CUDA they run compiled (Ampere/Hopper configs, autotuned); with TRITON_INTERPRET=1 set before
triton is imported they run on CPU tensors in Triton's interpreter. ``python -m
supermask.kernels.aot`` compiles every kernel and config ahead of time for sm_80 and sm_90.
"""
from ._common import get_fp32_precision, interpreting, poisoned_outputs, set_fp32_precision
from .masked_linear import (MaskedLinear, masked_linear, masked_linear_backward, masked_linear_forward, masked_matmul,
                            matmul_ste)
from .masked_weight import MaskedWeightFused, masked_weight_fused, masked_weight_kernel, ste_grad_kernel
from .threshold import global_thresholds, tie_limit, topk_threshold, topk_threshold_device

__all__ = ["topk_threshold", "topk_threshold_device", "tie_limit", "global_thresholds", "masked_linear", "MaskedLinear",
           "masked_linear_forward", "masked_linear_backward", "masked_matmul",
           "matmul_ste", "masked_weight_fused", "MaskedWeightFused", "masked_weight_kernel",
           "ste_grad_kernel", "set_fp32_precision", "get_fp32_precision", "interpreting",
           "poisoned_outputs"]
