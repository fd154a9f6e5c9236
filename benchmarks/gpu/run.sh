#!/bin/bash
# Runs on the lent two-GPU machine (see benchmarks/gpu/README.md): the three
# daemons from etc/disagg-gpu.yaml (prefill on GPU 0, decode on GPU 1), then the
# measurements, then a plain colocated engine on GPU 0 as the baseline.
set -u
. "$(dirname "$0")/env.sh"
t0=$(date +%s)
for d in lmcache_server prefill_worker decode_worker; do
  setsid python3 -m daemons.$d --config $CFG > $LOG/$d.out 2>&1 &
done
python3 -m daemons.ops.ctl --config $CFG wait-ready --fail-fast --timeout ${READY_TIMEOUT:-420}; rc=$?
echo "== start to all ready: $(( $(date +%s) - t0 ))s (rc $rc)"
python3 -m daemons.ops.ctl --config $CFG status
if [ $rc -eq 0 ]; then
  python3 - <<PY
from daemons.ops.ctl import ask, SEED_PROMPT
r = ask("http://127.0.0.1:8000", "mistralai/Mistral-7B-Instruct-v0.2", SEED_PROMPT, 10)
print("== seed prompt through the front door:", {k: r[k] for k in ("prompt_tokens", "cached_tokens", "ttft_s", "e2e_s", "path")})
PY
  echo "== KV reuse (decode engine TTFT, KV from LMCache vs recompute)"
  timeout 240 python3 -m benchmarks.kv_reuse --config $CFG --lengths 1000,4000,7500 --repeat 2
  echo "== interference, disaggregated"
  timeout 180 python3 -m benchmarks.gpu_interference disagg --config $CFG
  curl -s 127.0.0.1:9102/metrics | grep -E "^disagg_(prompt_tokens_total|fallbacks_total|time_to_first_token_seconds_(sum|count))" | grep -v " 0.0$"
  curl -s 127.0.0.1:9100/metrics | grep -E "^lmcache_mp_(lookup_hit_tokens_total|lookup_requested_tokens_total|l1_memory_usage_bytes)"
fi
pkill -TERM -f "daemons\.(lmcache_server|prefill_worker|decode_worker)"
for i in $(seq 1 60); do pgrep -f "daemons\.(lmcache|prefill|decode)" >/dev/null || break; sleep 1; done
python3 -m daemons.ops.ctl --config $CFG status
[ $rc -eq 0 ] || { cd $LOG && tar -czf $OUT/logs.tgz .; exit 1; }
echo "== colocated baseline: one plain engine on GPU 0"
CUDA_VISIBLE_DEVICES=0 setsid python3 -m vllm.entrypoints.openai.api_server --model /tmp/model \
  --served-model-name m --load-format dummy --dtype bfloat16 --max-model-len 8000 --enforce-eager \
  --gpu-memory-utilization 0.8 --attention-backend TRITON_ATTN --port 8201 > $LOG/plain-engine.log 2>&1 &
for i in $(seq 1 240); do curl -sf 127.0.0.1:8201/health >/dev/null && break; sleep 1; done
timeout 180 python3 -m benchmarks.gpu_interference colocated --url http://127.0.0.1:8201 --model m
pkill -TERM -f "api_server.*8201"
python3 -m benchmarks.gpu_interference copy-rate
cd $LOG && tar -czf $OUT/logs.tgz . 2>/dev/null; ls -la $OUT
