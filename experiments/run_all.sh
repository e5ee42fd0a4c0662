#!/usr/bin/env bash
# Every CPU run of experiments/REPORT.md, in the order we ran them: a first seed of each table
# before more seeds, so a stopped queue still leaves complete single-seed tables. Finished runs
# are skipped, so this can be stopped and started again at any time. Then the tables and figures:
#   bash experiments/run_all.sh && .venv/bin/python experiments/make_report.py
# Round 1 ran two single-threaded jobs at a time (JOBS=2, the fastest use of a free 2-core CPU for
# these small models); round 2 (issue 15) ran one at a time (JOBS=1) on a CPU shared with others.
# The GPU runs (CIFAR-10 at paper scale) are experiments/gpu_paper_scale.sh, not this script.
set -euo pipefail
cd "$(dirname "$0")/.."
# a sweep with a diverged run exits 1: divergence is one of the results (the tables show it), so go on
sweep() { .venv/bin/crossgrad sweep "$@" --jobs "${JOBS:-2}" --quiet || [ $? -eq 1 ]; }
# --- round 1 -------------------------------------------------------------------------------
sweep experiments/fmnist_lr.toml                   # lr tuning at gamma 0.1, setting 1 (seed 0, 2 epochs)
sweep experiments/fmnist_alpha.toml --seeds 0      # setting 4: alpha sweep (gamma 0.1, lr 0.01)
sweep experiments/fmnist_ring5.toml --seeds 0      # setting 1: the comparison at gamma 0.1
sweep experiments/fmnist_iid.toml --seeds 0        # setting 1's IID control
sweep experiments/fmnist_ring5.toml --seeds 1,2
sweep experiments/fmnist_scale.toml --seeds 0      # setting 3: 10 agents, ring and torus
sweep experiments/cifar_ring5.toml --seeds 0       # setting 2: CIFAR-10 (JPEG copy)
sweep experiments/cifar_lowlr.toml                  # setting 2: NGC alpha=0 and DSGDm-N at smaller lrs
sweep experiments/fmnist_iid.toml --seeds 1,2
# --- round 2 (issue 15): gamma tuned jointly with lr --------------------------------------
sweep experiments/fmnist_gamma.toml                # gamma {1, 0.5} x lr: DSGDm-N, QGM, NGC alpha=0
sweep experiments/fmnist_gamma_wide.toml           # gamma {1, 0.5} x lr: NGC, CompNGC, CGA, CompCGA
sweep experiments/fmnist_lr_wide.toml              # gamma 0.1, lr 0.08: the same four
sweep experiments/fmnist_gamma_edge.toml           # gamma {1, 0.5}, lr 0.08: QGM, NGC alpha=0 (edge picks)
(cd experiments && ../.venv/bin/python make_tuned_config.py >/dev/null)   # writes fmnist_tuned.toml
sweep experiments/fmnist_tuned.toml --seeds 0      # setting 1 at each method's tuned (gamma, lr)
sweep experiments/defaults_check.toml              # the defaults on MNIST, torus-16 and exponential-8
sweep experiments/defaults_readme.toml             # the README's Fashion-MNIST CompNGC example
sweep experiments/fmnist_alpha_gamma.toml          # alpha sweep with gamma tuned per alpha (2 epochs)
# --- issue 19: gt, d2, choco, sgp on setting 1 ------------------------------------------
sweep experiments/fmnist_new_lr.toml               # gamma x lr, gt and choco (seed 0, 2 epochs)
sweep experiments/fmnist_d2_lr.toml                # gamma x lr, d2
sweep experiments/fmnist_new_tuned.toml            # the picks (and sgp), 10 epochs, 3 seeds
# --- round 3 (issue 15, a later session) ------------------------------------------------
sweep experiments/fmnist_tuned.toml --seeds 1,2
sweep experiments/fmnist_alpha1_gamma.toml         # the alpha = 1 row of the alpha x gamma table at lr 0.01
sweep experiments/cifar_gamma.toml                 # setting 2 at gamma 1: DSGDm-N, QGM, NGC alpha=0
sweep experiments/fmnist_alpha.toml --seeds 1,2
# --- round 4 (issue 15, a later session) ------------------------------------------------
sweep experiments/fmnist_scale.toml --seeds 1,2
sweep experiments/fmnist_scale_gamma.toml          # setting 3 at gamma = 1: DSGDm-N, QGM, NGC alpha=0
sweep experiments/fmnist_scale_gamma_qgm.toml      # ... and QGM at lr 0.04, 0.02 (it diverged at its 5-agent lr 0.08)
sweep experiments/cifar_gamma.toml                 # NGC alpha=1, CGA at gamma 1 (round 4); CompNGC, CompCGA not run yet
# --- issue 26: the methods since NGC, 16-agent ring (RelaySGD: chain), Dirichlet 0.1, 1 epoch ----
sweep experiments/fmnist16_lr.toml                # lr tuning, seed 0: NGC, CompNGC, DSGDm-N, GUT, QG-GUTm first
sweep experiments/fmnist16_lr_edge.toml           # lr 0.3 where lr 0.1 won
sweep experiments/fmnist16_lr_edge2.toml          # lr 1 for GUT, still at the edge after lr 0.3
sweep experiments/fmnist16_relay_lr.toml          # RelaySGD's lr tuning on the chain
sweep experiments/fmnist16_ars_lr.toml            # ARS on NGC and DSGDm-N (gamma 0.09 exponential)
sweep experiments/fmnist16_tuned.toml             # seeds 1, 2 at the picks (seed 0 is the tuning run)
sweep experiments/fmnist16_ars_tuned.toml         # ... the ARS rows'
sweep experiments/fmnist16_relay_tuned.toml       # ... RelaySGD's
# --- issue 28: unreliable and slow networks (one run at a time) --------------------------
JOBS=1 sweep experiments/net_lr.toml               # GTm-N and Choco's lr at drop 0 (seed 0)
JOBS=1 sweep experiments/net_nodrop.toml           # GTm-N, Choco, QG-GUTm at drop 0, 1000 and 10 Mbit/s
JOBS=1 sweep experiments/net_drop.toml             # NGC, CompNGC, DSGDm-N x drop {0, 0.1, 0.3} x both bandwidths
JOBS=1 sweep experiments/net_drop_seed1.toml       # ... their seed 1 at 10 Mbit/s (bandwidth changes only the times)
# --- not run yet (CPU time) ----------------------------------------------------------------
sweep experiments/cifar_ring5.toml --seeds 1,2
