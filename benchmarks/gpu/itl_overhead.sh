#!/bin/bash
# Runs on the lent two-GPU machine: the decode engine's quiet ITL with the LMCache
# connector against a plain engine, side by side, GPUs swapped, eager and CUDA graphs
# (benchmarks/gpu_itl_overhead.py). lmcache-server runs as the daemon runs it.
set -u
. "$(dirname "$0")/env.sh"
setsid python3 -m daemons.lmcache_server --config $CFG > $LOG/lmcache-server.out 2>&1 &
for i in $(seq 1 120); do [ "$(python3 -c "import json;print(json.load(open('/tmp/disagg/run/lmcache-server.json'))['state'])" 2>/dev/null)" = ready ] && break; sleep 1; done
echo "== lmcache-server ready after ${i}s"
# Output goes to $OUT as it comes (a pipe to tail would hold it back until the end).
timeout 560 python3 -m benchmarks.gpu_itl_overhead --config $CFG --runs ${RUNS:-5} --tokens 256 ${GRAPHS:---graphs} | tee $OUT/itl.txt
pkill -TERM -f "daemons\.lmcache_server"; sleep 3
cd $LOG && tar -czf $OUT/logs.tgz . 2>/dev/null
