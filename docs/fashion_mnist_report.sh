#!/usr/bin/env bash
# The commands that made the committed result folders under docs/ (the pages show the same commands
# writing to fresh folders under runs/). Run from the repository root, one part at a time:
#   bash docs/fashion_mnist_report.sh compare    # docs/compare/           (docs/lottery-tickets.md)
#   bash docs/fashion_mnist_report.sh compare100 # docs/compare_100/       (docs/lottery-tickets.md; the paper's
#                                                # 100 epochs: ~10 core-hours here, resumable; --no-train
#                                                # after it draws the table of what has finished)
#   bash docs/fashion_mnist_report.sh analysis   # docs/analysis/          (docs/analysis.md; after compare)
#   bash docs/fashion_mnist_report.sh export     # docs/export/*.smask     (docs/export.md; remade: the file
#                                                # was written by an earlier version of the compact writer)
#   bash docs/fashion_mnist_report.sh pai        # docs/pai/, docs/pai_checks/ (docs/pruning-at-init.md)
# docs/instability/* come from `bash docs/fashion_mnist_studies.sh 0` and `... 1`, which also train every
# run the pai tables read (the tables' commands then train nothing). Every run lands in runs/ under its
# name and is reused if it is there. These write over the committed results: compare with `git diff`.
set -euo pipefail
PART=${1:?usage: bash docs/fashion_mnist_report.sh compare|compare100|analysis|export|pai}

case "$PART" in
compare)  # Edge-popup vs IMP tickets (+ controls) vs dense, two seeds, 10 epochs.
    python -m supermask.compare --model fc --dataset fashion-mnist --epochs 10 --seeds 0,1 \
        --ks 0.1,0.3,0.5,0.7 --widths 1,2.5 --imp-widths 1 --rounds 8 --controls reinit,random-mask \
        --threads 1 --out docs/compare ;;
compare100)  # The same at the edge-popup paper's budget: 100 epochs, and width 5 too. Extra arguments are passed
    # on (e.g. --no-train: the table of the finished runs only; the committed docs/compare_100 is one such).
    python -m supermask.compare --model fc --dataset fashion-mnist --epochs 100 --seeds 0,1 \
        --ks 0.1,0.3,0.5,0.7 --widths 1,2.5,5 --imp-widths 1 --rounds 8 --controls reinit,random-mask \
        --threads 1 --no-tensorboard --out docs/compare_100 "${@:2}" ;;
analysis)  # Two edge-popup seeds at k=0.512 vs the IMP run of seed 0 that compare trained.
    python -m supermask.train --dataset fashion-mnist --k 0.512 --seed 0 --out runs/fm_ep_w1_k0.512_s0
    python -m supermask.train --dataset fashion-mnist --k 0.512 --seed 1 --out runs/fm_ep_w1_k0.512_s1
    # compare's IMP run of width 1, seed 0, under its derived name (the committed report shows the name
    # of the time, runs/imp_fc_w1_fashion-mnist_s0_2093e7f888): found by its config.json
    IMP=$(python - <<'PY'
import json, pathlib
for run in sorted(pathlib.Path("runs").glob("imp_fc_w1_fashion-mnist_s0_*")):
    c = json.loads((run / "config.json").read_text())
    if (c.get("epochs"), c.get("control"), c.get("prune_rate", 0.2)) == (10, None, 0.2):
        print(run)
        break
PY
)
    [ -n "$IMP" ] || { echo "run 'bash docs/fashion_mnist_report.sh compare' first" >&2; exit 2; }
    python -m supermask.analyze runs/fm_ep_w1_k0.512_s0 runs/fm_ep_w1_k0.512_s1 "$IMP" --out docs/analysis ;;
export)  # The compact file of the export page's edge-popup run (15 epochs).
    python -m supermask.train --width 2.5 --k 0.5 --dataset fashion-mnist --out runs/fm_ep_w2.5
    python -m supermask.export runs/fm_ep_w2.5 --compact --out docs/export/fm_ep_w2.5_k0.5.smask --force \
        --evaluate ;;
pai)  # Both seeds' tables from the runs of docs/fashion_mnist_studies.sh 0 and 1.
    COMMON=(--model fc --dataset fashion-mnist --epochs 5 --seeds 0,1 --widths 1 --threads 1)
    python -m supermask.compare "${COMMON[@]}" --ks 0.1,0.02 --imp-widths 1 --rounds 17 --prune-rate 0.2065 \
        --controls reinit,random-mask --pai snip,grasp,synflow,random,magnitude --out docs/pai
    python -m supermask.compare "${COMMON[@]}" --ks 0.02 --imp-widths '' --controls '' \
        --pai snip,grasp,synflow --pai-checks shuffle,reinit --out docs/pai_checks ;;
*)
    echo "usage: bash docs/fashion_mnist_report.sh compare|compare100|analysis|export|pai" >&2; exit 2 ;;
esac
