#!/bin/bash
# The network model at scale (issue 28): dsgd with a 43-parameter model on exponential graphs of 256, 1,024 and
# 4,096 agents, network off against drops (0.1) + churn (rate 0.01, mean absence 20), one thread. One process
# per size under /usr/bin/time -v, so each size's peak resident memory is its own.
#
#     benchmarks/network_scale.sh [steps per round, default 10] [sizes, default "256 1024 4096"]
#
# Prints per size network_cost.py's table (ms per step off and with churn, the network model's own ms per
# step and per edge) and the process's peak RSS and CPU time from /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-10}
sizes=${2:-256 1024 4096}
py=${PYTHON:-.venv/bin/python}
for n in $sizes; do
  log=$(mktemp)
  PYTHONPATH=src /usr/bin/time -v "$py" benchmarks/network_cost.py --agents "$n" --topology exponential \
    --variants off,churn --steps "$steps" --repeats 3 --warmup 1 2> "$log"
  grep -E "Maximum resident set size|User time|Elapsed" "$log"
  rm -f "$log"
done
