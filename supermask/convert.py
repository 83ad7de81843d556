"""Turn an ordinary model into a supermask model, torch.nn.utils.prune style.

``convert(model, k)`` leaves every float parameter of the model in one of these states:

- **masked**: the weight of every nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d and
  nn.MultiheadAttention's projections is redrawn (``init``, deterministic per seed and layer name),
  frozen, and read as ``weight * mask`` with learned scores (edge-popup, Ramanujan et al. 2020).
  A plain Linear / Conv2d whose weight only its own forward reads becomes the fused
  ``SupermaskLinear`` / ``SupermaskConv2d``; every other masked weight (a Linear whose parent reads
  ``child.weight`` itself, as nn.MultiheadAttention's out_proj and torchvision Swin's qkv / proj,
  Conv1d/3d, transposed convs, tied weights, modules with hooks or their own forward) is masked
  through ``torch.nn.utils.parametrize`` (``supermask.parametrize``), so no reader sees it unmasked;
- **Hugging Face**: ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP layers) is
  masked like the nn.Linear it stands for, through the parametrization (its weight is stored
  transposed, (in, out): drawn as the Linear's and transposed, so fan_in is weight.shape[0]); its
  bias stays as a frozen zero tensor (its forward passes it to addmm). transformers is never
  imported: Conv1D is recognised by class name and module. nn.Embedding weights are masked
  (``embeddings="mask"``) or frozen at their value (``embeddings="freeze"``); see convert;
- **non-affine**: every normalisation (BatchNorm of any kind including SyncBatchNorm,
  InstanceNorm, LayerNorm, GroupNorm, RMSNorm) loses its scale and shift;
- **removed**: biases of masked layers; a bias that a reader needs as a tensor (nn.MultiheadAttention's
  in_proj_bias and out_proj.bias for its fused inference kernel) stays as a frozen zero tensor;
- **frozen**: anything else (class tokens, position embeddings, layer_scale, relative position bias
  tables, ...) keeps its value with requires_grad False.

``convert(model, weights="keep")`` learns a mask over the model's own (pretrained) weights instead
(Mallya et al. 2018, "Piggyback"; Zhao et al. 2020, "Masking as an efficient alternative to
finetuning"): every masked weight keeps its values (frozen, through the parametrization, never
fused), and biases and normalisations keep theirs (frozen, nothing removed or made non-affine).
``mask="threshold"`` is Piggyback's mask style: keep every weight whose |score| >= ``threshold``
(5e-3), scores initialised at ``score_init`` (1e-2, so training starts from the full network).

So the scores are the only trained tensors. Shared modules stay shared (one supermask module, one
scores tensor) and tied weights stay tied (one parametrization, one scores tensor).
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import numbers
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from . import ops
from .layers import MASK_KINDS, NonAffineBatchNorm, SupermaskConv2d, SupermaskLinear, SupermaskMixin, supermask_layers
from .mask import global_thresholds, num_kept
from .parametrize import SupermaskParametrization, mask_parameter

TOPK_SCOPES = ("layer", "global")
EMBEDDINGS = ("mask", "freeze")
WEIGHTS = ("redraw", "keep")  # redraw: edge-popup's random weights; keep: the model's own, frozen
MASKS = (*MASK_KINDS, "threshold")
THRESHOLD = 5e-3  # mask="threshold": Piggyback's tau (Mallya et al. 2018, section 3)
THRESHOLD_SCORE_INIT = 1e-2  # mask="threshold": Piggyback's score init, above tau (full network at start)
SCORE_INITS = ("magnitude",)  # besides a number: |weight| (top-k then starts as magnitude pruning)
log = logging.getLogger(__name__)

_MASKED_MODULES = (nn.Linear, nn.modules.conv._ConvNd)  # Conv1/2/3d and ConvTranspose1/2/3d
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# A parameter of a module convert does not know is a layer weight or bias by its name (nn's
# conventions: weight, bias, in_proj_weight, weight_ih_l0, bias_k, ...); anything else (class_token,
# pos_embedding, layer_scale, relative_position_bias_table, logit_scale) is a constant to freeze.
_WEIGHT_LIKE = re.compile(r"^(weight|bias)($|_)|_(weight|bias)$")
# A class that reads a child's tensor itself (``self.qkv.weight``) bypasses the child's forward.
_CHILD_TENSOR_READ = re.compile(r"self\.(\w+)\.(?:weight|bias)\b")


class ConvertError(ValueError):
    """convert(..., strict=True) met parameters it can neither mask, make non-affine nor remove."""


@dataclass
class ConvertReport:
    """What convert did with each float parameter (names as in model.named_parameters() before
    the conversion, shared tensors once)."""

    masked: list[str] = field(default_factory=list)  # weights given scores
    fused: int = 0  # of masked: as SupermaskLinear / SupermaskConv2d (the rest through parametrize)
    masked_numel: int = 0
    non_affine: list[str] = field(default_factory=list)  # normalisation scales and shifts removed
    removed: list[str] = field(default_factory=list)  # biases removed
    zeroed: list[str] = field(default_factory=list)  # biases kept as frozen zeros (a reader needs a tensor)
    frozen: list[str] = field(default_factory=list)  # other parameters, frozen at their value
    skipped: list[str] = field(default_factory=list)  # parameters of modules in skip, left as they were
    unhandled: list[str] = field(default_factory=list)  # layer weights convert cannot mask (frozen, dense)

    def __str__(self) -> str:
        parts = [f"masked {len(self.masked)} weight tensors ({self.masked_numel} weights; {self.fused} fused "
                 f"layers, {len(self.masked) - self.fused} parametrized)",
                 f"{len(self.non_affine)} normalisation tensors removed (non-affine)",
                 f"{len(self.removed)} biases removed", f"{len(self.zeroed)} biases frozen at zero",
                 f"{len(self.frozen)} other tensors frozen" + (f" ({_few(self.frozen)})" if self.frozen else "")]
        if self.skipped:
            parts.append(f"{len(self.skipped)} left as they were (skip: {_few(self.skipped)})")
        if self.unhandled:
            parts.append(f"{len(self.unhandled)} layer weights NOT masked, frozen dense ({_few(self.unhandled)})")
        return "convert: " + "; ".join(parts)


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Whether m is (a subclass of) transformers.pytorch_utils.Conv1D, without importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(m).__mro__)


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")


@functools.cache
def _child_tensor_readers(cls: type) -> frozenset[str] | None:
    """Names of the children whose weight or bias code of cls reads directly (``self.proj.weight``),
    from the source of its methods (initialisers excluded: they run before convert); None when some
    source is unavailable, i.e. it cannot be known."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for attr, value in vars(klass).items():
            if "init" in attr or "reset" in attr:
                continue
            fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if not inspect.isfunction(fn):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                return None
            names.update(_CHILD_TENSOR_READ.findall(source))
    return frozenset(names)


def _read_by_parent(parents: list[tuple[nn.Module, str]]) -> bool:
    """Whether some parent reads this child's weight/bias itself (or might: source unavailable)."""
    for parent, attr in parents:
        readers = _child_tensor_readers(type(parent))
        if readers is None or attr in readers:
            return True
    return False


def _fuse_ok(m: nn.Module, parents: list[tuple[nn.Module, str]]) -> bool:
    """Whether m may become a SupermaskLinear / SupermaskConv2d: a plain layer (nn's forward, no
    hooks, not parametrized, not the root) that no parent reads past its forward. (The caller
    checks that its weight is not tied.)"""
    if type(m).__name__.startswith("Parametrized") or parametrize.is_parametrized(m):
        return False
    if isinstance(m, nn.Linear):
        plain = type(m).forward is nn.Linear.forward
    elif isinstance(m, nn.Conv2d):
        plain = type(m).forward is nn.Conv2d.forward and type(m)._conv_forward is nn.Conv2d._conv_forward
    else:
        return False
    return (plain and bool(parents) and not any(getattr(m, h) for h in _HOOKS)
            and not _read_by_parent(parents))


def _fused_layer(name: str, m: nn.Module, k, init, scale_fan, seed) -> nn.Module:
    kw = dict(k=k, init=init, scale_fan=scale_fan, seed=seed, name=name, device=m.weight.device,
              dtype=m.weight.dtype)
    if isinstance(m, nn.Linear):
        return SupermaskLinear(m.in_features, m.out_features, **kw)
    return SupermaskConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                           m.dilation, m.groups, m.padding_mode, **kw)


def _is_ours(m: nn.Module) -> bool:
    """Already a supermask module (a fused layer, or the parametrization list of a masked tensor)."""
    if isinstance(m, SupermaskMixin):
        return True
    return isinstance(m, parametrize.ParametrizationList) and any(
        isinstance(p, SupermaskParametrization) for p in m)


def _check_edges(model: nn.Module, k, skip) -> None:
    """convert's answers at its edges (issue #24), before anything changes: k a number in (0, 1]
    (TypeError for a bool, string, tensor...; ValueError out of range); a model that is already a
    supermask model with another k is refused (ValueError: convert does not change the k of its
    layers; convert the original model); a layer with no weights (a zero-sized Linear or conv)
    is refused naming it (ValueError: nothing to mask; skip it)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be a number in (0, 1] (the fraction of weights kept), got {type(k).__name__} {k!r}")
    num_kept(1, k)
    other = [(n, m.k) for n, m in supermask_layers(model) if getattr(m, "mask_kind", "topk") == "topk" and m.k != k]
    if other:
        raise ValueError(f"model is already a supermask model with k={other[0][1]:g} (layer {other[0][0]!r}), not "
                         f"k={k:g}: convert() does not change a converted layer's k; convert the original model")
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        lazy = isinstance(w, nn.parameter.UninitializedTensorMixin)  # ConvertError below: run one forward first
        if isinstance(m, _MASKED_MODULES) and name not in skip and isinstance(w, torch.Tensor) and not lazy \
                and w.numel() == 0:
            raise ValueError(f"layer {name!r} has no weights (weight of shape {tuple(w.shape)}): nothing to mask; "
                             f"leave it out with skip=({name!r},)")


@dataclass
class _Graph:
    """The model's graph as convert reads it: the first name of each module (by id), the ids of the
    modules in skip, every module once, the parents of each module and the owners of each
    parameter ((module, attribute) pairs, by id of the child / parameter)."""

    first_name: dict[int, str]
    skipped: set[int]
    modules: list[nn.Module]
    parents: dict[int, list[tuple[nn.Module, str]]]
    owners: dict[int, list[tuple[nn.Module, str]]]

    @classmethod
    def of(cls, model: nn.Module, skip: set[str]) -> "_Graph":
        first_name: dict[int, str] = {}
        skipped: set[int] = set()
        for name, m in model.named_modules(remove_duplicate=False):
            first_name.setdefault(id(m), name)
            if name in skip:
                skipped.add(id(m))
        modules = [m for _, m in model.named_modules()]
        parents: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        for m in modules:
            for attr, child in m._modules.items():
                if child is not None:
                    parents[id(child)].append((m, attr))
            for pname, p in m._parameters.items():
                if p is not None:
                    owners[id(p)].append((m, pname))
        return cls(first_name, skipped, modules, parents, owners)

    def pname(self, m: nn.Module, pname: str) -> str:
        """The parameter's name as model.named_parameters() gives it (before the conversion)."""
        prefix = self.first_name[id(m)]
        return f"{prefix}.{pname}" if prefix else pname


@dataclass
class _Plan:
    """What convert will do (nothing changes until the plan is complete and, with strict, clean)."""

    to_mask: dict[int, list[tuple[nn.Module, str]]] = field(default_factory=dict)  # id(weight) -> its holders
    biases: list[tuple[nn.Module, str, bool]] = field(default_factory=list)  # (module, name, keep as zero)
    norms: list[nn.Module] = field(default_factory=list)
    to_freeze: list[nn.Parameter] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # ids of parameters already accounted for


def _layer_tensors(m: nn.Module, embeddings: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(weights to mask, biases to remove or zero) of a module, by its kind."""
    if isinstance(m, _MASKED_MODULES) or _is_hf_conv1d(m):
        return ("weight",), ("bias",)
    if isinstance(m, nn.Embedding) and embeddings == "mask":
        return ("weight",), ()
    if isinstance(m, nn.MultiheadAttention):
        return _MHA_WEIGHTS, ("in_proj_bias",)
    return (), ()


def _plan_layers(graph: _Graph, embeddings: str | None, keep: bool, report: ConvertReport) -> _Plan:
    """The weights to mask, the biases to remove or zero and the norms to make non-affine (keep:
    no bias nor norm, they stay as they are, frozen); parameters of skipped modules go to
    report.skipped. Raises ConvertError for a lazy layer."""
    plan = _Plan()
    for m in graph.modules:
        if _is_ours(m):
            plan.seen.update(id(p) for p in m._parameters.values() if p is not None)
            continue
        if id(m) in graph.skipped:
            for pname, p in m._parameters.items():
                if p is not None and id(p) not in plan.seen:
                    plan.seen.add(id(p))
                    report.skipped.append(graph.pname(m, pname))
            continue
        params = {n: p for n, p in m._parameters.items() if p is not None}
        if isinstance(m, _NORMS) and params:
            if not keep:
                plan.norms.append(m)
            continue
        weights, bias_names = _layer_tensors(m, embeddings)
        if keep:
            bias_names = ()
        for n in weights:
            p = params.get(n)
            if p is None:
                continue
            if isinstance(p, nn.parameter.UninitializedParameter):  # no shape yet: nothing to mask or freeze
                raise ConvertError(f"{graph.pname(m, n)}: lazy {type(m).__name__} not initialised; run one "
                                   "forward through the model before convert")
            plan.to_mask.setdefault(id(p), [])
        for n in bias_names:
            if params.get(n) is not None:
                # A reader outside the module's forward (the parent's code, MHA's fused kernel)
                # may need a tensor: keep a frozen zero there; elsewhere remove it.
                as_zero = (isinstance(m, nn.MultiheadAttention) or _is_hf_conv1d(m)
                           or _read_by_parent(graph.parents[id(m)]))
                plan.biases.append((m, n, as_zero))
    # Every holder of a masked weight reads it masked (a weight tied to an nn.Embedding included).
    for pid in plan.to_mask:
        plan.to_mask[pid] = [(m, n) for m, n in graph.owners[pid] if id(m) not in graph.skipped]
    return plan


def _plan_freeze(graph: _Graph, plan: _Plan, embeddings: str | None, keep: bool, report: ConvertReport) -> None:
    """Every other float parameter is frozen: report.frozen, or report.unhandled for a layer weight
    convert cannot mask (named like one, of a module it does not know, or another parametrization's)."""
    bias_ids = {id(m._parameters[n]) for m, n, _ in plan.biases}
    norm_ids = {id(m) for m in plan.norms}
    for m in graph.modules:
        if _is_ours(m) or id(m) in graph.skipped or id(m) in norm_ids:
            continue
        for pname, p in m._parameters.items():
            if p is None or id(p) in plan.to_mask or id(p) in bias_ids or id(p) in plan.seen:
                continue
            plan.seen.add(id(p))
            if not p.is_floating_point():
                continue
            plan.to_freeze.append(p)
            known = isinstance(m, (*_MASKED_MODULES, nn.MultiheadAttention)) or _is_hf_conv1d(m) or (
                embeddings == "freeze" and isinstance(m, nn.Embedding)) or (keep and isinstance(m, _NORMS))
            if isinstance(m, parametrize.ParametrizationList):  # another parametrization's tensor
                report.unhandled.append(f"{graph.pname(m, pname)} (parametrized by {type(m[0]).__name__})")
            elif _WEIGHT_LIKE.search(pname) and not known:
                report.unhandled.append(f"{graph.pname(m, pname)} ({type(m).__name__})")
            else:
                report.frozen.append(graph.pname(m, pname))


def _refuse_or_warn(report: ConvertReport, strict: bool) -> None:
    """ConvertError (strict) or a warning (pointing at convert's caller) for report.unhandled."""
    if report.unhandled:
        msg = ("convert cannot mask " + _few(report.unhandled) +
               "; they would stay dense (frozen). Mask them yourself (supermask.parametrize.mask_parameter) "
               "or skip their modules")
        if strict:
            raise ConvertError(msg)
        warnings.warn(msg, stacklevel=3)


def _mask_weights(graph: _Graph, plan: _Plan, report: ConvertReport, k, init, scale_fan, seed, keep: bool,
                  fuse: bool) -> dict[int, nn.Module]:
    """Mask every planned weight: with fuse, a fused layer where it may be (returned by id of the
    module it replaces), else through the parametrization (keep: the weight keeps its values)."""
    fused: dict[int, nn.Module] = {}
    for holders in plan.to_mask.values():
        m, n = holders[0]
        name = graph.first_name[id(m)] if n == "weight" else graph.pname(m, n)
        weight = m._parameters[n]
        report.masked.append(graph.pname(m, n))
        report.masked_numel += weight.numel()
        if fuse and len(holders) == 1 and _fuse_ok(m, graph.parents[id(m)]):
            fused[id(m)] = _fused_layer(name, m, k, init, scale_fan, seed)
            report.fused += 1
        else:
            mask_parameter(holders, k, init, scale_fan, seed, name, transposed=_is_hf_conv1d(m), keeps_weight=keep)
    return fused


def _drop_biases(graph: _Graph, plan: _Plan, report: ConvertReport, fused: dict[int, nn.Module]) -> None:
    """Remove the planned biases, or keep them as frozen zeros where a reader needs a tensor."""
    for m, n, keep in plan.biases:
        if id(m) in fused:
            report.removed.append(graph.pname(m, n))
            continue
        p = m._parameters[n]
        if keep:
            with torch.no_grad():
                p.zero_()
            p.requires_grad_(False)
            report.zeroed.append(graph.pname(m, n))
        else:
            m.register_parameter(n, None)
            report.removed.append(graph.pname(m, n))


def _make_non_affine(graph: _Graph, plan: _Plan, report: ConvertReport, fused: dict[int, nn.Module]) -> None:
    """Every planned norm loses its scale and shift: a plain BatchNorm1d/2d becomes a
    NonAffineBatchNorm (added to fused), any other norm is made non-affine in place."""
    for m in plan.norms:
        report.non_affine += [graph.pname(m, n) for n, p in m._parameters.items() if p is not None]
        if (type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) and graph.parents[id(m)]
                and not any(getattr(m, h) for h in _HOOKS)):
            # as before: NonAffineBatchNorm, which supermask.export bakes back into nn.BatchNorm2d
            fused[id(m)] = NonAffineBatchNorm(m.num_features, m.eps, m.momentum, m.track_running_stats,
                                              device=m.weight.device if m.weight is not None else None)
        else:
            for n in ("weight", "bias"):
                if m._parameters.get(n) is not None:
                    m.register_parameter(n, None)
            for flag in ("affine", "elementwise_affine"):
                if hasattr(m, flag):
                    setattr(m, flag, False)
            if getattr(m, "track_running_stats", False):
                m.reset_running_stats()  # statistics of the old weights mean nothing for the new ones


def _replace(graph: _Graph, fused: dict[int, nn.Module]) -> None:
    """Put each new module (by id of the one it replaces) in every parent's slot of the old one."""
    for m in graph.modules:
        if id(m) in fused:
            for parent, attr in graph.parents[id(m)]:
                setattr(parent, attr, fused[id(m)])


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_options(model: nn.Module, k, topk, mask, embeddings, weights, threshold, score_init):
    """convert's option checks, before anything changes; returns (k, threshold) with the mask's
    defaults filled in. ValueError for a name outside its choices, an option the mask does not
    use (k or topk="global" with mask="threshold", threshold without it), a threshold that is not
    > 0, a non-finite score_init, a model already holding supermask layers when weights are kept
    or masks thresholded (convert the original model); TypeError for a threshold or score_init
    that is not a number (or, for score_init, "magnitude")."""
    for name, value, choices in (("topk", topk, TOPK_SCOPES), ("mask", mask, MASKS), ("weights", weights, WEIGHTS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if embeddings is not None and embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings must be one of {EMBEDDINGS} or None, got {embeddings!r}")
    if mask == "threshold":
        if k is not None or topk != "layer":
            raise ValueError("k and topk are top-k options; mask='threshold' keeps every weight whose |score| >= "
                             "threshold: leave them out")
        threshold = THRESHOLD if threshold is None else threshold
        if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
            raise TypeError(f"threshold must be a number > 0, got {type(threshold).__name__} {threshold!r}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    elif threshold is not None:
        raise ValueError(f"threshold is mask='threshold''s option, not mask={mask!r}'s")
    if score_init is not None and score_init not in SCORE_INITS:
        if not isinstance(score_init, numbers.Real) or isinstance(score_init, bool):
            raise TypeError(f"score_init must be a number or one of {SCORE_INITS}, got "
                            f"{type(score_init).__name__} {score_init!r}")
        if not _is_number(score_init):
            raise ValueError(f"score_init must be finite, got {score_init!r}")
    if (weights == "keep" or mask == "threshold") and supermask_layers(model):
        raise ValueError(f"model already holds supermask layers: weights={weights!r}, mask={mask!r} mask a "
                         "model's own weights; convert the original model")
    return (1.0 if mask == "threshold" else 0.5 if k is None else k), threshold  # (threshold: k unused)


@torch.no_grad()
def _set_scores(model: nn.Module, mask: str, threshold: float | None, score_init) -> None:
    """Every supermask layer gets the mask style and its scores score_init (a number: every score;
    "magnitude": |weight|; None: the mask's default, Piggyback's 1e-2 for mask="threshold",
    else the scores as drawn)."""
    if mask == "threshold" and score_init is None:
        score_init = THRESHOLD_SCORE_INIT
    for _, layer in supermask_layers(model):
        if mask == "threshold":
            layer.use_threshold(threshold)
        else:
            layer.mask_kind = mask
        if score_init == "magnitude":
            layer.scores.copy_(layer.weight.abs())
        elif score_init is not None:
            layer.scores.fill_(score_init)


def convert(model: nn.Module, k: float | None = None, init: str = "signed_constant", scale_fan: bool = False,
            seed: int | None = 0, topk: str = "layer", inplace: bool = False,
            skip: tuple[str, ...] = (), mask: str = "topk", strict: bool = False,
            return_report: bool = False, embeddings: str | None = None, weights: str = "redraw",
            threshold: float | None = None, score_init: float | str | None = None):
    """Make model a supermask model (a copy unless inplace); see the module docstring for what
    happens to each parameter.

    k: fraction of each layer's weights kept (topk="global": of all masked weights together;
    default 0.5; top-k only). init: weight init of supermask.init.INITS. With a seed, weights and
    scores are generated deterministically per layer name; seed=None draws from torch's global RNG.
    Module names in ``skip`` are left as they are (e.g. a dense first layer). mask="sampled" gives
    Bernoulli(sigmoid(score)) masks instead of edge-popup's top-k; mask="threshold" keeps every
    weight whose |score| >= threshold (default 5e-3, Piggyback's), gradient straight through.

    weights: "redraw" (edge-popup: every masked weight drawn with ``init``) or "keep" (the model's
    own weights, frozen, with its biases and normalisations, frozen; ``init``, ``scale_fan`` unused;
    every masked weight through the parametrization). score_init: the scores' initial value, a
    number (every score; mask="threshold"'s default 1e-2 > threshold starts from the full network)
    or "magnitude" (|weight|); None: 1e-2 for mask="threshold", else edge-popup's draw.

    A parameter named like a layer weight or bias (``weight``, ``bias_k``, ``weight_ih_l0``) of a
    module convert does not know (nn.Embedding, nn.LSTM, nn.PReLU, a custom layer) cannot be
    masked: it is frozen dense with a warning, or with ``strict=True`` ConvertError is raised
    before anything is changed.

    embeddings: what becomes of nn.Embedding weights (token, position, token-type embeddings of
    Hugging Face models). "mask": masked through the parametrization, redrawn with ``init`` like
    every masked weight (fan_in = embedding_dim) and given scores; "freeze": frozen at their
    value (a fixed random or pretrained lookup table; fewer scores). The default, None, chooses
    neither: they are reported as layer weights convert cannot mask (warning; ConvertError with
    strict), as before this option existed, because whether a table of learned vectors is
    masked or kept is the user's call and a silent choice would change what trains. An
    embedding tied to a masked weight (GPT-2's wte and lm_head) is masked whatever the option:
    a tied tensor has one set of scores. A lazy layer not yet initialised always
    raises ConvertError (run one forward first).

    The report (a ConvertReport: what was masked, made non-affine, removed, zeroed, frozen) is
    logged at INFO level on logger ``supermask.convert`` and, with return_report, returned as
    ``(model, report)``. Raises ValueError for a bad topk, mask, weights or k, for a model already
    converted with another k (refused: convert the original model) and for a layer with no weights
    (name it in skip); TypeError for a k that is not a number; for threshold and score_init see
    _check_options.
    """
    k, threshold = _check_options(model, k, topk, mask, embeddings, weights, threshold, score_init)
    _check_edges(model, k, skip)  # before anything changes
    if not inplace:
        model = copy.deepcopy(model)
    report = ConvertReport()
    graph = _Graph.of(model, set(skip))
    keep = weights == "keep"
    plan = _plan_layers(graph, embeddings, keep, report)  # nothing changes until the plan is complete
    _plan_freeze(graph, plan, embeddings, keep, report)
    _refuse_or_warn(report, strict)
    fused = _mask_weights(graph, plan, report, k, init, scale_fan, seed, keep, fuse=not keep and mask != "threshold")
    _drop_biases(graph, plan, report, fused)
    _make_non_affine(graph, plan, report, fused)
    _replace(graph, fused)
    for p in plan.to_freeze:
        p.requires_grad_(False)
    _set_scores(model, mask, threshold, score_init)
    if topk == "global" and mask == "topk":
        use_global_topk(model, k)
    log.info("%s", report)
    return (model, report) if return_report else model


def _takes_triton(layer) -> bool:
    """Whether the layer's ops run the Triton kernels (its path, else its device)."""
    path = layer._path()
    return path == "triton" or (path == "auto" and layer.scores.is_cuda and ops._triton_ok(layer.scores))


class _GlobalTopK:
    """Forward pre-hook: one threshold across all supermask layers, computed once per forward.

    Computed on every forward, eval included: a cache keyed on the scores' version counters would
    miss writes through ``scores.data``, which bypass them."""

    def __init__(self, k: float):
        self.k = k

    def __call__(self, model, args):
        layers = [m for _, m in supermask_layers(model)]
        select = global_thresholds
        if layers and _takes_triton(layers[0]):  # the radix-select kernel, same answer
            from .kernels import global_thresholds as select  # noqa: PLC0415
        for m, t in zip(layers, select([m.scores for m in layers], self.k)):
            m.shared_threshold = t


def use_global_topk(model: nn.Module, k: float) -> nn.Module:
    """Switch model to one global top-k threshold over all its supermask layers (fused layers and
    parametrized weights alike)."""
    for _, m in supermask_layers(model):
        m.k = k
    hook = _GlobalTopK(k)
    model._supermask_global_hook = model.register_forward_pre_hook(hook)
    return model


BACKENDS = ("torch", "cpu", "triton")


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Which implementation the supermask ops run for this model's supermask layers (the --backend
    flag): sets each layer's ``path`` (supermask.ops.PATHS); other models keep theirs. "torch": the
    reference path (plain torch, the ground truth); "cpu": the default ("auto": the device picks, C
    kernels on the CPU, Triton on CUDA), raising CPUKernelsUnavailable when the C kernels do not
    build; "triton": the Triton kernels, on CPU tensors too when Triton's interpreter is on
    (TRITON_INTERPRET=1). Layers added to the model later start at "auto". Returns model.
    Raises ValueError for another name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu":
        from . import cpu_kernels  # noqa: PLC0415

        if not cpu_kernels.available():
            raise cpu_kernels.CPUKernelsUnavailable(cpu_kernels.why_unavailable())
    path = {"torch": "reference", "cpu": "auto", "triton": "triton"}[backend]
    for _, layer in supermask_layers(model):
        layer.path = path
    return model
