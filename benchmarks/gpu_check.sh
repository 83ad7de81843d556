#!/usr/bin/env bash
# The one-call GPU check (issue #22 item 4). From a plain checkout, nothing installed:
#
#     bash benchmarks/gpu_check.sh --out DIR [--budget SECONDS]
#
# Runs the stages of benchmarks/gpu_check.py, each in its own python3 process under its own time
# limit, inside a total budget (default 470 s, so that a rerun fits in 15 minutes of device time):
#   env, preflight (aborts the check, exit 3, unless the Triton kernels are really the path taken),
#   correctness, nan, sanitizer (compute-sanitizer memcheck + racecheck of the tiny stage, if on PATH),
#   kernels, threshold, train, summary.
# Every row is appended under DIR as soon as it is known (results.md, results.jsonl; also log.txt,
# env.txt, sanitizer.txt, and summary.md last): stop it half-way and the finished rows are there.
# Without CUDA every CUDA part says SKIPPED (with the reason) and the exit code is 0.
# Exit: 0 ok, 1 a row failed or a stage ran out of time, 2 bad arguments, 3 preflight refused.
set -u
usage="usage: bash benchmarks/gpu_check.sh --out DIR [--budget SECONDS]"
out="" budget=470
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:-}"; shift 2 || { echo "gpu_check: --out needs a folder; $usage" >&2; exit 2; } ;;
        --budget) budget="${2:-}"; shift 2 || { echo "gpu_check: --budget needs seconds; $usage" >&2; exit 2; } ;;
        *) echo "gpu_check: unknown argument '$1'; $usage" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || { echo "gpu_check: --out DIR is required; $usage" >&2; exit 2; }
case "$budget" in ''|*[!0-9]*) echo "gpu_check: --budget must be whole seconds, got '$budget'" >&2; exit 2 ;; esac
command -v python3 >/dev/null || { echo "gpu_check: python3 is not on PATH" >&2; exit 2; }
mkdir -p "$out" || { echo "gpu_check: cannot create $out" >&2; exit 2; }
out="$(cd "$out" && pwd)"
[ -e "$out/results.jsonl" ] && { echo "gpu_check: $out already holds results; give an empty folder" >&2; exit 2; }

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/log.txt"
start=$(date +%s)
status=0 child="" last_rc=0
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; echo "gpu_check: stopped by a signal; the rows so far are under $out" >&2; exit 143' TERM INT

row() {  # row STAGE CASE STATUS WHY: a row written by this script (TIMEOUT, sanitizer results)
    printf '{"stage": "%s", "case": "%s", "status": "%s", "why": "%s", "t": %s}\n' "$1" "$2" "$3" "$4" "$(date +%s)" >>"$out/results.jsonl"
    printf -- '- %s: %s: %s %s\n' "$1" "$2" "$3" "$4" | tee -a "$out/results.md"
}

run_stage() {  # run_stage NAME LIMIT: one stage, in the background so that a signal reaches it
    local name=$1 lim=$2 left rc
    left=$(( budget - 15 - ($(date +%s) - start) ))
    [ "$name" = summary ] && left=15
    [ "$lim" -gt "$left" ] && lim=$left
    if [ "$lim" -lt 5 ]; then row "$name" "stage" "TIMEOUT" "no time left in the budget of ${budget} s"; status=1; last_rc=124; return 1; fi
    echo "== $name (limit $lim s, $(( $(date +%s) - start )) s so far)" | tee -a "$log"
    GPU_CHECK_DEADLINE=$(( $(date +%s) + lim - 8 )) timeout -k 5 "$lim" python3 benchmarks/gpu_check.py --stage "$name" --out "$out" > >(tee -a "$log") 2>&1 &
    child=$!
    wait "$child"; rc=$?
    child="" last_rc=$rc
    case $rc in
        0) ;;
        124|137) row "$name" "stage" "TIMEOUT" "killed at its limit of $lim s (rows before it are kept)"; status=1 ;;
        *) status=1 ;;
    esac
    return 0
}

if ! python3 -c "import supermask.kernels" 2>>"$log"; then
    [ -e supermask/kernels ] || ln -s ../kernels supermask/kernels  # a copy that dropped the link
fi
cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$log" || echo 0)
# On a CPU-only machine (no device time at stake; a shared, slower CPU) the limits are wider.
if [ "$cuda" = 1 ]; then lim_pre=45 lim_cor=80 lim_nan=15; else lim_pre=150 lim_cor=120 lim_nan=60; budget=$(( budget > 600 ? budget : 600 )); fi

run_stage env 15
run_stage preflight "$lim_pre"
if [ "$last_rc" != 0 ]; then  # refused, failed or out of time: nothing after it could be trusted
    echo "gpu_check: preflight did not pass (exit $last_rc): nothing was checked or timed (see $out/results.md)" >&2
    run_stage summary 15
    exit 3
fi
run_stage correctness "$lim_cor"
run_stage nan "$lim_nan"

if [ "$cuda" != 1 ]; then
    row sanitizer "memcheck, racecheck" SKIPPED "no CUDA device (torch.cuda.is_available() is False)"
elif ! command -v compute-sanitizer >/dev/null; then
    row sanitizer "memcheck, racecheck" SKIPPED "compute-sanitizer is not on PATH"
else
    run_stage tiny 20  # compiles the tiny launches' kernels into Triton's cache, outside the sanitizer
    for tool in memcheck racecheck; do
        left=$(( budget - 15 - ($(date +%s) - start) )); lim=$(( left < 30 ? left : 30 ))
        [ "$lim" -lt 10 ] && { row sanitizer "$tool" TIMEOUT "no time left"; status=1; continue; }
        echo "== sanitizer $tool (limit $lim s)" | tee -a "$log"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$lim" compute-sanitizer --tool "$tool" --error-exitcode 9 \
            python3 benchmarks/gpu_check.py --stage tiny --out "$out" >>"$out/sanitizer.txt" 2>&1
        rc=$?
        summary=$(grep -a "ERROR SUMMARY\|RACECHECK SUMMARY" "$out/sanitizer.txt" | tail -1 | tr -d '"\\')
        case $rc in
            0) row sanitizer "$tool" ok "$summary" ;;
            124|137) row sanitizer "$tool" TIMEOUT "killed at $lim s"; status=1 ;;
            *) row sanitizer "$tool" FAIL "exit $rc: $summary (see sanitizer.txt)"; status=1 ;;
        esac
    done
fi

run_stage kernels 100
run_stage threshold 25
run_stage train 95
run_stage summary 15
echo "== done in $(( $(date +%s) - start )) s, exit $status; results under $out" | tee -a "$log"
exit $status
