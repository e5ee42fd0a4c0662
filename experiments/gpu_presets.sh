#!/usr/bin/env bash
# The presets' full budgets (crossgrad presets) on ONE GPU, in slices that stop with checkpoints and resume later.
#
#   bash experiments/gpu_presets.sh [GROUP|PRESET ...]        # default: gut relaysgd mt ars
#   SEEDS="1 2 3" bash experiments/gpu_presets.sh relaysgd-cifar10-vgg11-ring16-a0.1-dsgd mt
#
# Groups (the presets whose names start with them; `crossgrad presets` lists every one), or any preset's name:
#   gut       GUT: CIFAR-10, ResNet-20, 16-agent ring, Dirichlet 0.1, 200 epochs: DSGD, GUT, QG-DSGDm, QG-GUTm
#   relaysgd  RelaySGD table 2: CIFAR-10, VGG-11, 16 workers, Dirichlet 1/0.1/0.01, 200 epochs
#   mt        Momentum Tracking: CIFAR-10, LeNet, 8-agent ring, 4 classes per agent, 500 epochs
#   ars       ARS: CIFAR-10, VGG-11 and ResNet-20, 16-agent ring, Dirichlet 0.01, 300 epochs
#
# Each preset runs into RUNS/NAME (with SEEDS: one run per seed, RUNS/NAME-sSEED). A finished run
# (summary.json) is skipped, an unfinished one with a checkpoint is resumed (`crossgrad run --resume`),
# any other starts. JOBS runs share the GPU at a time.
#
# Environment:
#   SEEDS="S ..."  training.seed of each run (RelaySGD's table 2 is the mean over seeds 1 2 3); unset: the
#                preset's own seed, one run each
#   SLICE=S      stop after S seconds of this call (SIGINT: every running run writes its checkpoint and
#                exits; no new run starts); 0 = no limit (default)
#   JOBS=K       concurrent runs (default 8)
#   DEVICE=cuda  training.device (cpu for a smoke test)
#   DATA=DIR     data.data_dir, the folder holding CIFAR-10 (default ../shared/data)
#   RUNS=DIR     where the run directories go (default experiments/runs/gpu_presets)
#   COPY_TO=DIR  after the slice, copy RUNS there (checkpoints of unfinished runs only), e.g. $OUT on a lent machine
#   GRACE=S      after the slice's SIGINT, wait S seconds (default 120) for checkpoints, then kill
#   SMOKE=1      a logic check on a CPU: 40 steps per run, evaluation on 256 test images, cpu
#   CROSSGRAD=P  the crossgrad command (default .venv/bin/crossgrad)
#
# The exit status is 0 when every requested run finished, 130 when the slice ended first (run the same
# command again to continue), 1 when a run failed or diverged (the others go on), 2 for a bad argument.
set -uo pipefail
cd "$(dirname "$0")/.."
CG=${CROSSGRAD:-.venv/bin/crossgrad}
SLICE=${SLICE:-0}
JOBS=${JOBS:-8}
GRACE=${GRACE:-120}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-experiments/runs/gpu_presets}
START=$(date +%s)
common=(--set "training.device=\"$DEVICE\"" --set "data.data_dir=\"$DATA\"")
if [[ "${SMOKE:-0}" == 1 ]]; then
    common=(--set 'training.device="cpu"' --set "data.data_dir=\"$DATA\"" --set training.steps=40
            --set training.eval_every_steps=20 --set training.eval_subset=256 --set training.eval_at_start=false
            --set training.warmup_steps=0)
fi
[[ $# -gt 0 ]] && groups=("$@") || groups=(gut relaysgd mt ars)

left() {  # seconds left in this slice (a large number when there is no slice)
    if [[ "$SLICE" == 0 ]]; then echo 999999; else echo $((START + SLICE - $(date +%s))); fi
}

one() {  # one run (preset, run name, seed or ""): skip, resume or start it, stopped with SIGINT when the slice ends
    local name=$1 run=$2 seed=$3 dir=$RUNS/$2 t
    local own=(--name "$run")
    [[ -n "$seed" ]] && own+=(--set "training.seed=$seed")
    [[ -f "$dir/summary.json" ]] && return 0
    t=$(left)
    if ((t < 30)); then return 130; fi
    if [[ -f "$dir/checkpoint.pt" ]]; then
        timeout -s INT -k "$GRACE" "$t" "$CG" run --resume "$dir" --quiet
    else  # --overwrite: a run that died before its first checkpoint starts over
        timeout -s INT -k "$GRACE" "$t" "$CG" run --preset "$name" "${common[@]}" "${own[@]}" --out-dir "$RUNS" \
            --overwrite --quiet
    fi
    local rc=$?
    if ((rc == 124)); then rc=130; fi  # timeout's own code: the slice ended
    return $rc
}

all=$("$CG" presets | grep -E '^[a-z0-9]' || true)  # the name lines (descriptions are indented)
names=()
for g in "${groups[@]}"; do
    case $g in
        gut|relaysgd|mt|ars) while read -r n; do names+=("$n"); done < <(grep "^$g-" <<<"$all") ;;
        *) if grep -qxF -- "$g" <<<"$all"; then names+=("$g")
           else echo "unknown group or preset $g (groups: gut relaysgd mt ars; presets: $CG presets)" >&2; exit 2; fi ;;
    esac
done
if ((${#names[@]} == 0)); then echo "no presets found ($CG presets lists none of: ${groups[*]})" >&2; exit 2; fi
read -ra seeds <<<"${SEEDS:-}"
for s in "${seeds[@]}"; do
    [[ "$s" =~ ^[0-9]+$ ]] || { echo "SEEDS must be non-negative integers, not '$s'" >&2; exit 2; }
done
runs=()  # "preset run-name seed" triples, seed-major: every preset's first seed before any second one
if ((${#seeds[@]} == 0)); then
    for n in "${names[@]}"; do runs+=("$n $n -"); done
else
    for s in "${seeds[@]}"; do for n in "${names[@]}"; do runs+=("$n $n-s$s $s"); done; done
fi
mkdir -p "$RUNS/logs"
status=0
pids=()
for r in "${runs[@]}"; do
    read -r n run seed <<<"$r"
    [[ "$seed" == - ]] && seed=
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
    if (( $(left) < 30 )); then status=130; break; fi
    echo "== $run ($(left) s left in this slice)"
    one "$n" "$run" "$seed" >"$RUNS/logs/$run.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do
    wait "$p"; rc=$?
    if ((rc == 130)); then status=130; elif ((rc != 0 && status != 130)); then status=1; fi
done
if ((status == 130)); then echo "== slice over: run the same command again to continue"; fi

if [[ -n "${COPY_TO:-}" ]]; then
    mkdir -p "$COPY_TO"
    cp -r "$RUNS" "$COPY_TO/"
    out=$COPY_TO/$(basename "$RUNS")
    find "$out" -name '*.lock' -delete 2>/dev/null
    for c in "$out"/*/checkpoint.pt; do  # finished runs need no checkpoint to continue from
        [[ -f "$c" && -f "$(dirname "$c")/summary.json" ]] && rm -f "$c"
    done
    echo "copied $RUNS to $out"
fi
exit $status
