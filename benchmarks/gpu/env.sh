# Sourced by run.sh and kv_path.sh on the lent GPU machine: the environment, the
# carried wheels (.gpux/) into /tmp/site, and what the machine is.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
       DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LMCACHE_USAGE_TRACK_INTERVAL=100000
LOG=/tmp/disagg/log; mkdir -p $LOG
CFG=/tmp/disagg-gpu.yaml
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpux/*.whl 2>&1 | grep -v WARNING
python3 -c "import vllm.entrypoints.openai.api_server" || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
python3 -c "import vllm, lmcache, torch; print('vllm', vllm.__version__, 'lmcache', getattr(lmcache, '__version__', '?'), 'torch', torch.__version__)" 2>&1 | tail -1
python3 -m daemons.ops.ctl make-model /tmp/model --shape ${SHAPE:-mistral-7b} --config-only 2>&1 | tail -1
python3 benchmarks/gpu/make_config.py $LOG > $CFG
python3 -m daemons.ops.ctl --config $CFG check-config || exit 1
