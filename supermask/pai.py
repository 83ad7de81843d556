"""Pruning at initialisation (PaI): tickets chosen before any training of the dense network.

    masks = pai_masks(model, "snip", k=0.1, batch=(x, y))        # global top-k of |g * w|
    keeper = MaskKeeper(model, masks)                             # then train the kept weights

Every method scores each weight of every nn.Linear / nn.Conv2d (the output layer too, as the
papers do) on the untouched network and keeps the k fraction of largest score, per layer
(``num_kept(n, k)`` weights each) or over all layers together (``num_kept(N, k)`` = round(k * N)
weights). The selection is supermask.mask's (``topk_threshold`` / ``mask_from_threshold``): among
equal scores the lower flat index (earlier layer, in the global scope) wins. Scores are signed
where the method's are (GraSP): the largest values are kept, not the largest magnitudes.

- ``snip`` (Lee, Ajanthan & Torr, ICLR 2019): |dL/dw * w| on one batch; global.
- ``grasp`` (Wang, Zhang & Grosse, ICLR 2020): S(-w) = -w * (H g), H the Hessian of the loss and g
  its gradient (one double backward), logits divided by a temperature of 200 as in the authors'
  code. The paper removes the weights of *largest* S(-w), those whose removal reduces the gradient
  flow least, i.e. it keeps the k fraction of smallest S(-w); global.
- ``synflow`` (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020): data-free. Every weight replaced by
  |w| (float64, BatchNorm in eval mode), an all-ones input, R = sum of the outputs; score
  dR/dw * w. Applied 100 times, the kept fraction following the exponential schedule
  k ** (r / 100), r = 1..100, each round scoring the network masked by the previous round; global.
- ``random``: uniformly random masks (exactly num_kept per layer); layer-wise.
- ``magnitude``: |w| at initialisation; layer-wise.

The sanity checks of Frankle, Dziugaite, Roy & Carbin ("Pruning neural networks at
initialization: why are we missing the mark?", ICLR 2021): ``shuffle`` keeps each layer's number
of weights but moves them uniformly at random within the layer (pruning.random_masks_like);
``reinit`` keeps the mask and draws the kept weights afresh (pruning.reinit_).

Scoring runs on a copy of the model: the network handed in (weights, BatchNorm statistics, the
global RNG) is left exactly as it was.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as data_mod
from .init import layer_generator
from .mask import mask_from_threshold, num_kept, topk_threshold
from .pruning import MaskKeeper, Masks, prunable_layers, random_masks_like, reinit_
from .errors import UsageError

METHODS = ("snip", "grasp", "synflow", "random", "magnitude")
# The scope each method's paper uses (random and magnitude are the layer-wise baselines of
# Frankle et al. 2021); --topk overrides it.
DEFAULT_SCOPE = {"snip": "global", "grasp": "global", "synflow": "global", "random": "layer", "magnitude": "layer"}
CHECKS = ("shuffle", "reinit")
SCOPES = ("layer", "global")
GRASP_TEMPERATURE = 200.0
SYNFLOW_ITERATIONS = 100


def _weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, m.weight) for name, m in prunable_layers(model)]


def snip_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity |dL/dw * w| for every prunable layer (Lee et al. 2019, eq. 6
    without the normalisation, which does not change the ranking).

    x: a batch of inputs (N, *input_shape); y: their labels (N,) int64. L is the mean cross
    entropy over the batch, the model in train mode (as at the start of training). Returns
    {layer name: scores of the weight's shape, the weight's dtype}. The model is not changed."""
    net = copy.deepcopy(model).train()
    weights = _weights(net)
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, [w for _, w in weights])
    return {name: (g * w).abs().detach() for (name, w), g in zip(weights, grads)}


def grasp_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 temperature: float = GRASP_TEMPERATURE) -> dict[str, torch.Tensor]:
    """GraSP's S(-w) = -w * (H g) for every prunable layer (Wang et al. 2020, eq. 8).

    g = dL/dw (held constant), H g = d(g . dL/dw)/dw by double backpropagation, L the mean cross
    entropy of the logits divided by `temperature` (200 in the authors' code). Larger S(-w) means
    that removing the weight reduces the gradient norm less (or increases it): GraSP removes the
    weights of largest S(-w), so pai_masks keeps those of smallest S(-w). Returns {layer name:
    signed scores of the weight's shape}. The model is not changed."""
    net = copy.deepcopy(model).train()
    weights = [w for _, w in _weights(net)]
    g = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), weights)
    grad_f = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), weights, create_graph=True)
    z = sum((gi.detach() * fi).sum() for gi, fi in zip(g, grad_f))
    hg = torch.autograd.grad(z, weights)
    return {name: -(w * h).detach() for (name, w), h in zip(_weights(net), hg)}


def synflow_scores(model: nn.Module, input_shape, masks: Mapping[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """SynFlow's synaptic saliency dR/dw * w of the network with every weight replaced by |w|
    (times its mask, if given), R = 1^T (prod_l |W_l|) 1: the sum of the outputs for an all-ones
    input of shape (1, *input_shape). Computed in float64 with BatchNorm in eval mode (Tanaka et
    al. 2020); every score is >= 0 and a masked weight scores exactly 0. Conservation: with
    positive-homogeneous activations and no biases every layer's scores sum to R. Returns
    {layer name: float64 scores of the weight's shape}. The model is not changed."""
    net = copy.deepcopy(model).double().eval()
    weights = _weights(net)
    with torch.no_grad():
        for name, w in weights:
            w.abs_()
            if masks is not None:
                w.mul_(masks[name].to(device=w.device, dtype=w.dtype))
    x = torch.ones((1, *input_shape), dtype=torch.float64, device=weights[0][1].device)
    r = net(x).sum()
    grads = torch.autograd.grad(r, [w for _, w in weights])
    return {name: (g * w).detach() for (name, w), g in zip(weights, grads)}


def keep_top(scores: Mapping[str, torch.Tensor], k: float, scope: str,
             alive: Mapping[str, torch.Tensor] | None = None) -> Masks:
    """Masks keeping the largest scores (signed: the largest values): num_kept(n, k) per layer
    (scope "layer") or num_kept(N, k) over all layers together (scope "global", ties in layer
    order). Entries not in `alive` are never kept while alive ones remain. Returns {name: bool
    CPU tensor}. Raises ValueError for k outside (0, 1] or an unknown scope."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    num_kept(1, k)  # validates k
    names = list(scores)
    flat = {n: scores[n].detach().reshape(-1).to("cpu", torch.float64) for n in names}
    if alive is not None:
        # Dead entries get a score below every live one (what pruning._keep_largest does with -1).
        live = torch.cat([flat[n][alive[n].reshape(-1)] for n in names])
        floor = (live.min() - live.min().abs() - 1.0) if live.numel() else torch.tensor(-1.0, dtype=torch.float64)
        flat = {n: torch.where(alive[n].reshape(-1).cpu(), flat[n], floor) for n in names}
    if scope == "layer":
        masks = {n: mask_from_threshold(flat[n], topk_threshold(flat[n], num_kept(flat[n].numel(), k))) for n in names}
    else:
        pooled = torch.cat([flat[n] for n in names])
        keep = mask_from_threshold(pooled, topk_threshold(pooled, num_kept(pooled.numel(), k)))
        masks, start = {}, 0
        for n in names:
            masks[n] = keep[start:start + flat[n].numel()]
            start += flat[n].numel()
    out = {n: masks[n].reshape(scores[n].shape) for n in names}
    if alive is not None:
        out = {n: out[n] & alive[n].cpu().bool() for n in names}
    return out


def synflow_masks(model: nn.Module, input_shape, k: float, scope: str = "global",
                  iterations: int = SYNFLOW_ITERATIONS, history: list | None = None) -> Masks:
    """Iterative SynFlow: `iterations` rounds, round r keeping k ** (r / iterations) of the weights
    (an exponential schedule ending exactly at k), each scoring the network masked by the round
    before. history, if given, receives the number of weights kept after each round."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    masks = None
    for r in range(1, iterations + 1):
        scores = synflow_scores(model, input_shape, masks)
        masks = keep_top(scores, k ** (r / iterations), scope, alive=masks)
        if history is not None:
            history.append(sum(int(m.sum()) for m in masks.values()))
    return masks


def scoring_batch(dataset: data_mod.Dataset, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch SNIP and GraSP score on: batch_size training examples drawn by the seed (its own
    generator: the data order of training is untouched)."""
    n = len(dataset.train_y)
    idx = torch.randperm(n, generator=layer_generator(seed, "pai", "batch"))[:min(batch_size, n)]
    return dataset.train_x[idx], dataset.train_y[idx]


def pai_masks(model: nn.Module, method: str, k: float, scope: str | None = None,
              batch: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
              input_shape=None, iterations: int = SYNFLOW_ITERATIONS) -> Masks:
    """The mask `method` (one of METHODS) chooses at fraction kept k, on model as it is now.

    scope: "layer" or "global" (default: DEFAULT_SCOPE[method]). batch: (x, y) for snip and grasp.
    seed: random's draw. input_shape: synflow's input (default: batch's). Returns {layer name:
    bool CPU tensor of the weight's shape}. Raises ValueError for an unknown method."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning-at-init method {method!r}; choose from {', '.join(METHODS)}")
    scope = DEFAULT_SCOPE[method] if scope is None else scope
    if method in ("snip", "grasp") and batch is None:
        raise ValueError(f"{method} scores on a batch: pass batch=(x, y)")
    if method == "snip":
        scores = snip_scores(model, *batch)
    elif method == "grasp":
        scores = {n: -s for n, s in grasp_scores(model, *batch).items()}  # keep the smallest S(-w)
    elif method == "synflow":
        if input_shape is None and batch is None:
            raise ValueError("synflow needs input_shape (or a batch to take it from)")
        shape = input_shape if input_shape is not None else tuple(batch[0].shape[1:])
        return synflow_masks(model, shape, k, scope, iterations)
    elif method == "random":
        scores = {n: torch.rand(w.shape, generator=layer_generator(seed, n, "pai-random")) for n, w in _weights(model)}
    else:
        scores = {n: w.detach().abs() for n, w in _weights(model)}
    return keep_top(scores, k, scope)


def validate_args(args):
    """supermask.train's checks of --prune-at-init / --pai-check (and --topk's default, which is
    the method's paper's scope for PaI runs, "layer" otherwise). Raises UsageError."""
    if args.topk is None:
        args.topk = DEFAULT_SCOPE[args.prune_at_init] if args.prune_at_init else "layer"
    if args.prune_at_init is None:
        if args.pai_check is not None:
            raise UsageError("--pai-check needs --prune-at-init")
        return
    if not args.dense:
        raise UsageError("--prune-at-init prunes the weights of a dense network: add --dense")
    if args.prune_at_init in ("snip", "grasp") and args.dataset in data_mod.STREAMED:
        raise UsageError(f"--prune-at-init {args.prune_at_init} scores on a batch of an in-memory dataset, "
                         f"not {args.dataset} (synflow, random and magnitude need no data)")


def prepare_training(model: nn.Module, config: dict, dataset: data_mod.Dataset, device: torch.device,
                     resume: dict | None = None) -> tuple[MaskKeeper, dict]:
    """For supermask.train --prune-at-init: the mask (config's method at config["k"], scope
    config["topk"], then config's --pai-check), the model moved to device with its pruned weights
    zeroed and held at zero (IMP's MaskKeeper: pass it as training.train's after_step), and the
    entries to store in every checkpoint ({"masks", "prune_at_init"}). A resumed run takes its
    masks from its checkpoint."""
    method, check = config["prune_at_init"], config.get("pai_check")
    if resume is not None and "masks" in resume:
        masks = resume["masks"]
    else:
        batch = scoring_batch(dataset, config["batch_size"], config["seed"]) if method in ("snip", "grasp") else None
        masks = pai_masks(model, method, config["k"], config["topk"], batch, config["seed"], dataset.input_shape)
        if check == "shuffle":
            masks = random_masks_like(masks, config["seed"], stream="pai-shuffle")
        elif check == "reinit":
            reinit_(model, config["init"], config["seed"], stream="pai-reinit")
    model.to(device)
    return MaskKeeper(model, masks), {"masks": masks, "prune_at_init": method}
