#!/bin/bash
# Runs on the lent two-GPU machine (benchmarks/gpu/README.md): goodput of our stack
# (prefill-worker on GPU 0, decode-worker on GPU 1) against two plain vLLM engines (one
# per GPU, load split evenly), same model, same engine flags, same Poisson arrivals
# (benchmarks/goodput.py). Also the short-prompt crossover (decode TTFT, KV from LMCache
# vs recompute) on our stack, LMCache's own CPU->GPU load rate and the pinned copy rate.
# PART=ours|plain|both (default both); EAGER=0 runs both systems with CUDA graphs (the
# config's enforce_eager otherwise); OURS_LABEL names our stack's rows (default disagg);
# RATES_LONG=none / RATES_SHORT=none skip a workload; CROSS=none skips the crossover
# (CROSS_REPEAT prompts per length, default 3). Results: $OUT/goodput.jsonl, every ITL per rate in
# $OUT/itls/ (for a CDF), $OUT/goodput.txt.
set -u
. "$(dirname "$0")/env.sh"
PART=${PART:-both}
RATES_LONG=${RATES_LONG:-1,2,3,4,6,8}
RATES_SHORT=${RATES_SHORT:-2,4,6,8,10,12}
DUR=${DUR:-20}
sweep() {  # label urls
  [ "${RATES_LONG}" = none ] || timeout ${SWEEP_TIMEOUT:-200} python3 -m benchmarks.goodput --url "$2" --label "$1" --in 4000 --out 200 \
    --rates $RATES_LONG --duration $DUR --json $OUT/goodput.jsonl --itls-out $OUT/itls --model m | tee -a $OUT/goodput.txt
  [ "${RATES_SHORT}" = none ] || timeout ${SWEEP_TIMEOUT:-200} python3 -m benchmarks.goodput --url "$2" --label "$1" --in 1000 --out 200 \
    --rates $RATES_SHORT --duration $DUR --json $OUT/goodput.jsonl --itls-out $OUT/itls --model m | tee -a $OUT/goodput.txt
}
if [ $PART != plain ]; then
  sed -i 's|served_name: .*|served_name: m|' $CFG
  python3 -m daemons.ops.ctl --config $CFG check-config || exit 1
  t0=$(date +%s)
  for d in lmcache_server prefill_worker decode_worker; do
    setsid python3 -m daemons.$d --config $CFG > $LOG/$d.out 2>&1 &
  done
  python3 -m daemons.ops.ctl --config $CFG wait-ready --fail-fast --timeout ${READY_TIMEOUT:-300}; rc=$?
  echo "== our stack ready after $(( $(date +%s) - t0 ))s (rc $rc)" | tee -a $OUT/goodput.txt
  if [ $rc -eq 0 ]; then
    [ "${CROSS:-}" = none ] || timeout 120 python3 -m benchmarks.kv_reuse --config $CFG --lengths ${CROSS:-500,1000,1500,2000,3000} --repeat ${CROSS_REPEAT:-3} \
      | tee $OUT/crossover.txt
    # LMCache's own L1 (CPU) -> L0 (GPU) load and store rates, per request, GB/s
    curl -s 127.0.0.1:9100/metrics | grep -E "^lmcache_mp_l0_l1_" | tee $OUT/lmcache-l0l1.txt
    timeout 60 python3 -m benchmarks.gpu_interference copy-rate | tee -a $OUT/goodput.txt
    sweep "${OURS_LABEL:-disagg}" http://127.0.0.1:8000
    curl -s 127.0.0.1:9102/metrics | grep -E "^disagg_(request_paths_total|fallbacks_total)" | grep -v " 0.0$" | tee -a $OUT/goodput.txt
    curl -s 127.0.0.1:9101/metrics | grep -E "^disagg_prefill_store_wait_seconds_(sum|count)" | tee -a $OUT/goodput.txt
    curl -s 127.0.0.1:9100/metrics | grep -E "^lmcache_mp_l0_l1_.*(sum|count)" | tee -a $OUT/goodput.txt
  fi
  pkill -TERM -f "daemons\.(lmcache_server|prefill_worker|decode_worker)"
  for i in $(seq 1 60); do pgrep -f "daemons\.(lmcache|prefill|decode)" >/dev/null || break; sleep 1; done
  [ $rc -eq 0 ] || { cd $LOG && tar -czf $OUT/logs.tgz .; exit 1; }
fi
if [ $PART != ours ]; then
  PLAIN_EAGER=$(python3 -c "import yaml; print('--enforce-eager' if yaml.safe_load(open('$CFG'))['model'].get('enforce_eager') else '')")
  for g in 0 1; do
    CUDA_VISIBLE_DEVICES=$g setsid python3 -m vllm.entrypoints.openai.api_server --model /tmp/model \
      --served-model-name m --load-format dummy --dtype bfloat16 --max-model-len 8000 \
      --gpu-memory-utilization 0.8 --attention-backend TRITON_ATTN --port 820$g $PLAIN_EAGER > $LOG/plain-$g.log 2>&1 &
  done
  for i in $(seq 1 ${READY_TIMEOUT:-300}); do curl -sf 127.0.0.1:8200/health >/dev/null && curl -sf 127.0.0.1:8201/health >/dev/null && break; sleep 1; done
  echo "== two plain engines ready after ${i}s" | tee -a $OUT/goodput.txt
  sweep colocated http://127.0.0.1:8200,http://127.0.0.1:8201
  pkill -TERM -f "api_server.*820[01]"; sleep 5
fi
cd $LOG && tar -czf $OUT/logs.tgz . 2>/dev/null
