#!/usr/bin/env bash
# The GPU checks of issue #14, prepared to run unattended on a CUDA machine in under 8 minutes
# (the time limits below add up to 8):
#   1. the CUDA tests (pytest -m cuda): every algorithm on the GPU equals the CPU;
#   2. `crossgrad bench --device cuda`: the engine against the one-big-batch ideal, with peak GPU memory,
#      on the 1.1M-parameter GroupNorm cnn5 at 3x32x32, 16 agents on a ring, batch 32;
#   3. `crossgrad bench --runner --device cuda`: `crossgrad run` steps/s against the engine alone;
#   4. a short `crossgrad run` of every algorithm on the GPU.
# Usage: benchmarks/gpu_check.sh [output folder]   (default: $OUT, else ./gpu_check_out)
# CIFAR-10 is used for step 3 when DATA_DIR (default ../shared/data) holds it, else digits.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUTDIR=${1:-${OUT:-gpu_check_out}}
DATA_DIR=${DATA_DIR:-../shared/data}
mkdir -p "$OUTDIR"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$OUTDIR/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start))s" | tee -a "$OUTDIR/summary.txt"
    tail -n 25 "$OUTDIR/$name.log"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUTDIR/gpu.txt" 2>&1
cat "$OUTDIR/gpu.txt"

step cuda_tests 90 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests

step bench 110 "$PY" -m crossgrad bench --device cuda --models cnn5-1m:3x32x32 --agents 16 --batch 32 \
    --steps 5 --repeats 3 --algorithms "dsgd,ngc(a=1),ngc(a=0),compngc,cga" --scaling ""

runner_data=()
if [ -d "$DATA_DIR/cifar10-jpeg" ] || [ -d "$DATA_DIR/cifar-10-batches-py" ]; then
    runner_data=(--set 'data.name="cifar10"' --set "data.data_dir=\"$DATA_DIR\"")
fi
step runner 80 "$PY" -m crossgrad bench --runner --device cuda --runner-steps 30 --repeats 2 "${runner_data[@]}"

runs="$OUTDIR/runs"
for algo in dsgd ngc compngc cga compcga gt d2 choco sgp; do
    step "run_$algo" 20 "$PY" -m crossgrad run --quiet --out-dir "$runs" --name "$algo" \
        --set "algorithm.name=\"$algo\"" --set 'training.device="cuda"' --set training.steps=30 \
        --set training.eval_every_steps=15 --set 'model.name="cnn5"' --set 'model.norm="group"'
done
step run_qgm 20 "$PY" -m crossgrad run --quiet --out-dir "$runs" --name qgm --set 'algorithm.name="dsgd"' \
    --set algorithm.qgm=true --set 'training.device="cuda"' --set training.steps=30

echo "== overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$OUTDIR/summary.txt"
exit $status
