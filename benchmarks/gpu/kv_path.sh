#!/bin/bash
# Runs on the lent two-GPU machine (see README.md here): the three daemons from
# etc/disagg-gpu.yaml, then benchmarks/gpu_kv_path.py (sequential, concurrent,
# the store race, kill -9 of lmcache-server under load) and the KV-reuse row at 7.5k.
set -u
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
       DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LMCACHE_USAGE_TRACK_INTERVAL=100000
LOG=/tmp/disagg/log; mkdir -p $LOG
CFG=/tmp/disagg-gpu.yaml
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpux/*.whl 2>&1 | grep -v WARNING
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
python3 -c "import vllm, lmcache, torch; print('vllm', vllm.__version__, 'lmcache', getattr(lmcache, '__version__', '?'), 'torch', torch.__version__)" 2>&1 | tail -1
python3 -m daemons.ctl make-model /tmp/model --shape mistral-7b --config-only 2>&1 | tail -1
python3 benchmarks/gpu/make_config.py $LOG > $CFG
python3 -m daemons.ctl --config $CFG check-config || exit 1
# supervisord, as `disaggctl up` runs it: it looks for the console scripts beside
# sys.executable, so give it a bin folder of wrappers (this image has no venv).
PY=$(python3 -c 'import sys; print(sys.executable)'); B=$(dirname "$PY")
for d in lmcache-server prefill-worker decode-worker; do
  printf '#!/bin/sh\nexec %s -m daemons.%s "$@"\n' $PY ${d//-/_} > $B/disagg-$d
done
for s in supervisord supervisorctl; do printf '#!/bin/sh\nexec %s -m supervisor.%s "$@"\n' $PY $s > $B/$s; done
chmod +x $B/disagg-* $B/supervisord $B/supervisorctl
t0=$(date +%s)
$PY -m daemons.ctl --config $CFG up || exit 1
python3 -m daemons.ctl --config $CFG wait-ready --fail-fast --timeout ${READY_TIMEOUT:-420}; rc=$?
echo "== start to all ready (canary included): $(( $(date +%s) - t0 ))s (rc $rc)"
python3 -m daemons.ctl --config $CFG status
grep -h "canary via" $LOG/decode-worker.out | head -3
if [ $rc -eq 0 ]; then
  timeout 480 $PY -m benchmarks.gpu_kv_path --config $CFG
  python3 -m daemons.ctl --config $CFG wait-ready --timeout 120 >/dev/null; python3 -m daemons.ctl --config $CFG status
  echo "== connector health flips in the engines' logs (false trips of mq_timeout/heartbeat under load?)"
  grep -c "unhealthy" $LOG/*engine.log
  curl -s 127.0.0.1:9101/metrics | grep -E "^disagg_prefill_(store_wait_seconds_(sum|count)|kv_tokens_total)"
  curl -s 127.0.0.1:9102/metrics | grep -E "^disagg_(request_paths_total|recomputes_total|kv_path_canaries_total|fallbacks_total)" | grep -v " 0.0$"
fi
grep -h -E "wedged|exiting to be restarted|came back as a new process|canary via" $LOG/*.out | cut -c1-260 | tail -20
$PY -m daemons.ctl --config $CFG down
cd $LOG && tar -czf $OUT/logs.tgz . 2>/dev/null; ls -la $OUT
