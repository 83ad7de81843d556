"""CPU thread policy (issue #22 item 5): the CPU path must not collapse on a busy machine.

Two parts:

* **Wait policy.** torch's OpenMP runtime (libgomp) lets a thread that finished its share of a
  parallel region spin, waiting for the next region (300000 spins by default). On a machine where
  another job holds a core, those spinning threads take the time slices the working threads need: an
  fc epoch took 43 s instead of 2.5 s. ``set_wait_policy`` sets ``OMP_WAIT_POLICY=PASSIVE`` (waiting
  threads sleep at once) unless the user chose a wait policy (``OMP_WAIT_POLICY`` or
  ``GOMP_SPINCOUNT`` set). libgomp reads the variable once, when it is loaded, i.e. when torch is
  first imported; so ``supermask/__init__.py`` calls it before importing anything that imports
  torch. A process that imported torch before supermask keeps the wait policy it started with (its
  child processes get the new one).
* **Thread count.** ``apply_threads(n)`` is what the commands' ``--threads N`` does: ``N > 0`` sets
  torch's intra-op threads to N (``torch.set_num_threads``); ``0`` (the default) keeps torch's own
  count (``OMP_NUM_THREADS`` when set, else one thread per physical core): the policy changes only
  how threads wait, not how many there are. The measured epochs (idle and busy machine, the old
  libgomp default, the policy, --threads 1) are in benchmarks/results/threads.md
  (benchmarks/bench_threads.py).

This module imports nothing but ``os`` at its top, so that importing it does not load torch.
"""
from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping
from pathlib import Path

WAIT_POLICY = "PASSIVE"
# Variables by which a user has chosen how OpenMP threads wait: the policy then leaves the wait alone.
USER_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

THREADS_HELP = ("CPU threads for torch's intra-op parallelism (torch.set_num_threads). 0 (default): torch's own "
                "count, OMP_NUM_THREADS when set, else one per physical core. Idle OpenMP threads sleep "
                "instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is "
                "set), so a busy machine does not slow an epoch many times over")


def set_wait_policy(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` (default ``os.environ``) unless a variable of
    ``USER_WAIT_VARS`` is already set there. Returns the OMP_WAIT_POLICY now in force (None when the
    user set only GOMP_SPINCOUNT). Has an effect on this process only if called before torch is
    imported (libgomp reads it when loaded); child processes inherit it."""
    env = os.environ if environ is None else environ
    if not any(v in env for v in USER_WAIT_VARS):
        env["OMP_WAIT_POLICY"] = WAIT_POLICY
    return env.get("OMP_WAIT_POLICY")


def apply_threads(threads: int) -> int:
    """The ``--threads`` flag: ``threads > 0`` sets torch's intra-op thread count to it; ``0`` leaves
    torch's count as it is. Returns the count in force. Raises ValueError for a negative count (the
    commands' flags refuse it before)."""
    import torch  # noqa: PLC0415  (here, not at the top: see the module's docstring)

    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name", else ``platform.processor()`` or the
    architecture): every speed figure the benchmarks write says which CPU made it. Never raises."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
