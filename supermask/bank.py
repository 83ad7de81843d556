"""Mask banks: one frozen network, one supermask per task (Wortsman, Ramanujan et al. 2020,
"Supermasks in Superposition", SupSup, the edge-popup authors' sequel).

``bank = MaskBank(model, num_tasks)`` takes a supermask model (``supermask.convert`` or the
supermask layers) and gives every supermask layer, fast ``SupermaskLinear`` / ``SupermaskConv2d``
and parametrized weights alike, ``num_tasks`` scores tensors of its weight's shape. ``set_task(t)``
points every layer at task t's scores in one call; the frozen weights are shared by all tasks.
Training task t (an optimizer over ``bank.task_parameters(t)``, or over all of ``bank.parameters()``:
only task t's scores are in the graph) never gives another task's scores a gradient, so no other
task's outputs change, bit for bit. A task's masks are stored at 1 bit per weight
(``pack_task`` / ``load_task``, the packing of ``supermask.compact``).

Task inference (SupSup's one-shot and binary entropy gradient over superposition coefficients,
given an unlabeled batch) is ``supermask.supsup.infer_task``; task sequences (permuted and split
Fashion-MNIST, resumable run folders) are ``supermask.sequences`` / ``python -m supermask.tasks``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .compact import pack_bits, unpack_bits
from .init import init_scores, layer_generator
from .layers import SupermaskMixin, supermask_layers


def _task_scores(layer: SupermaskMixin, name: str, seed: int | None, task: int) -> nn.Parameter:
    """Fresh scores for one task of one layer: edge-popup's init, deterministic per (seed, layer
    name, task), drawn for the (out, in) shape of a transposed (transformers Conv1D) weight."""
    transposed = getattr(layer, "transposed", False)
    shape = tuple(layer.scores.shape)
    g = torch.default_generator if seed is None else layer_generator(seed, name, f"scores/task{task}")
    s = init_scores(shape[::-1], g).T if transposed else init_scores(shape, g)
    return nn.Parameter(s.to(device=layer.scores.device, dtype=layer.scores.dtype).contiguous())


class MaskBank(nn.Module):
    """``num_tasks`` supermasks over the one frozen network of ``model``.

    model: a supermask model (its layers keep their frozen weights; their current scores become
    task 0's). ``self.scores[i][t]`` is task t's scores of the i-th supermask layer (same shape and
    dtype as the layer's weight); tasks 1..T-1 are drawn with edge-popup's init, deterministically
    per (seed, layer name, task) (seed=None: torch's global RNG). The model starts on task 0.
    Raises ValueError for num_tasks < 1 or a model without supermask layers.
    """

    def __init__(self, model: nn.Module, num_tasks: int, seed: int | None = 0):
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        layers = supermask_layers(model)
        if not layers:
            raise ValueError("MaskBank needs a supermask model (supermask.convert it first): no supermask layers")
        self.model = model
        self.layer_names = [name for name, _ in layers]
        self._layers = [layer for _, layer in layers]  # a plain list: the model holds them
        self.scores = nn.ModuleList()
        for name, layer in layers:
            first = nn.Parameter(layer.scores.detach().clone())
            rest = [_task_scores(layer, name, seed, t) for t in range(1, num_tasks)]
            self.scores.append(nn.ParameterList([first, *rest]))
        self.num_tasks = num_tasks
        self.task = -1
        self.set_task(0)

    def set_task(self, task: int) -> None:
        """Point every supermask layer at task ``task``'s scores (no copy: the layer's ``scores``
        is the bank's Parameter, so training the model trains that task). Raises IndexError for a
        task outside [0, num_tasks)."""
        self._check(task)
        for layer, bank in zip(self._layers, self.scores):
            layer.scores = bank[task]
        self.task = task

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """Task ``task``'s scores, one tensor per supermask layer (what an optimizer for it takes)."""
        self._check(task)
        return [bank[task] for bank in self.scores]

    def forward(self, *args, **kwargs):
        """The model's forward with the current task's masks."""
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def pack_task(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s masks at 1 bit per weight: {layer name: uint8 tensor of ceil(n / 8) bytes}
        (supermask.compact.pack_bits; unpack with the layer's weight shape). The current task is
        kept."""
        current = self.task
        self.set_task(task)
        try:
            return {name: pack_bits(layer.mask()) for name, layer in zip(self.layer_names, self._layers)}
        finally:
            self.set_task(current)

    @torch.no_grad()
    def load_task(self, task: int, packed: dict[str, torch.Tensor]) -> None:
        """Set task ``task``'s scores to the masks of ``pack_task``'s output (1.0 kept, 0.0 dropped, as
        supermask.compact.load_compact does), so its top-k masks are those stored. Raises KeyError
        for a missing layer, ValueError for a mask of the wrong size or with another number kept."""
        for name, layer, bank in zip(self.layer_names, self._layers, self.scores):
            bits = packed[name]
            if bits.numel() != (layer.scores.numel() + 7) // 8:
                raise ValueError(f"{name}: {bits.numel()} bytes for {layer.scores.numel()} weights")
            mask = unpack_bits(bits, layer.scores.shape)
            if layer.mask_kind == "topk" and int(mask.sum()) != layer._n_keep():
                raise ValueError(f"{name}: the mask keeps {int(mask.sum())} weights, the layer keeps {layer._n_keep()}")
            bank[task].copy_(mask.to(bank[task].dtype))

    def _check(self, task: int) -> None:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise IndexError(f"task must be an int in [0, {self.num_tasks}), got {task!r}")
