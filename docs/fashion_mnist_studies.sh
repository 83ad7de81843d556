#!/usr/bin/env bash
# The instability and pruning-at-init results (docs/instability.md, docs/pruning-at-init.md) for one network seed, as they were run:
#   bash docs/fashion_mnist_studies.sh 0      # and 1 (the two seeds ran side by side, one thread each)
# Every run lands in runs/ under its derived name and is reused if it is there; the wall time of each
# part goes to docs/instability/times_s$SEED.txt. Afterwards, both seeds' tables (docs/pai, docs/pai_checks):
#   bash docs/fashion_mnist_report.sh pai   (see docs/pruning-at-init.md)
set -euo pipefail
SEED=${1:?usage: bash docs/fashion_mnist_studies.sh SEED}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
COMMON=(--dataset fashion-mnist --data-dir "$DATA" --epochs 5 --threads 1 --no-progress)
SUFFIX=$([ "$SEED" = 0 ] && echo "" || echo "_s$SEED")
TIMES=docs/instability/times_s$SEED.txt
: > "$TIMES"
timed() {  # timed LABEL COMMAND...: run it, append "LABEL seconds" to $TIMES
    local label=$1; shift
    local t0=$SECONDS
    "$@"
    echo "$label $((SECONDS - t0))" | tee -a "$TIMES"
}
IMP_FLAGS=(--rounds 17 --prune-rate 0.2065)   # rounds 7, 10, 13, 17 keep 19.9%, 10.0%, 5.0%, 2.0% of the weights

# 1. Instability analysis: the dense network, an IMP run, its tickets at ~20% and ~5%, an edge-popup supermask.
timed instability_dense python -m supermask.instability "${COMMON[@]}" --seed "$SEED" \
    --rewind-iters 0,10,50,200,1000 --out "docs/instability/dense$SUFFIX"
timed imp_17_rounds python -m supermask.imp "${COMMON[@]}" --seed "$SEED" "${IMP_FLAGS[@]}"
IMP_DIR=$(ls -d runs/imp_fc_w1_fashion-mnist_s${SEED}_*)
for R in 7 13; do
    timed "instability_imp_round$R" python -m supermask.instability "${COMMON[@]}" --seed "$SEED" \
        --rewind-iters 0,50,200,1000 --ticket "$IMP_DIR" --round $R --out "docs/instability/imp_round$R$SUFFIX"
done
timed instability_edge_popup python -m supermask.instability "${COMMON[@]}" --seed "$SEED" \
    --rewind-iters 0,10,50,200,1000 --edge-popup --k 0.5 --out "docs/instability/edge_popup_k0.5$SUFFIX"

# 2. Pruning at initialisation vs IMP (ticket and controls) vs edge-popup vs dense at 10% and 2%.
timed compare_pai python -m supermask.compare "${COMMON[@]}" --model fc --seeds "$SEED" --ks 0.1,0.02 \
    --widths 1 --imp-widths 1 "${IMP_FLAGS[@]}" --controls reinit,random-mask \
    --pai snip,grasp,synflow,random,magnitude --out "/tmp/pai_s$SEED"
timed compare_pai_checks python -m supermask.compare "${COMMON[@]}" --model fc --seeds "$SEED" --ks 0.02 \
    --widths 1 --imp-widths '' --controls '' --pai snip,grasp,synflow --pai-checks shuffle,reinit \
    --out "/tmp/pai_checks_s$SEED"
