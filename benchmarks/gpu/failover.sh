#!/bin/bash
# Runs on the lent GPU machine (see README.md here): the three daemons under supervisord from
# etc/disagg-gpu.yaml (ONE_GPU=1: both workers on cuda:0, each sized by kv_cache_memory_bytes), then
# benchmarks/gpu_failover.py: served/s with every engine up, kill -9 of the decode engine and of its
# keeper under four clients (refused / failed / lost, failover, the way back to the KV path), and a
# greedy stream migrated mid-way. Results: docs/performance.md.
set -u
. "$(dirname "$0")/env.sh"
. "$(dirname "$0")/stack.sh"
nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv
if [ $rc -eq 0 ]; then
  timeout ${BENCH_TIMEOUT:-420} $PY -m benchmarks.gpu_failover --config $CFG --tokens ${TOKENS:-3000} \
    --budget-s ${BENCH_TIMEOUT:-420} ${BENCH_ARGS:-}
fi
grep -h -E "must restart|back after a restart|failover to|continued elsewhere|killing .* left by|held by" \
  $LOG/decode-worker.out | cut -c1-220 | sort | uniq -c | sort -rn | head -12
curl -s 127.0.0.1:9102/metrics | grep -E "^disagg_(request_paths_total|decode_engine_reloads_total|request_migrations_total|request_errors_total)" | grep -v " 0.0$"
$PY -m daemons.ops.ctl --config $CFG down
cd $LOG && tar -czf $OUT/logs.tgz . 2>/dev/null; ls -la $OUT
