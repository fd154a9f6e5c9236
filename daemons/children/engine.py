"""What a worker's vLLM engine is: its command line, environment and address,
all derived from the config (nothing is left to hand-set environment
variables). Starting, watching and stopping it is the worker's job
(:class:`daemons.worker.EngineDaemon`, on :class:`daemons.child_daemon.ChildDaemon`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from daemons.children.child import ChildProcess, child_env
from daemons.config_sections import WorkerConfig
from daemons.deployment import Deployment
from daemons.engine_flags import gpu_indices

KVRole = Literal["kv_producer", "kv_consumer"]


def kv_transfer_config(deployment: Deployment, role: KVRole) -> dict[str, object]:
    """vLLM's --kv-transfer-config for LMCache's multi-process server (this host's)."""
    config = deployment.config
    return {
        "kv_connector": "LMCacheMPConnector",
        "kv_role": role,
        # A KV load that breaks mid-request (LMCache restarted) recomputes the
        # missing blocks instead of failing the request (vLLM's default).
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "lmcache.mp.host": f"tcp://{deployment.lmcache_address}",
            "lmcache.mp.port": config.lmcache.port,
            "lmcache.mp.mq_timeout": config.lmcache.mq_timeout_s,
            "lmcache.mp.heartbeat_interval": config.lmcache.heartbeat_interval_s,
        },
    }


def engine_argv(deployment: Deployment, worker: WorkerConfig, role: KVRole | None) -> list[str]:
    """The vLLM OpenAI server command line for one worker (role None: no KV transfer)."""
    model = deployment.config.model
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model.path),
        "--served-model-name", model.name,
        "--host", "127.0.0.1",
        "--port", str(worker.engine_port),
        "--dtype", model.dtype,
        "--max-model-len", str(model.max_model_len),
        "--load-format", model.load_format,
        "--enable-prompt-tokens-details",
        "--disable-uvicorn-access-log",
    ]
    if model.enforce_eager:
        argv.append("--enforce-eager")
    if worker.kv_cache_memory_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(worker.kv_cache_memory_bytes)]
    if worker.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(worker.gpu_memory_utilization)]
    if worker.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(worker.max_num_seqs)]
    if worker.tensor_parallel_size > 1:  # the GPUs `device` names, one rank each
        argv += ["--tensor-parallel-size", str(worker.tensor_parallel_size)]
    if role is not None:
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(deployment, role), separators=(",", ":"))]
    return argv + list(worker.extra_engine_args)


def engine_env(worker: WorkerConfig) -> dict[str, str]:
    env = child_env()  # without systemd's handles, the held sockets and the API keys: only the daemon has those
    env["LMCACHE_DISABLE_BANNER"] = "1"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if worker.device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_indices(worker.device)))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        # Two engines share this host's cores. vLLM's CPU build pins each engine's threads to the same cores
        # ("auto"), and an idle engine busy-polls its queue (sched_yield) on its pinned core for a second after
        # every request: under steady traffic to one engine, the other engine's start sat in sched_setaffinity
        # for minutes (a decode-worker restart under failover traffic never finished). Unpinned, the kernel
        # shares the cores. An operator's own VLLM_CPU_OMP_THREADS_BIND (disjoint cores per engine) wins.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return env


# What vLLM logs when its engine core cannot start (vLLM 0.26 and 0.32, v1/engine/core.py): the engine will not
# become healthy, though its processes may linger (the worker then stops them and starts it again).
VLLM_FAILED_START = ("EngineCore failed to start",)


def engine_url(worker: WorkerConfig) -> str:
    """Where the worker reaches its engine (loopback only: the engine is never exposed)."""
    return f"http://127.0.0.1:{worker.engine_port}"


def engine_child(deployment: Deployment, worker: WorkerConfig, role: KVRole | None, *, name: str) -> ChildProcess:
    """The engine as a child process of the worker ``name``, logging to ``<log_dir>/<name>-engine.log``."""
    config = deployment.config
    return ChildProcess(f"{name} engine", engine_argv(deployment, worker, role),
                        log_path=Path(config.log_dir) / f"{name}-engine.log", env=engine_env(worker),
                        port=worker.engine_port, logs=config.logs, fatal_lines=VLLM_FAILED_START)
