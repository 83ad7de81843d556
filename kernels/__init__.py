"""Triton kernels for supermasks (installed as supermask.kernels)."""
