#!/bin/bash
# Runs on the lent two-GPU machine (see README.md here): the three daemons from
# etc/disagg-gpu.yaml, then benchmarks/gpu_kv_path.py (sequential, concurrent,
# the store race, kill -9 of lmcache-server under load). Results: docs/performance.md.
set -u
. "$(dirname "$0")/env.sh"
# supervisord, as `disaggctl up` runs it: it looks for the console scripts beside
# sys.executable, so put wrappers there (a symlinked python would lose the image's venv).
. "$(dirname "$0")/stack.sh"
grep -h "canary via" $LOG/decode-worker.out | head -3
if [ $rc -eq 0 ]; then
  timeout 480 $PY -m benchmarks.gpu_kv_path --config $CFG
  python3 -m daemons.ops.ctl --config $CFG wait-ready --timeout 120 >/dev/null; python3 -m daemons.ops.ctl --config $CFG status
  echo "== connector health flips in the engines' logs (false trips of mq_timeout/heartbeat under load?)"
  grep -c "unhealthy" $LOG/*engine.log
  curl -s 127.0.0.1:9101/metrics | grep -E "^disagg_prefill_(store_wait_seconds_(sum|count)|kv_tokens_total)"
  curl -s 127.0.0.1:9102/metrics | grep -E "^disagg_(request_paths_total|recomputes_total|kv_path_canaries_total|fallbacks_total)" | grep -v " 0.0$"
fi
grep -h -E "wedged|exiting to be restarted|came back as a new process|canary via" $LOG/*.out | cut -c1-260 | tail -20
echo "== what the stack listens on (LMCache's HTTP API must be on loopback)"
ss -ltnp 2>/dev/null | grep -E "python|lmcache|vllm" | awk '{print $4}' | sort -u
echo "== kill -9 of prefill-worker: no process of its engine tree may survive it"
$PY - <<'PY'
import json, os, signal, time
from daemons.children.child import descendants
rec = json.load(open("/tmp/disagg/run/prefill-worker.json"))
tree = [rec["pid"], *descendants(rec["pid"])]
os.kill(rec["pid"], signal.SIGKILL)
deadline = time.monotonic() + 30
alive = lambda: [p for p in tree if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
while alive() and time.monotonic() < deadline:
    time.sleep(0.2)
print(f"tree of {len(tree)} processes; left after kill -9 of the daemon: {alive()} ({time.monotonic() - deadline + 30:.1f}s)")
PY
nvidia-smi --query-compute-apps=pid,used_memory --format=csv 2>/dev/null | head -5
$PY -m daemons.ops.ctl --config $CFG down
cd $LOG && tar -czf $OUT/logs.tgz . 2>/dev/null; ls -la $OUT
