"""The CPU thread policy (supermask.threads): what it promises, seen by a child process's own OpenMP
runtime (libgomp prints the settings it read when OMP_DISPLAY_ENV=VERBOSE), and what it leaves alone:
a user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT, OMP_NUM_THREADS and --threads."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from supermask import imp as imp_mod
from supermask import threads
from supermask import train as train_mod

ROOT = Path(__file__).resolve().parents[1]
CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_DISPLAY_ENV")
# libgomp's spin counts: PASSIVE 0, unset 300000, ACTIVE 30000000000 (GOMP_SPINCOUNT when set wins)
SPIN = {"PASSIVE": "0", None: "300000", "ACTIVE": "30000000000"}

# (environment given, OMP_WAIT_POLICY after set_wait_policy, variables it must not have added)
POLICY_ROWS = [
    ({}, "PASSIVE", ()),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE", ()),
    ({"OMP_WAIT_POLICY": "passive"}, "passive", ()),
    ({"GOMP_SPINCOUNT": "1000"}, None, ("OMP_WAIT_POLICY",)),
    ({"OMP_NUM_THREADS": "3"}, "PASSIVE", ()),
]


@pytest.mark.parametrize("given, policy, absent", POLICY_ROWS)
def test_set_wait_policy_sets_passive_only_when_the_user_chose_no_wait(given, policy, absent):
    env = dict(given)
    assert threads.set_wait_policy(env) == policy
    assert env.get("OMP_WAIT_POLICY") == policy
    assert all(env[k] == v for k, v in given.items())  # nothing of the user's changed
    assert not any(a in env for a in absent)


def _child(code: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(env_vars, PYTHONPATH=str(ROOT), OMP_DISPLAY_ENV="VERBOSE")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def _libgomp(stderr: str, name: str) -> str:
    m = re.search(rf"{name} = '([^']*)'", stderr)
    assert m, f"libgomp printed no {name}:\n{stderr}"
    return m.group(1)


# (the user's OMP_WAIT_POLICY, what the child's environment holds, libgomp's spin count)
CHILD_ROWS = [(None, "PASSIVE", SPIN["PASSIVE"]), ("ACTIVE", "ACTIVE", SPIN["ACTIVE"]),
              ("PASSIVE", "PASSIVE", SPIN["PASSIVE"])]


@pytest.mark.parametrize("user, seen, spin", CHILD_ROWS)
def test_importing_supermask_sets_the_wait_policy_libgomp_reads(user, seen, spin):
    code = "import os, supermask, torch; torch.ones(1); print(os.environ.get('OMP_WAIT_POLICY'))"
    r = _child(code, **({"OMP_WAIT_POLICY": user} if user else {}))
    assert r.stdout.split() == [seen]
    assert _libgomp(r.stderr, "OMP_WAIT_POLICY") == seen
    assert _libgomp(r.stderr, "GOMP_SPINCOUNT") == spin


def test_a_users_spin_count_is_left_alone():
    r = _child("import os, supermask; print(os.environ.get('OMP_WAIT_POLICY'))", GOMP_SPINCOUNT="12345")
    assert r.stdout.split() == ["None"]
    assert _libgomp(r.stderr, "GOMP_SPINCOUNT") == "12345"


def test_torch_imported_first_keeps_its_wait_but_children_get_the_policy():
    code = ("import os, subprocess, sys, torch, supermask; print(os.environ['OMP_WAIT_POLICY']); "
            "sys.stdout.flush(); subprocess.run([sys.executable, '-c', 'import torch'], check=True)")
    r = _child(code)
    assert r.stdout.split() == ["PASSIVE"]
    # the parent's libgomp printed first (unset: 300000), the child's second (PASSIVE: 0)
    assert re.findall(r"GOMP_SPINCOUNT = '(\d+)'", r.stderr) == [SPIN[None], SPIN["PASSIVE"]]


@pytest.mark.parametrize("omp_num_threads", [None, "1"])
def test_apply_threads_sets_a_count_and_zero_keeps_torchs(omp_num_threads):
    code = ("import torch; from supermask.threads import apply_threads as a; "
            "n = torch.get_num_threads(); print(n, a(0), a(3), torch.get_num_threads(), a(0))")
    r = _child(code, **({"OMP_NUM_THREADS": omp_num_threads} if omp_num_threads else {}))
    n, zero, three, now, zero_after = map(int, r.stdout.split())
    assert zero == n and three == now == zero_after == 3
    if omp_num_threads:
        assert n == int(omp_num_threads)


def test_apply_threads_refuses_a_negative_count():
    with pytest.raises(ValueError, match="threads must be >= 0"):
        threads.apply_threads(-1)


TINY = ["--dataset", "synthetic", "--epochs", "1", "--width", "0.25", "--val-size", "200", "--no-progress",
        "--no-tensorboard"]


# (command's main, extra flags, --threads given, threads after the run; conftest sets 2 before each test)
COMMAND_ROWS = [(train_mod.main, [], "1", 1), (train_mod.main, [], "0", 2),
                (imp_mod.main, ["--rounds", "1", "--val-every", "0"], "1", 1)]


@pytest.mark.parametrize("main, extra, given, after", COMMAND_ROWS)
def test_the_commands_threads_flag_goes_through_the_policy(tmp_path, main, extra, given, after):
    assert main([*TINY, *extra, "--threads", given, "--out", str(tmp_path / "run")]) == 0
    assert torch.get_num_threads() == after


@pytest.mark.parametrize("module", ["supermask.train", "supermask.imp", "supermask.instability"])
def test_help_says_what_threads_does(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    line = " ".join(r.stdout.split())
    assert "--threads" in line and "torch.set_num_threads" in line and "OMP_WAIT_POLICY=PASSIVE" in line


def test_only_the_policy_module_sets_torchs_thread_count():
    pkg = ROOT / "supermask"
    callers = sorted(p.name for p in pkg.glob("*.py") if "set_num_threads(" in p.read_text())
    assert callers == ["threads.py"]
