#!/bin/bash
# Runs on the lent one-GPU machine (README.md here): the box's one endpoint, measured (issue 31). Two prefill-worker
# and two decode-worker instances of a Llama-3.2-1B-shaped model (dummy weights) on cuda:0 behind
# decode_worker.shared_port (make_config.py BOX=1, KV_BYTES each, EAGER=1 unless said), then
# benchmarks/box_endpoint.py's PLAN in the background: `vllm bench serve` at rising rates with routing load and
# round_robin in the same run, a multi-turn chat against its control, one prefill + one decode engine.
# The stack runs from a copy in /tmp/proj and the plan in the background (setsid): a later call with FOLLOW=1
# follows the same run while the machine stays warm. Each call copies what is done so far to $OUT before CALL_S.
set -u
CALL_S=${CALL_S:-560}; T0=$(date +%s)
if [ "${FOLLOW:-0}" != 1 ]; then
  rm -rf /tmp/proj /tmp/gpu-out; mkdir -p /tmp/gpu-out
  tar -C "$PWD" --exclude='./.gpu[0-9w]*' --exclude=./.git --exclude=./.venv -cf - . | (mkdir -p /tmp/proj && tar -C /tmp/proj -xf -)
  cd /tmp/proj
  export ONE_GPU=1 BOX=1 EAGER=${EAGER:-1} SHAPE=${SHAPE:-llama-3.2-1b}
  . benchmarks/gpu/env.sh
  python3 -c "import vllm.benchmarks.serve" || exit 1
  . benchmarks/gpu/stack.sh
  [ $rc -eq 0 ] || { (cd $LOG && tar -czf $OUT/logs.tgz .); exit 1; }
  PLAN=${PLAN:-"warmup:4,sweep:4/8/24,chat:12/5,single:4/8/24"}
  cat > /tmp/gpu-run.sh <<RUN
cd /tmp/proj; export PYTHONPATH=$PYTHONPATH PATH=$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m benchmarks.box_endpoint --config $CFG --out /tmp/gpu-out --plan "$PLAN" --duration ${DUR:-15} \
  ${BENCH_ARGS:-} > /tmp/gpu-out/plan.log 2>&1
echo "plan exit \$?" >> /tmp/gpu-out/plan.log
touch /tmp/gpu-out/DONE
RUN
  setsid nohup bash /tmp/gpu-run.sh > /dev/null 2>&1 < /dev/null &
fi
cd /tmp/proj; CFG=/tmp/disagg-gpu.yaml; LOG=/tmp/disagg/log
while [ ! -f /tmp/gpu-out/DONE ] && [ $(( $(date +%s) - T0 )) -lt $CALL_S ]; do sleep 5; done
echo "== $(date -u +%FT%TZ) after $(( $(date +%s) - T0 ))s: $(wc -l < /tmp/gpu-out/endpoint.jsonl 2>/dev/null || echo 0) rows"
cut -c 1-400 /tmp/gpu-out/endpoint.jsonl 2>/dev/null; tail -5 /tmp/gpu-out/plan.log 2>/dev/null
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
(cd $LOG && tar -czf /tmp/gpu-out/logs.tgz --exclude='*.log.[0-9]' . 2>/dev/null)
(cd /tmp/gpu-out && tar -czf bench.tgz bench 2>/dev/null)
cp /tmp/gpu-out/endpoint.jsonl /tmp/gpu-out/plan.log /tmp/gpu-out/logs.tgz /tmp/gpu-out/bench.tgz $OUT/ 2>/dev/null
ls -la $OUT
