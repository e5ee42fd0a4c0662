#!/usr/bin/env bash
# Every run of experiments/REPORT.md, in the order we ran them: a first seed of each table
# before more seeds, so a stopped queue still leaves complete single-seed tables. Finished runs
# are skipped, so this can be stopped and started again at any time. Then the tables and figures:
#   bash experiments/run_all.sh && .venv/bin/python experiments/make_report.py
# Two single-threaded jobs at a time (the fastest use of a 2-core CPU for these small models).
set -euo pipefail
cd "$(dirname "$0")/.."
sweep() { .venv/bin/crossgrad sweep "$@" --jobs "${JOBS:-2}" --quiet; }
sweep experiments/fmnist_lr.toml                   # lr tuning, setting 1 (seed 0, 2 epochs)
sweep experiments/fmnist_alpha.toml --seeds 0      # setting 4: alpha sweep
sweep experiments/fmnist_ring5.toml --seeds 0      # setting 1: the comparison
sweep experiments/fmnist_iid.toml --seeds 0        # setting 1's IID control
sweep experiments/fmnist_ring5.toml --seeds 1,2
sweep experiments/fmnist_scale.toml --seeds 0      # setting 3: 10 agents, ring and torus
sweep experiments/cifar_ring5.toml --seeds 0       # setting 2: CIFAR-10 (JPEG copy)
sweep experiments/cifar_lowlr.toml                  # setting 2: NGC alpha=0 and DSGDm-N at smaller lrs
sweep experiments/fmnist_iid.toml --seeds 1,2
sweep experiments/fmnist_alpha.toml --seeds 1,2
sweep experiments/fmnist_scale.toml --seeds 1,2
sweep experiments/cifar_ring5.toml --seeds 1,2
