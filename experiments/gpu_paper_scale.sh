#!/usr/bin/env bash
# Paper-scale runs of issue 15 on ONE GPU, in slices that stop with checkpoints and resume later.
#
#   bash experiments/gpu_paper_scale.sh [STAGE ...]      # default: main seeds tune scale models
#
# Stages (each a crossgrad sweep; finished runs are skipped, interrupted ones resume from checkpoint.pt):
#   main    CIFAR-10, cnn5, 5-agent ring, 100 epochs, seed 0: the seven methods at the reference's
#           settings (gpu/cifar_ring5.toml) AND, at the same time, the methods at their tuned gamma
#           (gpu/cifar_ring5_tuned.toml: NGC alpha=0, DSGDm-N, QGM at gamma 1, CGA at 0.5, their
#           Fashion-MNIST picks), all concurrently on the GPU
#   seeds   seeds 1 and 2 of both
#   tune    gamma x lr for the seven methods on CIFAR-10, 10 epochs, seed 0 (gpu/cifar_tune.toml)
#   scale   10 and 16 agents on a ring and a torus, 100 epochs, seed 0 (gpu/cifar_scale.toml)
#   models  resnet20 and vgg11 on the 5-agent ring, 100 epochs, seed 0 (gpu/cifar_models.toml)
#
# Environment:
#   SLICE=S      stop after S seconds of this call (SIGINT: every running run writes its checkpoint
#                and exits; no new stage starts); 0 = no limit (default)
#   JOBS=K       concurrent runs of the reference sweep (default 7; the tuned sweep gets TJOBS, default 4)
#   DEVICE=cuda  training.device (cpu for a smoke test)
#   RUNS=DIR     where the run directories go (default experiments/runs)
#   COPY_TO=DIR  after the slice, copy the gpu_* run directories there (e.g. $OUT on a lent machine,
#                checkpoints included, so that the next slice can carry them back)
#   GRACE=S      after the slice's SIGINT, wait S seconds (default 120) for checkpoints, then kill; a
#                killed run loses at most the epoch since its last checkpoint (checkpoint_every = 1)
#   SMOKE=1      a logic check on a CPU: 40 steps per run, evaluation on 256 test images, cpu
#
# The exit status is 0 when every requested stage finished, 130 when the slice ended first
# (run the same command again to continue), 1 when a run failed or diverged (the others go on).
set -uo pipefail
cd "$(dirname "$0")/.."
CG=${CROSSGRAD:-.venv/bin/crossgrad}
SLICE=${SLICE:-0}
JOBS=${JOBS:-7}
TJOBS=${TJOBS:-4}
GRACE=${GRACE:-120}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-experiments/runs}
START=$(date +%s)
common=(--set "training.device=\"$DEVICE\"")
if [[ "${SMOKE:-0}" == 1 ]]; then
    DEVICE=cpu
    common=(--set 'training.device="cpu"' --set training.steps=40 --set training.eval_every_steps=20
            --set training.eval_subset=256 --set training.eval_at_start=false)
fi
[[ $# -gt 0 ]] && stages=("$@") || stages=(main seeds tune scale models)

left() {  # seconds left in this slice (a large number when there is no slice)
    if [[ "$SLICE" == 0 ]]; then echo 999999; else echo $((START + SLICE - $(date +%s))); fi
}

# one sweep, stopped with SIGINT when the slice ends (and killed GRACE s later if it is still there)
sweep() {  # sweep FILE OUTNAME JOBS [more crossgrad sweep args]
    local file=$1 out=$2 jobs=$3
    shift 3
    local t
    t=$(left)
    if ((t < 30)); then return 130; fi
    timeout -s INT -k "$GRACE" "$t" "$CG" sweep "$file" "${common[@]}" --set "output.out_dir=\"$RUNS/$out\"" \
        --jobs "$jobs" --quiet "$@"
    local rc=$?
    # timeout's own 124 means the slice ended (the sweep itself then exits 130)
    if ((rc == 124)); then rc=130; fi
    return $rc
}

# two sweeps at the same time (the reference methods and the tuned-gamma ones share the GPU)
both() {  # both SEEDS
    sweep experiments/gpu/cifar_ring5.toml gpu_cifar_ring5 "$JOBS" --seeds "$1" &
    local a=$!
    sweep experiments/gpu/cifar_ring5_tuned.toml gpu_cifar_ring5_tuned "$TJOBS" --seeds "$1" &
    local b=$!
    wait $a; local ra=$?
    wait $b; local rb=$?
    if ((ra == 130 || rb == 130)); then return 130; fi
    if ((ra != 0 || rb != 0)); then return 1; fi
    return 0
}

status=0
for stage in "${stages[@]}"; do
    echo "== stage $stage ($(left) s left in this slice)"
    case $stage in
        main)   both 0 ;;
        seeds)  both 1,2 ;;
        tune)   sweep experiments/gpu/cifar_tune.toml gpu_cifar_tune "$((JOBS + TJOBS))" ;;
        scale)  sweep experiments/gpu/cifar_scale.toml gpu_cifar_scale "$((JOBS + TJOBS))" --seeds 0 ;;
        models) sweep experiments/gpu/cifar_models.toml gpu_cifar_models "$((JOBS + TJOBS))" --seeds 0 ;;
        *) echo "unknown stage $stage (main seeds tune scale models)" >&2; exit 2 ;;
    esac
    rc=$?
    if ((rc == 130)); then status=130; echo "== slice over during stage $stage: run the same command again to continue"; break; fi
    if ((rc != 0)); then status=1; fi
done

if [[ -n "${COPY_TO:-}" ]]; then
    mkdir -p "$COPY_TO"
    for d in "$RUNS"/gpu_*; do
        [[ -d "$d" ]] && cp -r "$d" "$COPY_TO/"
    done
    # lock files and sweep config copies are of no use elsewhere, nor the checkpoints of finished runs
    # (3.5-5 MB each for cnn5): only unfinished runs keep theirs, to be carried to the next slice
    find "$COPY_TO" \( -name '*.lock' -o -name 'sweep-config-*.toml' \) -delete 2>/dev/null
    for c in "$COPY_TO"/gpu_*/*/checkpoint.pt; do
        [[ -f "$c" && -f "$(dirname "$c")/summary.json" ]] && rm -f "$c"
    done
    echo "copied $(ls "$COPY_TO" | tr '\n' ' ')to $COPY_TO"
fi
exit $status
