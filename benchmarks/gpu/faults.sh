#!/bin/bash
# Runs on the lent one-GPU machine (see README.md here): the fault matrix with KV loads in flight.
# etc/disagg-1gpu.yaml (both workers on cuda:0) through make_config.py, EAGER=1 by default (engines restart
# ~40 s sooner; faults do not depend on CUDA graphs), then benchmarks/gpu_faults.py's PLAN under four clients of
# TOKENS-token prompts (above disaggregate_min_tokens: every prompt loads its KV), then
# benchmarks/kv_load_failure.py (POLICY=0 to skip). The stack runs from a copy in /tmp/proj and the plan in the
# background (setsid): a later call with FOLLOW=1 follows the same run while the machine stays warm.
# Each call copies what is done so far to $OUT (faults.jsonl, faults.md, lmcache-events.txt, ...) before CALL_S.
set -u
CALL_S=${CALL_S:-560}; T0=$(date +%s)
if [ "${FOLLOW:-0}" != 1 ]; then
  rm -rf /tmp/proj /tmp/gpu-out; mkdir -p /tmp/gpu-out
  tar -C "$PWD" --exclude='./.gpu[0-9w]*' --exclude=./.git -cf - . | (mkdir -p /tmp/proj && tar -C /tmp/proj -xf -)
  cd /tmp/proj
  export ONE_GPU=1 EAGER=${EAGER:-1}
  . benchmarks/gpu/env.sh
  export PATH=/tmp/site/bin:$PATH   # py-spy (carried in .gpux/) for lmcache-server's stack dumps
  # The matrix begins with the wedge reproduced (no restart on an engine's loss: the unresponsive rule heals it).
  python3 -c "from benchmarks.gpu_faults import set_keys; import pathlib, sys; print(set_keys(pathlib.Path('$CFG'), sys.argv[1]))" \
    "${PRESET:-lmcache.restart_on_engine_loss=never}"
  . benchmarks/gpu/stack.sh
  [ $rc -eq 0 ] || { cp $LOG/*.out /tmp/gpu-out/ 2>/dev/null; cp /tmp/gpu-out/* $OUT/; exit 1; }
  PLAN=${PLAN:-"measure:workers-derived:30,decode engine:kill,set:lmcache.max_gpu_workers=1;lmcache.max_cpu_workers=1,lmcache-server:restart,measure:workers-1:30,set:lmcache.restart_on_engine_loss=auto;lmcache.max_gpu_workers=null;lmcache.max_cpu_workers=null,all:restart,decode engine:kill,LMCache server process:stop@60,LMCache server process:stop+decode engine:kill,prefill engine:kill,decode engine:stop,prefill engine:stop,LMCache server process:kill,decode keeper:kill,lmcache-server:kill,decode-worker:restart"}
  cat > /tmp/gpu-run.sh <<RUN
cd /tmp/proj; export PYTHONPATH=$PYTHONPATH PATH=$PATH PYTHONUNBUFFERED=1
python3 -m benchmarks.gpu_faults --config $CFG --out /tmp/gpu-out --tokens ${TOKENS:-3000} --plan "$PLAN" > /tmp/gpu-out/plan.log 2>&1
echo "plan exit \$?" >> /tmp/gpu-out/plan.log
if [ "${POLICY:-1}" = 1 ]; then
  python3 -m benchmarks.kv_load_failure --config $CFG --tokens ${POLICY_TOKENS:-7000} --prompts 12 --rounds 2 \
    --delay-s 0.03 --stop-s 10 --out /tmp/gpu-out/kv-load-failure.json > /tmp/gpu-out/kv-load-failure.txt 2>&1
fi
touch /tmp/gpu-out/DONE
RUN
  setsid nohup bash /tmp/gpu-run.sh > /dev/null 2>&1 < /dev/null &
fi
cd /tmp/proj; CFG=/tmp/disagg-gpu.yaml; LOG=/tmp/disagg/log
while [ ! -f /tmp/gpu-out/DONE ] && [ $(( $(date +%s) - T0 )) -lt $CALL_S ]; do sleep 5; done
echo "== $(date -u +%FT%TZ) after $(( $(date +%s) - T0 ))s: $(wc -l < /tmp/gpu-out/faults.jsonl 2>/dev/null || echo 0) steps done"
cat /tmp/gpu-out/faults.md 2>/dev/null; tail -3 /tmp/gpu-out/plan.log 2>/dev/null
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [ -f /tmp/gpu-out/DONE ]; then cat /tmp/gpu-out/kv-load-failure.txt 2>/dev/null | head -40; fi
(cd $LOG && tar -czf /tmp/gpu-out/logs.tgz --exclude='*.log.[0-9]' . 2>/dev/null)
cp /tmp/gpu-out/faults.jsonl /tmp/gpu-out/faults.md /tmp/gpu-out/lmcache-events.txt /tmp/gpu-out/plan.log \
   /tmp/gpu-out/kv-load-failure.json /tmp/gpu-out/kv-load-failure.txt /tmp/gpu-out/logs.tgz $OUT/ 2>/dev/null
ls -la $OUT
