"""Exact k-th largest selection (the threshold of a top-k mask)."""
from __future__ import annotations

import torch


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of x (flattened), 1 <= k <= x.numel(), as a 0-dim tensor of x's dtype."""
    flat = x.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return torch.kthvalue(flat, n - k + 1).values
