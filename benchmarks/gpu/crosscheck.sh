#!/bin/bash
# Runs on the lent GPU machine (see README.md here): etc/disagg-1gpu.yaml as shipped (both workers on cuda:0,
# each sized by kv_cache_memory_bytes; ONE_GPU=1), then: the time from `disaggctl up` to all ready; the KV cross-
# check and Server-Timing measured by benchmarks/kv_crosscheck.py (greedy requests, completions and chat, streamed
# and not; WORDS above disaggregate_min_tokens: the 2026-12-03 run used the 300-900 default and stayed short_prompt); four clients of unique ~TOKENS-token prompts for LOAD_S seconds (does every disaggregated request get
# every full chunk, and how many cross-checks mismatch?). Results: docs/performance.md.
set -u
export ONE_GPU=1
. "$(dirname "$0")/env.sh"
. "$(dirname "$0")/stack.sh"
nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv
if [ $rc -eq 0 ]; then
  timeout ${XCHECK_TIMEOUT:-200} $PY -m benchmarks.kv_crosscheck --url http://127.0.0.1:8000 \
    --model mistralai/Mistral-7B-Instruct-v0.2 -n ${N:-120} --words ${WORDS:-2500,4000} --json $OUT/kv_crosscheck.jsonl
  timeout $(( ${LOAD_S:-60} + 120 )) $PY -m benchmarks.harness.load --url http://127.0.0.1:8000 \
    --model mistralai/Mistral-7B-Instruct-v0.2 --model-path /tmp/model --clients 4 --duration ${LOAD_S:-60} \
    --tokens ${TOKENS:-3000} --max-tokens 16 --deadline 120
fi
curl -s 127.0.0.1:9102/metrics | grep -E "^disagg_(kv_crosschecks_total|request_paths_total)" | grep -v " 0.0$"
curl -s 127.0.0.1:9102/metrics | grep -E "^disagg_request_stage_seconds_(sum|count)"
$PY -m daemons.ops.ctl --config $CFG down
cd $LOG && tar -czf $OUT/logs.tgz . 2>/dev/null; ls -la $OUT
