"""SupSup task inference (Wortsman, Ramanujan et al. 2020, "Supermasks in Superposition", the GG
scenario: tasks given while training, not at inference).

Given an unlabeled batch x from one of the T tasks of a ``MaskBank``, SupSup runs the network with
all task masks superposed, f(x; W * sum_i alpha_i M_i) with alpha_i = 1/T, and asks which
coefficient lowers the output entropy H fastest:

- **one-shot**: the task argmax_i (-dH/dalpha_i), one forward and one backward pass;
- **binary** (the paper's iterative variant): starting from every task, alpha uniform over the
  candidates (0 elsewhere), keep the half of the candidates (rounded up) with the largest
  -dH/dalpha_i; repeat until one is left (ceil(log2 T) passes).

H is the entropy of the softmax output, averaged over the batch (and over any other leading
dimension, e.g. sequence positions), as in the reference code (RAIVNLab/supsup, adaptors.py:
``-(softmax * log_softmax).sum(1).mean()``). M_i are the stored 0/1 masks of each task (the top-k of
its scores, ``MaskBank.pack_task``'s bits), taken once when a ``Superposition`` is made.

The superposed forward is plain PyTorch: for the duration of the call every supermask layer's
forward (fast ``SupermaskLinear`` / ``SupermaskConv2d``) or parametrization (any weight masked
through ``supermask.parametrize``) returns its result with the weight W * sum_i alpha_i M_i instead
of W * M_task, so gradients reach alpha through autograd.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .bank import MaskBank
from .layers import SupermaskConv2d, SupermaskLinear
from .parametrize import SupermaskParametrization

INFER_METHODS = ("one-shot", "binary")


class Superposition:
    """The masks of the tasks ``tasks`` (default: all) of ``bank``, stacked per supermask layer, and
    the bank's network run with them superposed.

    ``masks[i]`` is a (len(tasks), n_i) tensor of 0.0/1.0 in the dtype of layer i's weight (n_i its
    number of weights): task tasks[j]'s mask at the time the Superposition was made (a later
    change of the bank's scores is not seen: make a new one). The bank's current task is kept.
    Raises ValueError for an empty ``tasks``, IndexError for a task outside the bank.
    """

    def __init__(self, bank: MaskBank, tasks=None):
        self.bank = bank
        self.tasks = list(range(bank.num_tasks) if tasks is None else tasks)
        if not self.tasks:
            raise ValueError("Superposition needs at least one task")
        current = bank.task
        masks = [[] for _ in bank.layer_names]
        try:
            for t in self.tasks:
                bank.set_task(t)
                for i, layer in enumerate(bank._layers):
                    masks[i].append(layer.mask().reshape(-1).to(layer.weight.dtype))
        finally:
            bank.set_task(current)
        self.masks = [torch.stack(m) for m in masks]

    def weights(self, alpha: torch.Tensor) -> list[torch.Tensor]:
        """W_i * sum_j alpha_j M_ij for every supermask layer i (the weight's shape and dtype).
        alpha: (len(tasks),) tensor, any requires_grad."""
        return [layer.weight * (alpha.to(m.dtype) @ m).view_as(layer.weight)
                for layer, m in zip(self.bank._layers, self.masks)]

    def __call__(self, alpha: torch.Tensor, *args, **kwargs):
        """The bank's model on (args, kwargs) with the superposed weights of ``alpha`` (shape
        (len(tasks),)); alpha = one-hot(j) gives task tasks[j]'s output. Raises ValueError for an
        alpha of another shape, TypeError for a supermask layer kind it does not know."""
        if alpha.shape != (len(self.tasks),):
            raise ValueError(f"alpha must have shape ({len(self.tasks)},), got {tuple(alpha.shape)}")
        with _superposed(self.bank._layers, self.weights(alpha)):
            return self.bank.model(*args, **kwargs)


@contextlib.contextmanager
def _superposed(layers, weights):
    """Every layer's forward computes with its weight in ``weights`` (an instance attribute over the
    class's forward), restored when the block ends."""
    for layer, w in zip(layers, weights):
        if isinstance(layer, SupermaskParametrization):
            layer.forward = (lambda w: lambda original: w)(w)
        elif isinstance(layer, SupermaskLinear):
            layer.forward = (lambda w: lambda x: F.linear(x, w))(w)
        elif isinstance(layer, SupermaskConv2d):
            layer.forward = (lambda layer, w: lambda x: layer._conv_forward(x, w, None))(layer, w)
        else:
            _restore(layers)
            raise TypeError(f"superposition: unknown supermask layer type {type(layer).__name__}")
    try:
        yield
    finally:
        _restore(layers)


def _restore(layers):
    for layer in layers:
        layer.__dict__.pop("forward", None)


def output_entropy(output) -> torch.Tensor:
    """The mean entropy (nats) of softmax(output) over the last dimension, averaged over every other
    one (the batch, positions): SupSup's H. output: a tensor (..., classes) or a model output with
    ``.logits`` (Hugging Face)."""
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def entropy_gradient(sup: Superposition, alpha: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """dH/dalpha at alpha (a (len(tasks),) tensor; a leaf copy is differentiated), H =
    output_entropy of the superposed forward on (args, kwargs)."""
    alpha = alpha.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        h = output_entropy(sup(alpha, *args, **kwargs))
        (grad,) = torch.autograd.grad(h, alpha)
    return grad


@dataclass
class TaskGuess:
    """infer_task's answer: ``task`` (the bank's task index), ``scores`` (-dH/dalpha at the uniform
    alpha over every candidate, one per Superposition task, the one-shot rule's scores) and, for
    the binary method, ``rounds``: the candidate tasks before each halving."""
    task: int
    scores: torch.Tensor
    rounds: list[list[int]] = field(default_factory=list)


def infer_task(bank, x, method: str = "one-shot", **kwargs) -> TaskGuess:
    """Which task the unlabeled batch x belongs to, by SupSup's entropy gradient (see the module).

    bank: a MaskBank (its tasks' masks are taken now) or a Superposition (masks taken once, cheaper
    for many batches). x: the model's input, a batch (first dimension > 0); kwargs go to the model
    too. method: "one-shot" or "binary". Returns a TaskGuess. Raises ValueError for an unknown
    method, an empty batch, fewer than 2 tasks or an entropy gradient that is not finite.
    """
    if method not in INFER_METHODS:
        raise ValueError(f"method must be one of {', '.join(INFER_METHODS)}, got {method!r}")
    if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] == 0):
        raise ValueError(f"task inference needs a non-empty batch, got input of shape {tuple(x.shape)}")
    sup = bank if isinstance(bank, Superposition) else Superposition(bank)
    n = len(sup.tasks)
    if n < 2:
        raise ValueError(f"task inference needs at least 2 tasks, got {n}")
    dtype = sup.masks[0].dtype
    candidates, rounds, scores = list(range(n)), [], None
    while True:
        alpha = torch.zeros(n, dtype=dtype)
        alpha[candidates] = 1.0 / len(candidates)
        grad = entropy_gradient(sup, alpha, x, **kwargs)
        if not bool(torch.isfinite(grad[candidates]).all()):
            raise ValueError("the entropy gradient is not finite (a non-finite input, or an output that overflows)")
        if scores is None:
            scores = -grad
        if method == "one-shot":
            return TaskGuess(sup.tasks[int(scores.argmax())], scores)
        rounds.append([sup.tasks[c] for c in candidates])
        order = sorted(candidates, key=lambda c: (float(grad[c]), c))  # largest -dH/dalpha first
        candidates = sorted(order[:math.ceil(len(candidates) / 2)])
        if len(candidates) == 1:
            return TaskGuess(sup.tasks[candidates[0]], scores, rounds)
