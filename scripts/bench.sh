#!/usr/bin/env bash
# `make bench`: the CPU benchmarks, in one run on this machine, results and plots in
# $BENCH_OUT (var/bench): the front door's own cost against vLLM's toy PD proxy
# (benchmarks/frontdoor_overhead.py), decode TTFT with KV from LMCache vs recompute per
# prompt length (benchmarks/kv_reuse.py; starts the stack unless it is up) and its plot.
# QUICK=1: a short smoke run of the same (CI runs it untimed). The GPU parts are recipes
# for the GPU machine: benchmarks/gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${BENCH_OUT:-var/bench}
CONFIG=${BENCH_CONFIG:-etc/disagg.yaml}
mkdir -p "$OUT"
if [ "${QUICK:-0}" = 1 ]; then
    FD_ARGS="--clients 4 --duration 2"; LENGTHS=600,1200; REPEAT=1
else
    FD_ARGS="--clients 16 --duration 15"; LENGTHS=300,600,1000,2000,4000; REPEAT=3
fi
echo "== front door vs vLLM's toy PD proxy (fake engine)"
$PY benchmarks/frontdoor_overhead.py $FD_ARGS | tee "$OUT/frontdoor_overhead.txt"
echo "== KV reuse: decode TTFT with KV from LMCache vs recompute"
$PY benchmarks/kv_reuse.py --config "$CONFIG" --lengths $LENGTHS --repeat $REPEAT | tee "$OUT/kv_reuse-cpu.txt"
$PY benchmarks/plot_ttft.py --png "$OUT/ttft-cpu.png" "CPU ($(nproc) cores)=$OUT/kv_reuse-cpu.txt"
echo "results in $OUT"
