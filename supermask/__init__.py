"""supermask: edge-popup supermasks and lottery tickets in PyTorch."""
import sys as _sys

# First, before anything imports torch: idle OpenMP threads sleep instead of spinning, unless the user chose a
# wait policy (libgomp reads it once, when torch loads it; see supermask.threads).
from .threads import set_wait_policy as _set_wait_policy

_set_wait_policy()

if _sys.argv[:1] == ["-m"] and _sys.excepthook is _sys.__excepthook__:  # `python -m supermask.<command>`
    def _interrupted(kind, value, tb, _default=_sys.__excepthook__):
        """Ctrl-C before a command's own handler runs (while torch is imported): one line, not a
        traceback; Python then exits by SIGINT (exit status 130 in a shell)."""
        if issubclass(kind, KeyboardInterrupt):
            print("supermask: interrupted", file=_sys.stderr)
        else:
            _default(kind, value, tb)

    _sys.excepthook = _interrupted
from .convert import ConvertError, ConvertReport, convert, set_backend, use_global_topk  # noqa: E402 (after the wait policy)
from .layers import NonAffineBatchNorm, SupermaskConv2d, SupermaskLinear, supermask_layers  # noqa: E402 (after the wait policy)
from .parametrize import SupermaskParametrization, mask_parameter  # noqa: E402 (after the wait policy)
from .mask import Threshold, global_thresholds, mask_from_threshold, masked_weight, num_kept, topk_mask, topk_threshold  # noqa: E402 (after the wait policy)
from .bank import MaskBank  # noqa: E402 (after the wait policy)

__all__ = ["convert", "ConvertError", "ConvertReport", "set_backend", "use_global_topk",
           "SupermaskParametrization", "mask_parameter", "NonAffineBatchNorm", "SupermaskConv2d",
           "SupermaskLinear", "supermask_layers", "Threshold", "global_thresholds",
           "mask_from_threshold", "masked_weight", "num_kept", "topk_mask", "topk_threshold", "MaskBank"]
__version__ = "0.1.0"
