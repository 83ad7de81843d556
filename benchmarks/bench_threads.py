"""The CPU thread policy (supermask.threads) on an idle and on a busy machine: one fc training epoch.

Runs `python3 -m supermask.train --model fc --width 2.5 --k 0.5 --dataset fashion-mnist --epochs 1`
(into a temporary --out) under these settings:

  libgomp-default   what a user got before the policy: no wait policy (GOMP_SPINCOUNT=300000, the
                    count libgomp uses when OMP_WAIT_POLICY is unset; the policy leaves it alone), torch's threads
  policy            nothing set: supermask.threads (OMP_WAIT_POLICY=PASSIVE, torch's threads)
  active            OMP_WAIT_POLICY=ACTIVE (a user's own choice, left alone), torch's threads
  threads-1         the policy and --threads 1

each with the machine as it is ("idle") and with busy processes beside it ("busy": --busy processes of
`while True: pass`, one by default, as a browser tab or another job would). The settings run interleaved,
--repeats rounds; the epoch time is the run's seconds_per_epoch (training only, no evaluation).

    python3 benchmarks/bench_threads.py                     # -> benchmarks/results/threads.md and .json
    python3 benchmarks/bench_threads.py --repeats 1 --out /tmp/threads.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--model", "fc", "--width", "2.5", "--k", "0.5", "--dataset", "fashion-mnist", "--epochs", "1",
         "--no-progress", "--no-tensorboard"]
SETTINGS = {  # name: (environment changes, extra flags)
    "libgomp-default": ({"GOMP_SPINCOUNT": "300000"}, []),
    "policy": ({}, []),
    "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, []),
    "threads-1": ({}, ["--threads", "1"]),
}
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def epoch_seconds(setting: str, timeout: float) -> float | None:
    """One training run under `setting`; its seconds_per_epoch, None when the run took over `timeout`
    seconds (raises on a failed run)."""
    changes, flags = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARS}
    env.update(changes, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as out:
        try:
            r = subprocess.run([sys.executable, "-m", "supermask.train", *TRAIN, *flags, "--out", out],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode:
            raise RuntimeError(f"{setting}: exit {r.returncode}: {r.stderr[-2000:]}")
        return json.loads((Path(out) / "results.json").read_text())["seconds_per_epoch"]


def busy(n: int) -> list[subprocess.Popen]:
    """n processes spinning on the CPU (no OpenMP), the competing jobs."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def measure(args, save) -> dict[str, dict[str, list[float]]]:
    """{load: {setting: [epoch seconds per round]}}, the settings interleaved within a round; save(times,
    rounds) after each round (the finished rounds are kept if a later one is stopped)."""
    times = {"idle": {s: [] for s in SETTINGS}, "busy": {s: [] for s in SETTINGS}}
    for r in range(args.repeats):
        for load in ("idle", "busy"):
            spinners = busy(args.busy) if load == "busy" else []
            try:
                time.sleep(0.5 if spinners else 0)
                for setting in args.settings:
                    t = epoch_seconds(setting, args.timeout)
                    times[load][setting].append(t)
                    print(f"round {r} {load:4s} {setting:16s} {t if t is None else round(t, 2)} s", flush=True)
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
        save(times, r + 1)
    return times




def _median(ts: list, timeout: float) -> float:
    """Median epoch seconds; a run over the timeout counts as the timeout (a lower bound then)."""
    return statistics.median(timeout if t is None else t for t in ts)


def _cell(ts: list, timeout: float) -> str:
    return f"{'>= ' if None in ts else ''}{_median(ts, timeout):.2f}" if ts else "-"


def markdown(times, rounds: int, args, cpu: str, command: str) -> str:
    base = _median(times["idle"]["policy"], args.timeout) if times["idle"]["policy"] else float("nan")
    lines = ["# CPU thread policy: one fc epoch, idle vs busy machine", "",
             f"CPU: {cpu}, {os.cpu_count()} logical cores (shared with other jobs while measured: 'idle' is the "
             f"machine as it was). Busy: {args.busy} competing `while True: pass` process(es). Median of "
             f"{rounds} interleaved round(s); ratio to the policy's idle epoch; '>=': a run stopped at the "
             f"--timeout of {args.timeout:.0f} s.", "",
             f"Command: `{command}`", "",
             "| setting | idle epoch (s) | busy epoch (s) | idle ratio | busy ratio |", "|---|---|---|---|---|"]
    for s in args.settings:
        idle, busy_ = times["idle"][s], times["busy"][s]
        ratio = [f"{_median(ts, args.timeout) / base:.2f}x" if ts else "-" for ts in (idle, busy_)]
        lines.append(f"| {s} | {_cell(idle, args.timeout)} | {_cell(busy_, args.timeout)} | {ratio[0]} | {ratio[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--busy", type=int, default=1, help="competing busy processes in the busy runs (default 1)")
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds allowed for one training run (a slower one is recorded as '>= timeout')")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="which settings to run, in this order (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "threads.md"),
                   help="markdown path; the JSON beside it (default benchmarks/results/threads.md)")
    args = p.parse_args(argv)
    command = "python3 benchmarks/bench_threads.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from supermask.threads import cpu_model  # noqa: PLC0415 (torch loads only after the children's settings are known)

    cpu, out = cpu_model(), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(times, rounds):
        out.write_text(markdown(times, rounds, args, cpu, command.strip()))
        out.with_suffix(".json").write_text(json.dumps(dict(cpu=cpu, cores=os.cpu_count(), busy=args.busy,
                                                            rounds=rounds, command=command.strip(),
                                                            train=TRAIN, epoch_s=times), indent=1))

    measure(args, save)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
