#!/usr/bin/env bash
# The presets at a CPU budget: the "crossgrad, CPU budget" cells of experiments/presets.md.
#
#   bash experiments/presets_cpu.sh          # then: python experiments/presets_cpu_table.py
#
# One run at a time, one thread each (a 2-core machine shared with other work), into RUNS/NAME; a run
# with a summary.json is skipped. Each preset runs as published except for what the --set lines below
# shrink: the run length, the test subset, no step-0 evaluation and no checkpoints before the end, and
# RelaySGD's warm-up (490 of 19,600 steps, 2.5 %), which is cut to 1 step (a warm-up longer than the run is
# refused). The milestones of the multistep schedules are fractions of the run and shrink by
# themselves. These numbers say whether a preset trains, not what it reaches in the published budget.
#
# Environment: CROSSGRAD (default .venv/bin/crossgrad), DATA (default ../shared/data), RUNS (default
# experiments/runs/presets_cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
CG=${CROSSGRAD:-.venv/bin/crossgrad}
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-experiments/runs/presets_cpu}
common=(--set training.threads=1 --set "data.data_dir=\"$DATA\"" --set training.eval_subset=2000
        --set training.eval_at_start=false --set training.checkpoint_every=0)

run() {  # run NAME [--set ...]: one preset at its CPU budget
    local name=$1
    shift
    if [[ -f "$RUNS/$name/summary.json" ]]; then echo "== $name: done"; return 0; fi
    echo "== $name ($(date -u +%H:%M:%S))"
    "$CG" run --preset "$name" "${common[@]}" "$@" --out-dir "$RUNS" --overwrite --quiet
}

# Momentum Tracking: LeNet on an 8-agent ring (67 steps an epoch): 8 of the 500 epochs
for m in momentum-tracking dsgdm qg-dsgdm decentlam; do
    run "mt-cifar10-lenet-ring8-classes4-$m" --set training.epochs=8
done
# The ResNet-20 and VGG-11 presets on 16 agents: 7-8 s a ResNet-20 step on the shared CPU, and an evaluation
# of 16 models on 2,000 test images took over 7 minutes there, so these evaluate on 256 (drawn with the
# preset's seed: the same 256 within each paper's presets) and run 20 steps (RelaySGD's VGG-11: 10)
small=(--set training.eval_subset=256)
# GUT, ResNet-20, 16-agent ring (98 steps an epoch), then its 51 gossip rounds: 20 of the 19,600 steps
for m in dsgd gut qg-dsgdm qg-gutm; do
    run "gut-cifar10-resnet20-ring16-$m" "${small[@]}" --set training.steps=20
done
# ARS, ResNet-20: the constant averaging rate against the schedule, 20 steps; they lie in the first epoch,
# where ARS's rate is min(1, 0.09 x 1.01) = 0.0909 against the baseline's 1
for m in const ars; do
    run "ars-cifar10-resnet20-ring16-a0.01-$m" "${small[@]}" --set training.steps=20
done
# RelaySGD's table 2 at alpha = 0.1: RelaySGD on binary trees against D-PSGD on the ring, 10 steps
run relaysgd-cifar10-vgg11-trees16-a0.1-relaysgd "${small[@]}" --set training.steps=10 --set training.warmup_steps=1
run relaysgd-cifar10-vgg11-ring16-a0.1-dsgd "${small[@]}" --set training.steps=10 --set training.warmup_steps=1
