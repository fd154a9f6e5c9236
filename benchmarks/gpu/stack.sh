# Sourced by kv_path.sh and failover.sh on the lent GPU machine, after env.sh: supervisord, as `disaggctl up`
# runs it, looks for the console scripts beside sys.executable, so put wrappers there (a symlinked python
# would lose the image's venv); then start the stack and wait until all three are ready ($rc, $PY).
PY=$(python3 -c 'import sys; print(sys.executable)'); B=$(dirname "$PY")
for d in lmcache-server prefill-worker decode-worker; do
  printf '#!/bin/sh\nexec %s -m daemons.%s "$@"\n' $PY ${d//-/_} > $B/disagg-$d
done
printf '#!/bin/sh\nexec %s -m daemons.ops.ctl "$@"\n' $PY > $B/disaggctl
for s in supervisord supervisorctl; do printf '#!/bin/sh\nexec %s -m supervisor.%s "$@"\n' $PY $s > $B/$s; done
chmod +x $B/disagg-* $B/disaggctl $B/supervisord $B/supervisorctl
t0=$(date +%s)
$PY -m daemons.ops.ctl --config $CFG up || exit 1
python3 -m daemons.ops.ctl --config $CFG wait-ready --fail-fast --timeout ${READY_TIMEOUT:-420}; rc=$?
echo "== start to all ready (canary included): $(( $(date +%s) - t0 ))s (rc $rc)"
python3 -m daemons.ops.ctl --config $CFG status
