#!/usr/bin/env bash
# `make bench`: the CPU benchmarks, in one run on this machine, results and plots in
# $BENCH_OUT (var/bench): the front door's own cost against vLLM's toy PD proxy
# (benchmarks/frontdoor_overhead.py), decode TTFT with KV from LMCache vs recompute per
# prompt length (benchmarks/kv_reuse.py) and its plot, and the stack's SLO attainment under
# Poisson arrivals (benchmarks/goodput.py) and its plot. It starts the stack unless it is up
# (and stops what it started).
# QUICK=1: a short smoke run of the same (CI runs it untimed). The GPU parts are recipes
# for the GPU machine: benchmarks/gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${BENCH_OUT:-var/bench}
CONFIG=${BENCH_CONFIG:-etc/disagg.yaml}
mkdir -p "$OUT"
if [ "${QUICK:-0}" = 1 ]; then
    FD_ARGS="--clients 4 --duration 2 --solo-duration 1"; LENGTHS=600,1200; REPEAT=1
    GP_ARGS="--in 300 --out 8 --rates 0.5,1 --duration 4 --warmup 1"
else
    FD_ARGS="--clients 16 --duration 10 --repeat 3"; LENGTHS=300,600,1000,2000,4000; REPEAT=3
    GP_ARGS="--in 1000 --out 32 --rates 0.25,0.5,1,2 --duration 30"
fi
if ! $PY -m daemons.ops.ctl --config "$CONFIG" wait-ready --timeout 1 >/dev/null 2>&1; then
    echo "== starting the stack ($CONFIG)"
    $PY -m daemons.ops.ctl --config "$CONFIG" up
    trap '$PY -m daemons.ops.ctl --config "$CONFIG" down' EXIT
    $PY -m daemons.ops.ctl --config "$CONFIG" wait-ready --fail-fast --timeout 900
fi
echo "== front door vs vLLM's toy PD proxy (fake engine)"
$PY -m benchmarks.frontdoor_overhead $FD_ARGS | tee "$OUT/frontdoor_overhead.txt"
echo "== KV reuse: decode TTFT with KV from LMCache vs recompute"
$PY -m benchmarks.kv_reuse --config "$CONFIG" --lengths $LENGTHS --repeat $REPEAT | tee "$OUT/kv_reuse-cpu.txt"
$PY -m benchmarks.plot_ttft --png "$OUT/ttft-cpu.png" "CPU ($(nproc) cores)=$OUT/kv_reuse-cpu.txt"
echo "== goodput of the stack's front door (Poisson arrivals; CPU: ours only, no colocated baseline)"
read -r PORT MODEL < <($PY -c "from daemons.config import load_config, config_path
c = load_config(config_path('$CONFIG')); print(c.decode_worker.port, c.model.name)")
rm -f "$OUT/goodput-cpu.jsonl"
$PY -m benchmarks.goodput --url "http://127.0.0.1:$PORT" --model "$MODEL" --label "ours (CPU)" --ttft-s 10 --itl-s 1 \
    --vocab 900 $GP_ARGS --json "$OUT/goodput-cpu.jsonl" | grep -v '^{'
$PY -m benchmarks.goodput --plot "$OUT/goodput-cpu.jsonl" --png "$OUT/goodput-cpu.png" --slo 10:p90:1
echo "results in $OUT"
