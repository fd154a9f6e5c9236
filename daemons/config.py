"""The one YAML config that all three daemons read, validated as a whole.

A bad config is an operator error, not a crash: :func:`load_config` raises
:class:`ConfigError` with one line per problem, each naming the key, and the
daemons exit with :data:`EX_CONFIG` (78) so systemd and supervisord do not
restart-loop on it.

Relative paths in the file resolve against the directory that holds the file.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

EX_CONFIG = 78
DEFAULT_CONFIG = "etc/disagg.yaml"
CONFIG_ENV = "DISAGG_CONFIG"

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveFloat = Annotated[float, Field(gt=0)]
_DEVICE_RE = re.compile(r"^(cpu|cuda:\d+(-\d+)?(,\d+(-\d+)?)*)$")
# Tensor parallelism comes from `device` (several GPUs): a flag of its own would disagree with it.
TP_FLAGS = ("--tensor-parallel-size", "-tp")


def gpu_indices(device: str) -> list[int]:
    """The GPUs a worker's `device` names: ``cuda:0`` -> [0], ``cuda:0-3`` -> [0, 1, 2, 3], ``cuda:0,2`` -> [0, 2];
    ``cpu`` -> []."""
    if not device.startswith("cuda:"):
        return []
    out: list[int] = []
    for part in device.split(":", 1)[1].split(","):
        first, _, last = part.partition("-")
        out += list(range(int(first), int(last or first) + 1))
    return out


class ConfigError(Exception):
    """The config file is missing, unreadable or invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """The model both engines serve, from a local directory (the daemons never contact a model hub)."""

    path: Path = Field(description="Local directory with config.json, weights and tokenizer.")
    served_name: str = Field(default="", description="Name clients use; defaults to the directory name.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="The engines' --dtype; both must agree (part of the digest).")
    max_model_len: Annotated[int, Field(gt=0)] = Field(
        default=8192, description="Longest prompt + output in tokens (--max-model-len); a longer prompt gets the engine's 400.")
    enforce_eager: bool = Field(
        default=True, description="No CUDA graphs (--enforce-eager): a faster start, a slower decode on GPUs.")
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        default="auto", description="vLLM's --load-format; dummy: random weights of the model's shape (benchmarks).")

    @property
    def name(self) -> str:
        return self.served_name or self.path.name


class LMCacheConfig(_Section):
    """LMCache: the server both engines' connectors talk to, and what they must agree on."""

    backend: Literal["mp"] = Field(default="mp", description="LMCache multi-process server.")
    host: str = Field(default="127.0.0.1", description="Where lmcache-server listens (loopback only: its HTTP API has no auth).")
    port: Port = Field(default=5555, description="LMCache's request port: the engines' connectors and the lookup client.")
    http_port: Port = Field(default=8080, description="LMCache's HTTP API (health, metrics), on loopback.")
    chunk_size: Annotated[int, Field(gt=0)] = Field(
        default=256, description="Tokens per KV chunk; only full chunks are stored and loaded (part of the digest).")
    l1_size_gb: PositiveFloat = Field(
        default=1.0, description="LMCache's memory for KV (allocated at start); the oldest chunks are evicted past it.")
    eviction_policy: Literal["LRU"] = Field(default="LRU", description="Which chunks go first when L1 is full.")
    # LMCache 0.5.6 defaults to lmcache_driven, which needs CUDA: "auto" lets CPU engines use shared memory.
    transfer_mode: Literal["auto", "lmcache_driven", "engine_driven"] | None = Field(
        default="auto", description="LMCache's --supported-transfer-mode (0.5.3's default is auto, 0.5.6's "
        "lmcache_driven, which CPU engines cannot use); null leaves the flag out.")
    startup_timeout_s: PositiveFloat = Field(
        default=120.0, description="lmcache-server fails if LMCache is not healthy this long after its start.")
    # The engines' connector (vLLM's LMCacheMPConnector): how long one control
    # message to the server (lookup, lookup status, registration) may take, and
    # how often it pings the server. LMCache's defaults (300 s, 10 s) left an
    # engine stuck for five minutes on a restarted server, then dead.
    mq_timeout_s: PositiveFloat = Field(
        default=5.0, description="Deadline of one control message between an engine's connector and the server.")
    heartbeat_interval_s: PositiveFloat = Field(
        default=2.0, description="The connector pings the server this often (and waits this long for the answer).")
    # lmcache-server supervises what it runs (docs/faults.md, "The KV store heals"): LMCache that fails its
    # HTTP health check nor a lookup on its request queue (what the engines use) is restarted in place.
    unresponsive_restart_s: PositiveFloat = Field(
        default=30.0, description="LMCache failing /healthcheck or a lookup on its request queue (either) this long "
        "is restarted in place (its threads' stacks logged first); doubled after each such restart within "
        "`restart_window_s`.")
    restart_limit: Annotated[int, Field(ge=1)] = Field(
        default=5, description="LMCache restarts in place (unresponsive, an engine lost) within `restart_window_s` "
        "before lmcache-server exits, for its supervisor to restart it.")
    restart_window_s: PositiveFloat = Field(default=600.0, description="The window of `restart_limit`.")
    restart_on_engine_loss: Literal["auto", "always", "never"] = Field(
        default="auto", description="Restart LMCache when an engine dies without a planned stop, before the "
        "engine's replacement connects: LMCache 0.5.x waits forever on a dead engine's CUDA work (a transfer in "
        "flight) at its next device synchronisation. auto: when an engine runs on a GPU.")
    max_gpu_workers: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="LMCache's --max-gpu-workers (threads for KV stores and loads, one per engine rank "
        "at most); null: twice the engine ranks that connect to this host's server (a restarted engine is a new "
        "rank to LMCache).")
    max_cpu_workers: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="LMCache's --max-cpu-workers (threads for lookups and pings); null: the engine "
        "ranks that connect plus two (the lookup clients).")

    @field_validator("host")
    @classmethod
    def _loopback_only(cls, host: str) -> str:
        # LMCache's HTTP API has destructive endpoints and no auth: keep it off the network.
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"not an IP address: {host!r}") from None
        if not _is_loopback(host):
            raise ValueError("must be a loopback address (LMCache's HTTP API has no auth)")
        return host


# Engine flags that change what the KV cache holds or how it is laid out: every worker's engine must agree on
# them (a decode engine reading fp8 KV as bf16 answers garbage with HTTP 200), and they are part of the digest.
KV_ENGINE_FLAGS = ("--kv-cache-dtype", "--quantization", "-q", "--block-size", "--hf-overrides", "--hf-config-path",
                   "--tokenizer", "--tokenizer-mode", "--revision", "--code-revision", "--tokenizer-revision",
                   "--enable-lora", "--lora-modules", "--max-lora-rank", "--rope-scaling", "--rope-theta",
                   "--model-impl", "--calculate-kv-scales", "--attention-backend")


def kv_engine_args(args: list[str]) -> dict[str, str]:
    """The KV-relevant flags among engine arguments (``--flag value``, ``--flag=value``, ``--flag``), as
    flag -> value ("" for a bare switch); ``-q`` is spelled ``--quantization``, ``_`` as ``-``."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        flag = flag.replace("_", "-") if flag.startswith("--") else flag
        if flag in KV_ENGINE_FLAGS:
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                value = args[i + 1]
                i += 1
            found["--quantization" if flag == "-q" else flag] = value
        i += 1
    return found


# Engine flags the worker owns: extra_engine_args may not change them.
ENGINE_OWNED_FLAGS = ("--host", "--port", "--uds", "--api-key", "--kv-transfer-config", "--model",
                      "--served-model-name")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DaemonConfig(_Section):
    metrics_host: str = Field(
        default="127.0.0.1", description="Where the daemon serves /metrics and its state record (no secrets there).")
    metrics_port: Port = Field(description="The daemon's /metrics port.")


class LMCacheServerConfig(DaemonConfig):
    """The lmcache-server daemon."""

    metrics_port: Port = 9100


class WorkerConfig(DaemonConfig):
    host: str = Field(default="127.0.0.1", description="Where the worker's API listens.")
    port: Port = Field(description="The worker's API port (decode-worker: the public front door).")
    engine_port: Port = Field(description="The engine's port, on loopback (only the worker calls it).")
    device: str = Field(default="cpu", description="cpu, cuda:N, or several GPUs (cuda:0-3, cuda:0,2): the engine "
                        "sees those (CUDA_VISIBLE_DEVICES) and spans them with tensor parallelism (--tensor-parallel-size "
                        "= their number).")
    kv_cache_memory_bytes: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="The engine's KV cache size (--kv-cache-memory-bytes); required on CPU, and for two "
        "engines on one GPU.")
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="vLLM's --gpu-memory-utilization (null: vLLM's default).")
    max_num_seqs: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="vLLM's --max-num-seqs: requests the engine batches (null: vLLM's default).")
    engine_startup_timeout_s: PositiveFloat = Field(
        default=900.0, description="The worker fails if its engine is not healthy this long after its start.")
    extra_engine_args: list[str] = Field(
        default_factory=list, description="More vLLM flags, as a list of strings (not the ones the worker sets).")
    instances: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Several workers of this kind on one box: name -> the keys that differ "
        "(port, engine_port, metrics_port, device, ...). Empty: one worker.",
    )

    @field_validator("extra_engine_args")
    @classmethod
    def _no_overrides(cls, args: list[str]) -> list[str]:
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag in TP_FLAGS:
                raise ValueError(f"{flag}: tensor parallelism follows `device` (e.g. cuda:0-3 spans four GPUs): "
                                 "name the GPUs there, not here")
            if flag in ENGINE_OWNED_FLAGS:
                raise ValueError(f"{flag} is set by disagg (the engine stays on loopback, behind the worker, "
                                 "with the KV transfer config derived from this file); remove it")
        return args

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not _DEVICE_RE.match(device):
            raise ValueError(f"must be 'cpu', 'cuda:N' or several GPUs ('cuda:0-3', 'cuda:0,2'), got {device!r}")
        gpus = gpu_indices(device)
        if device != "cpu" and (not gpus or gpus != sorted(set(gpus))):
            raise ValueError(f"{device!r} names a GPU twice or out of order")
        return device

    @property
    def tensor_parallel_size(self) -> int:
        """The engine's ranks: the GPUs it spans (1 on one GPU or the CPU)."""
        return max(1, len(gpu_indices(self.device)))

    @model_validator(mode="after")
    def _memory(self) -> WorkerConfig:
        if self.device == "cpu" and self.kv_cache_memory_bytes is None:
            raise ValueError(
                "kv_cache_memory_bytes is required when device is 'cpu' "
                "(vLLM's CPU engine refuses to start without it; e.g. 268435456)"
            )
        return self


class PrefillWorkerConfig(WorkerConfig):
    """prefill-worker: its engine (KV producer) and the prefill API that decode-worker calls."""

    port: Port = 8100
    engine_port: Port = 8101
    metrics_port: Port = 9101

    @field_validator("host")
    @classmethod
    def _prefill_loopback(cls, host: str) -> str:
        if not _is_loopback(host):
            raise ValueError("must be a loopback address (the prefill API has no auth; only decode-worker calls it)")
        return host


class DecodeWorkerConfig(WorkerConfig):
    """decode-worker: its engine (KV consumer) and the public front door: routing, deadlines, the edge."""

    port: Port = 8000
    engine_port: Port = 8001
    metrics_port: Port = 9102
    shared_port: Port | None = Field(
        default=None, description="The box's one endpoint: every decode-worker instance of this host also accepts "
        "requests on this port (one listening socket, held like the others), and sends each to the decode engine "
        "with fewer requests in progress (its own, or a sibling's through that sibling's `port`). Null: each "
        "front door on its own `port` only.")
    prefill_timeout_s: PositiveFloat = Field(
        default=30.0, description="Longer than this and the decode engine recomputes the prompt."
    )
    prefill_wait_s: float = Field(
        default=300.0, ge=0,
        description="At start, how long to wait for prefill-worker before serving degraded.",
    )
    first_token_timeout_s: PositiveFloat = Field(
        default=120.0, description="A streamed request whose decode engine sends no first token in this "
        "long fails over to a prefill engine (nothing reached the client yet; a sibling's or a prefill engine's "
        "stream that late fails with 503 + Retry-After).")
    request_timeout_s: PositiveFloat = Field(
        default=600.0, description="A non-streamed request whose decode engine has not answered in this "
        "long fails with 503 + Retry-After.")
    max_concurrent_requests: Annotated[int, Field(gt=0)] = Field(
        default=256, description="Requests the front door serves at once (prefill call, decode, whole stream). "
        "The engines batch what is in progress: a cap far below their max_num_seqs wastes them.")
    max_queued_requests: Annotated[int, Field(ge=0)] = Field(
        default=256, description="Requests that may wait for a slot; past that, 429 + Retry-After at once.")
    queue_timeout_s: PositiveFloat = Field(
        default=10.0, description="A queued request that got no slot in this long gets 429 + Retry-After.")
    disaggregate_min_tokens: Annotated[int, Field(ge=0)] = Field(
        default=257, description="Prompts estimated shorter than this many tokens skip the prefill call: the "
        "decode engine computes them (path short_prompt). Below the crossover where loading KV from LMCache "
        "costs the decode engine more than computing it, the prefill round trip only adds TTFT. 257 = one "
        "256-token chunk + 1, the shortest prompt with any KV to load; 0 sends every prompt to prefill.")
    short_prompt_max_in_flight: Annotated[int, Field(ge=0)] = Field(
        default=8, description="Short prompts stay on the decode engine only while the front door has at most "
        "this many requests in progress: under load the prefill engine's capacity matters more than one "
        "request's TTFT, and a prompt computed on the decode engine stalls every stream decoding there.")
    balance_short_prompts: bool = Field(
        default=False, description="Under load (past short_prompt_max_in_flight), a prompt shorter than "
        "disaggregate_min_tokens is served start to end by whichever side has fewer requests in progress: the "
        "decode engine (path short_prompt) or a prefill engine (path decode_busy), instead of being "
        "disaggregated. Where short prompts make decoding the bottleneck, two engines that each prefill and "
        "decode their own serve more than one prefilling for the other (docs/performance.md). The price: those "
        "streams share the prefill engine's steps with long prompts' prefill calls.")
    routing: Literal["load", "round_robin"] = Field(
        default="load", description="How requests spread over the box's engines. load: a prefill call goes to "
        "the prefill engine holding the fewest of this front door's prompt tokens, and a request taken on the "
        "box's endpoint (shared_port) to a sibling decode engine holding 2 or more fewer requests. round_robin: "
        "both in turn, whatever the engines hold (the baseline load-aware routing is measured against: "
        "docs/performance.md). Failover is by load either way.")
    overflow_backlog_tokens: Annotated[int, Field(ge=0)] = Field(
        default=0, description="While prefill calls in flight hold at least this many (estimated) prompt "
        "tokens, the decode engine computes new prompts itself (path prefill_busy), within "
        "overflow_max_local_tokens: when the prefill GPU is the bottleneck, the decode GPU's spare time "
        "shortens TTFT. Each such prompt stalls the streams decoding there for its prefill step. 0: off "
        "(every prompt past the short-prompt rule goes to prefill).")
    overflow_max_local_tokens: Annotated[int, Field(ge=0)] = Field(
        default=4096, description="Prompt tokens the decode engine computes at once for prefill_busy "
        "(sent to it, no first token yet): bounds how long one decode step can stall.")
    failover_max_in_flight: Annotated[int, Field(ge=0)] = Field(
        default=64, description="While the decode engine cannot serve (loading, reloading, wedged), requests go "
        "whole to a ready prefill engine (path failover), at most this many at once; past that, and with no "
        "prefill-worker ready, 503 + Retry-After. 0: no failover.")
    access_log: bool = Field(
        default=True, description="One line per answered request in the log: request id, route, status, path and "
        "its Server-Timing stages.")
    kv_crosscheck: bool = Field(
        default=True, description="Greedy requests (temperature 0) on the disaggregated path and every canary: "
        "check that the decode engine chose the prefill engine's own first token (x-disagg-kv-check; a mismatch "
        "is path kv_mismatch). Costs two log-probabilities per request, computed anyway.")
    kv_crosscheck_tolerance: float = Field(
        default=0.1, ge=0, description="How far apart (nats of log-probability) the two engines' first tokens may "
        "be: the same token's log-probabilities, or another token the prefill engine ranked this close to its "
        "choice (a near tie). Chosen from measured differences: docs/request-path.md.")
    migration_attempts: Annotated[int, Field(ge=0)] = Field(
        default=2, description="A stream whose engine dies mid-way is continued on another engine that can serve "
        "it (the prompt plus the tokens generated so far, max_tokens reduced), at most this many times; 0: off "
        "(it ends with an error event).")
    engine_restart_limit: Annotated[int, Field(ge=0)] = Field(
        default=5, description="decode-worker restarts a dead or wedged decode engine itself, keeping its front "
        "door open, at most this many times within engine_restart_window_s; one more and it exits non-zero (for "
        "systemd/supervisord to restart it).")
    engine_restart_window_s: PositiveFloat = Field(
        default=600.0, description="The window of engine_restart_limit.")
    max_body_bytes: Annotated[int, Field(gt=0)] = Field(
        default=8 << 20, description="Larger request bodies get 413 before they are read into memory.")
    # One request's work, bounded (admission counts requests): past a limit, 400 naming it.
    max_choices: Annotated[int, Field(ge=1)] = Field(
        default=4, description="A request's `n` and `best_of` (sequences generated for it) at most this; past it, 400.")
    max_prompts: Annotated[int, Field(ge=1)] = Field(
        default=8, description="Prompts in one /v1/completions request (a list of them) at most this; past it, 400.")
    max_output_tokens: Annotated[int, Field(ge=1)] = Field(
        default=4096, description="A request's `max_tokens` / `max_completion_tokens` at most this; past it, 400 "
        "(absent: the engine stops at the model's length).")
    max_logprobs: Annotated[int, Field(ge=0)] = Field(
        default=20, description="`logprobs`, `top_logprobs` and `prompt_logprobs` (log-probabilities of every prompt "
        "token: a whole prompt's worth of vocabulary work) at most this; past it, 400.")
    keep_alive_timeout_s: PositiveFloat = Field(
        default=75.0, description="The front door closes a keep-alive connection idle this long. Behind a load "
        "balancer it must exceed the balancer's own idle timeout (60 s on most), or a request races the close.")
    header_timeout_s: PositiveFloat = Field(
        default=10.0, description="A request's headers must be complete this long after its first byte, or the "
        "connection is closed (slow-header clients hold no connection for good).")
    body_timeout_s: PositiveFloat = Field(
        default=30.0, description="A request's body must arrive within this long of its headers (else 408).")
    stream_idle_timeout_s: PositiveFloat = Field(
        default=60.0, description="A stream whose engine sends no event for this long (after its first token) is "
        "broken: it goes on on another engine (migration) or ends with an error event, instead of being held until "
        "the engine is found wedged.")
    write_timeout_s: PositiveFloat = Field(
        default=30.0, description="A streamed answer whose client takes none of its bytes for this long is dropped: "
        "its engine request is aborted and its admission slot freed.")
    max_connections: Annotated[int, Field(gt=0)] = Field(
        default=4096, description="Open connections to the front door at once; past it, 503 (keep it below the "
        "unit's LimitNOFILE).")
    api_keys_file: Path | None = Field(
        default=None, description="API keys for the front door, one per line (root:disagg 0640); "
        "$DISAGG_API_KEYS (comma-separated) adds more. None and no env: no authentication.")
    allow_unauthenticated: bool = Field(
        default=False, description="Let the front door listen beyond loopback without API keys. "
        "Without this, that is a config error.")

    @model_validator(mode="after")
    def _no_open_front_door(self) -> DecodeWorkerConfig:
        if (not _is_loopback(self.host) and self.api_keys_file is None and not os.environ.get("DISAGG_API_KEYS")
                and not self.allow_unauthenticated):
            raise ValueError(
                f"host {self.host} is beyond loopback and no API keys are configured: set api_keys_file "
                "(or $DISAGG_API_KEYS), or allow_unauthenticated: true to serve anyone who can reach the port")
        return self


class KVPathConfig(_Section):
    """Supervision of the KV path itself (prefill engine -> LMCache -> decode engine)."""

    store_timeout_s: PositiveFloat = Field(
        default=2.0,
        description="prefill-worker answers once the prompt's full chunks are in LMCache, or after this long "
        "(then it says how many are).",
    )
    canary_interval_s: PositiveFloat = Field(
        default=15.0, description="decode-worker sends a canary prompt through the whole path this often: through "
        "one prefill-worker in turn (each is checked every N intervals with N of them), through every one at start, "
        "when asked for (a request's KV went missing, LMCache or a prefill-worker came back) and while one fails.")
    canary_timeout_s: PositiveFloat = Field(
        default=30.0, description="Deadline of each hop of one canary (prefill call, decode call).")
    canary_min_spacing_s: float = Field(
        default=5.0, ge=0, description="At least this long between two canaries: the extra ones that recomputed "
        "requests and decode timeouts ask for are merged into one (each canary stores a chunk in LMCache, "
        "~32 MiB on a 7B model).")
    restart_after_failures: Annotated[int, Field(ge=1)] = Field(
        default=3, description="Canary failures in a row at the decode engine (with no engine progress) "
        "before decode-worker exits to be restarted.")
    engine_stall_timeout_s: PositiveFloat = Field(
        default=180.0,
        description="An engine with requests in it that makes no progress (no token computed, /health "
        "unanswered) for this long is wedged: its worker exits non-zero and is restarted.",
    )


class LogsConfig(_Section):
    """Where the children's output goes (engines, LMCache's server and coordinator), and how much of it."""

    children: Literal["auto", "file", "journal"] = Field(
        default="auto", description="file: <log_dir>/<child>.log, rotated by size. journal: that file and systemd's "
        "journal, a stream per child named after it (journalctl -u <unit> -t decode-worker-engine). auto: journal "
        "when the daemon's own output goes to the journal (systemd's $JOURNAL_STREAM), else file.")
    max_bytes: Annotated[int, Field(ge=1 << 16)] = Field(
        default=100 << 20, description="A child's log file is rotated (<name>.log.1, ...) once it is this big.")
    backups: Annotated[int, Field(ge=0, le=100)] = Field(
        default=5, description="Rotated files kept per child (0: the file is emptied instead).")
    lmcache_level: Literal["debug", "info", "warning", "error"] = Field(
        default="warning", description="LMCache's log level in every child ($LMCACHE_LOG_LEVEL); info logs a line "
        "per KV store and retrieve.")
    access_log: bool = Field(
        default=False, description="Keep the children's HTTP access lines for health checks and scrapes that "
        "succeeded (one per heartbeat and per scrape); other access lines are always kept.")


class ReadinessConfig(_Section):
    """The readiness protocol: state files, heartbeats, drains."""

    heartbeat_interval_s: PositiveFloat = Field(
        default=2.0, description="Each daemon rewrites its state file (and checks its child) this often.")
    heartbeat_timeout_s: PositiveFloat = Field(
        default=15.0, description="A state file whose heartbeat is older than this is stale (its daemon hung or gone).")
    dependency_timeout_s: PositiveFloat = Field(
        default=900.0, description="A daemon fails if a dependency is not ready this long after its start.")
    drain_grace_s: float = Field(
        default=0.0, ge=0, description="On SIGTERM, /health answers 503 this long while requests are still served "
        "and accepted, then the daemon stops accepting and drains: long enough for a load balancer's health "
        "checks to move traffic away (its interval times its unhealthy threshold).")
    drain_timeout_s: PositiveFloat = Field(
        default=30.0, description="On SIGTERM, in-flight requests get this long to finish; the child as long to exit.")
    watchdog: bool = Field(
        default=True, description="Under systemd, send WATCHDOG=1 each heartbeat while the child is healthy.")

    @model_validator(mode="after")
    def _timeout_exceeds_interval(self) -> ReadinessConfig:
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed twice heartbeat_interval_s")
        return self

    @property
    def stop_budget_s(self) -> int:
        """How long a daemon's stop may take: the drain grace, the drain, the child's own exit (as long again)
        and a margin. supervisord's ``stopwaitsecs`` and systemd's ``TimeoutStopSec=`` are rendered from it,
        so the supervisor never kills a daemon in the middle of its drain."""
        return int(self.drain_grace_s + 2 * self.drain_timeout_s + 15 + 0.999)


_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
HOST_ID_ENV = "DISAGG_HOST_ID"
COORDINATOR = "lmcache-coordinator"
_HOST_DAEMON_RE = re.compile(r"^(lmcache-server|lmcache-coordinator|(prefill|decode)-worker(@[A-Za-z0-9_-]{1,32})?)$")


class LMCacheCoordinatorConfig(DaemonConfig):
    """lmcache-coordinator (several hosts only)."""

    metrics_port: Port = 9103


class HostConfig(_Section):
    """One host of a cluster."""

    address: str = Field(description="This host's address on the private network (what its peers connect to).")
    daemons: list[str] = Field(description="The daemons this host runs: lmcache-server, lmcache-coordinator, "
                               "prefill-worker[@instance], decode-worker[@instance].")

    @field_validator("address")
    @classmethod
    def _ip(cls, address: str) -> str:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"not an IP address: {address!r}") from None
        if ip.is_loopback or ip.is_unspecified:
            raise ValueError(f"{address} cannot be reached from another host")
        return address

    @field_validator("daemons")
    @classmethod
    def _names(cls, daemons: list[str]) -> list[str]:
        for name in daemons:
            if not _HOST_DAEMON_RE.match(name):
                raise ValueError(f"unknown daemon {name!r} (lmcache-server, lmcache-coordinator, "
                                 "prefill-worker[@instance], decode-worker[@instance])")
        if len(set(daemons)) != len(daemons):
            raise ValueError("a daemon is listed twice")
        return daemons


class ClusterConfig(_Section):
    """Several hosts: which runs what, and how their LMCache servers share KV (LMCache's P2P layer)."""

    private_network: str = Field(description="CIDR of the network the hosts share. LMCache's request, P2P and "
                                 "coordinator ports and the prefill API bind only on addresses in it: none of "
                                 "them has authentication.")
    hosts: dict[str, HostConfig]
    secret_file: Path | None = Field(
        default=None, description="A shared secret (at least 16 characters, the same file on every host, readable "
        "only by the daemons' user): our daemons' calls across hosts carry it, and the prefill API answers 401 "
        "without it (docs/security.md). null: the prefill API takes any caller on the private network (a warning; "
        "set it once every host runs a release that knows it: a rolling upgrade, then this key and a second roll).")
    coordinator_port: Port = Field(default=9300, description="LMCache's coordinator (membership only, no KV).")
    p2p_port: Port = Field(default=8555, description="Each lmcache-server's P2P transfer-channel port.")
    p2p_transfer_engine: Literal["mooncake_te", "nixl"] = Field(
        default="mooncake_te", description="How KV moves between LMCache servers: mooncake_te (TCP, or RDMA "
        "with MC_TE_PROTOCOL=rdma) or nixl (RDMA/UCX on GPU clusters).")
    p2p_lookup_timeout_s: PositiveFloat = Field(
        default=1.0, description="A peer's lookup answer later than this counts as a miss (LMCache's default: "
        "30 s, past the engines' control-message deadline).")
    p2p_load_timeout_s: PositiveFloat = Field(default=20.0, description="A peer's KV load slower than this fails "
                                              "(the decode engine then recomputes).")
    instance_timeout_s: PositiveFloat = Field(
        default=10.0, description="The coordinator forgets an lmcache-server silent this long.")
    heartbeat_interval_s: PositiveFloat = Field(
        default=2.0, description="lmcache-servers heartbeat the coordinator and re-read its peer list this often.")

    @field_validator("private_network")
    @classmethod
    def _network(cls, network: str) -> str:
        try:
            net = ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"not a network (CIDR): {network!r}") from None
        if not net.is_private or net.is_loopback or net.prefixlen < 8:
            raise ValueError(f"{network} is not a private network (e.g. 10.0.0.0/24): the ports it opens have no auth")
        return str(net)

    @model_validator(mode="after")
    def _layout(self) -> ClusterConfig:
        net = ipaddress.ip_network(self.private_network)
        where: dict[str, str] = {}
        for host_id, host in self.hosts.items():
            if not _INSTANCE_RE.match(host_id):
                raise ValueError(f"hosts: name {host_id!r} must be 1-32 of A-Z a-z 0-9 _ -")
            if ipaddress.ip_address(host.address) not in net:
                raise ValueError(f"hosts.{host_id}.address: {host.address} is not in private_network {net}")
            for name in host.daemons:
                if name != "lmcache-server" and name in where:
                    raise ValueError(f"hosts.{host_id}.daemons: {name} already runs on {where[name]}")
                where.setdefault(name, host_id)
            if any(n.endswith("-worker") or "-worker@" in n for n in host.daemons) and \
                    "lmcache-server" not in host.daemons:
                raise ValueError(f"hosts.{host_id}.daemons: a host with workers runs its own lmcache-server")
        addresses = [h.address for h in self.hosts.values()]
        if len(set(addresses)) != len(addresses):
            raise ValueError("hosts: two hosts have the same address")
        coordinators = [h for h, c in self.hosts.items() if COORDINATOR in c.daemons]
        if len(coordinators) != 1:
            raise ValueError(f"hosts: exactly one host runs {COORDINATOR} (found {len(coordinators)})")
        return self

    @property
    def coordinator_host(self) -> str:
        return next(h for h, c in self.hosts.items() if COORDINATOR in c.daemons)

    @property
    def coordinator_url(self) -> str:
        return f"http://{self.hosts[self.coordinator_host].address}:{self.coordinator_port}"

    def host_of(self, daemon: str) -> str | None:
        """The host that runs ``daemon`` (lmcache-server runs on several: None)."""
        return next((h for h, c in self.hosts.items() if daemon in c.daemons), None)


def local_addresses(candidates: list[str]) -> list[str]:
    """Those of ``candidates`` that are addresses of this machine (a socket can bind them)."""
    found = []
    for address in candidates:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((address, 0))
            except OSError:
                continue
        found.append(address)
    return found


WORKER_KINDS = {"prefill-worker": "prefill_worker", "decode-worker": "decode_worker"}


@dataclass(frozen=True)
class DaemonId:
    """Which daemon: its kind and, for one of several workers of a kind, its instance."""

    kind: str  # lmcache-server, prefill-worker, decode-worker
    instance: str | None = None

    def __str__(self) -> str:
        """The daemon's name (state file, logs, metrics): ``prefill-worker`` or ``prefill-worker@gpu1``."""
        return f"{self.kind}@{self.instance}" if self.instance else self.kind

    @classmethod
    def parse(cls, name: str) -> DaemonId:
        kind, _, instance = name.partition("@")
        return cls(kind, instance or None)


def worker_name(kind: str, instance: str | None) -> str:
    """The daemon name of one worker: ``prefill-worker`` or ``prefill-worker@gpu1``."""
    return str(DaemonId(kind, instance))


class Config(_Section):
    """The whole file: every daemon of the deployment reads it."""

    runtime_dir: Path = Field(description="Where the daemons' state files live (one per daemon; owned by the daemons' user).")
    log_dir: Path = Field(description="Where the children's output goes (engines, LMCache, lookups).")
    model: ModelConfig
    lmcache: LMCacheConfig = LMCacheConfig()
    lmcache_server: LMCacheServerConfig = LMCacheServerConfig()
    prefill_worker: PrefillWorkerConfig = PrefillWorkerConfig(device="cpu", kv_cache_memory_bytes=268435456)
    decode_worker: DecodeWorkerConfig = DecodeWorkerConfig(device="cpu", kv_cache_memory_bytes=268435456)
    kv_path: KVPathConfig = KVPathConfig()
    readiness: ReadinessConfig = ReadinessConfig()
    logs: LogsConfig = LogsConfig()
    lmcache_coordinator: LMCacheCoordinatorConfig = LMCacheCoordinatorConfig()
    cluster: ClusterConfig | None = Field(
        default=None, description="Several hosts (docs/hosts.md). None: everything on this one.")
    source: Path | None = Field(default=None, exclude=True)
    host_id: str | None = Field(default=None, exclude=True)  # which of cluster.hosts this process runs on

    @model_validator(mode="after")
    def _cluster_names_workers(self) -> Config:
        if self.cluster is None:
            return self
        workers = [n for kind in WORKER_KINDS for n in self.workers(kind)]
        placed = {n for h in self.cluster.hosts.values() for n in h.daemons if n.endswith("-worker") or "@" in n}
        for name in sorted(placed - set(workers)):
            raise ValueError(f"cluster.hosts: {name} is not a worker this config defines ({', '.join(workers)})")
        for name in workers:
            if name not in placed:
                raise ValueError(f"cluster.hosts: no host runs {name}")
        return self

    # -- which host, which daemons ---------------------------------------------------------
    def on_host(self, host_id: str | None = None) -> Config:
        """This config as seen from one host of the cluster: ``host_id``, else $DISAGG_HOST_ID, else the
        host whose address this machine has. Unchanged without a cluster. ConfigError when it cannot tell."""
        if self.cluster is None:
            return self
        hosts = self.cluster.hosts
        host_id = host_id or os.environ.get(HOST_ID_ENV) or None
        if host_id is None:
            mine = local_addresses([h.address for h in hosts.values()])
            matches = [h for h, c in hosts.items() if c.address in mine]
            if len(matches) != 1:
                raise ConfigError(
                    f"{self.source}: cluster.hosts: cannot tell which host this is ({len(matches)} of the hosts' "
                    f"addresses are this machine's): pass --host-id NAME or set ${HOST_ID_ENV}")
            host_id = matches[0]
        if host_id not in hosts:
            raise ConfigError(f"{self.source}: cluster.hosts: no host {host_id!r} (defined: {', '.join(hosts)})")
        return self.model_copy(update={"host_id": host_id})

    @property
    def host(self) -> HostConfig | None:
        """This host's entry in the cluster (None: one box)."""
        if self.cluster is None:
            return None
        if self.host_id is None:
            raise RuntimeError("cluster config used before on_host()")
        return self.cluster.hosts[self.host_id]

    @property
    def lmcache_address(self) -> str:
        """Where this host's LMCache server takes requests (engines, lookups and, in a cluster, its peers)."""
        host = self.host
        return host.address if host is not None else self.lmcache.host

    def address_of(self, daemon: str) -> str:
        """The address a worker's API listens on: its host's on the private network, else the config's."""
        if self.cluster is not None:
            host_id = self.cluster.host_of(daemon)
            if host_id is not None and daemon != "lmcache-server":
                return self.cluster.hosts[host_id].address
        kind = DaemonId.parse(daemon).kind
        return self.workers(kind)[daemon].host

    def listen_address(self, daemon: str) -> str:
        """Where a worker's API listens: a prefill-worker on its host's private address in a cluster (for the
        decode hosts), a decode-worker's front door where its ``host`` says."""
        kind = DaemonId.parse(daemon).kind
        return self.address_of(daemon) if kind == "prefill-worker" else self.workers(kind)[daemon].host

    def local_engine_ranks(self) -> int:
        """The engine ranks that connect to this host's LMCache server (every local worker's engine)."""
        return sum(w.tensor_parallel_size for kind in WORKER_KINDS for name, w in self.workers(kind).items()
                   if self.is_local(name))

    def lmcache_workers(self) -> tuple[int, int]:
        """LMCache's (--max-gpu-workers, --max-cpu-workers): the config's, else derived from the engine ranks."""
        ranks = max(1, self.local_engine_ranks())
        lm = self.lmcache
        return (lm.max_gpu_workers or 2 * ranks, lm.max_cpu_workers or ranks + 2)

    @property
    def lmcache_restarts_on_engine_loss(self) -> bool:
        """Does lmcache-server restart LMCache when a local engine dies without a planned stop?"""
        policy = self.lmcache.restart_on_engine_loss
        if policy != "auto":
            return policy == "always"
        return any(w.device.startswith("cuda") for kind in WORKER_KINDS
                   for name, w in self.workers(kind).items() if self.is_local(name))

    def is_local(self, daemon: str) -> bool:
        """Does ``daemon`` run on this machine (its state file is here)?"""
        host = self.host
        return host is None or daemon in host.daemons

    @model_validator(mode="after")
    def _resolve_instances(self) -> Config:
        for section in WORKER_KINDS.values():
            base: WorkerConfig = getattr(self, section)
            for name, override in base.instances.items():
                if not _INSTANCE_RE.match(name):
                    raise ValueError(f"{section}.instances: name {name!r} must be 1-32 of A-Z a-z 0-9 _ -")
                if not isinstance(override, dict):
                    raise ValueError(f"{section}.instances.{name}: must be a mapping of keys to override")
                if "instances" in override:
                    raise ValueError(f"{section}.instances.{name}.instances: unknown key")
                merged = {**base.model_dump(exclude={"instances"}), **override}
                try:
                    type(base).model_validate(merged)
                except ValidationError as exc:
                    raise ValueError(_describe(exc.errors()[0], f"{section}.instances.{name}")) from None
        return self

    @model_validator(mode="after")
    def _engines_agree_on_kv(self) -> Config:
        every = {(kind, name): kv_engine_args(w.extra_engine_args) for kind in WORKER_KINDS
                 for name, w in self.workers(kind).items()}
        (first_kind, first), reference = next(iter(every.items()))
        for (kind, name), flags in every.items():
            for flag in sorted(set(flags) | set(reference)):
                if flags.get(flag) != reference.get(flag):
                    def shown(v: str | None) -> str:
                        return "not set" if v is None else (repr(v) if v else "set")
                    raise ValueError(
                        f"{WORKER_KINDS[first_kind]}.extra_engine_args ({first}) and {WORKER_KINDS[kind]}."
                        f"extra_engine_args ({name}) disagree on {flag} ({shown(reference.get(flag))} vs "
                        f"{shown(flags.get(flag))}): it changes what the KV cache holds, and an engine reading KV "
                        "another wrote with other settings answers wrong with HTTP 200; give every worker the same")
        return self

    @model_validator(mode="after")
    def _shared_gpus_sized(self) -> Config:
        on: dict[tuple[str | None, str], list[str]] = {}
        for kind in WORKER_KINDS:
            for name, w in self.workers(kind).items():
                for gpu in gpu_indices(w.device):  # engines sharing any GPU (one of several, too)
                    host = self.cluster.host_of(name) if self.cluster is not None else None
                    on.setdefault((host, f"cuda:{gpu}"), []).append(name)
        for (_, device), names in on.items():
            unsized = [n for n in names if self._worker_by_name(n).kv_cache_memory_bytes is None]
            if len(names) > 1 and unsized:
                keys = ", ".join(f"{WORKER_KINDS[DaemonId.parse(n).kind]}" + (
                    f".instances.{DaemonId.parse(n).instance}" if DaemonId.parse(n).instance else "")
                    + ".kv_cache_memory_bytes" for n in unsized)
                raise ValueError(
                    f"{', '.join(names)} share {device} and {', '.join(unsized)} sized only by "
                    "gpu_memory_utilization: the second engine to start fails ('No available memory for the cache "
                    "blocks': vLLM's memory profile counts the other engine's memory as used); set "
                    f"{keys} (e.g. 21474836480, 20 GiB each on one 141 GB H200; etc/disagg-1gpu.yaml)")
        return self

    @model_validator(mode="after")
    def _same_parallel_layout(self) -> Config:
        sizes = {(kind, name): w.tensor_parallel_size for kind in WORKER_KINDS
                 for name, w in self.workers(kind).items()}
        (first_kind, first), reference = next(iter(sizes.items()))
        for (kind, name), size in sizes.items():
            if size != reference:
                raise ValueError(
                    f"{WORKER_KINDS[first_kind]}.device ({first}: {reference} GPU(s)) and {WORKER_KINDS[kind]}.device "
                    f"({name}: {size} GPU(s)) give their engines different tensor-parallel sizes: LMCache keys KV by "
                    "the engine's world size and rank, so KV one computes would never be found by the other; give "
                    "every engine as many GPUs")
        return self

    def _worker_by_name(self, name: str) -> WorkerConfig:
        return self.workers(DaemonId.parse(name).kind)[name]

    def warnings(self) -> list[str]:
        """What is legal but probably not meant: each names the keys (``check-config`` prints them; the
        daemons log them at start)."""
        out = []
        if self.cluster is not None and self.cluster.secret_file is None:
            out.append("cluster.secret_file is not set: the prefill API takes any caller on the private network "
                       "(its /whole route generates whole answers, past the front door's keys and admission); "
                       "`disaggctl install` writes a secret, docs/hosts.md says how to roll it in")
        r, d = self.readiness, self.decode_worker
        longest = max(d.request_timeout_s, d.first_token_timeout_s)
        if r.drain_timeout_s < longest:
            out.append(
                f"readiness.drain_timeout_s ({r.drain_timeout_s:g}) is shorter than decode_worker.request_timeout_s "
                f"({d.request_timeout_s:g}) / first_token_timeout_s ({d.first_token_timeout_s:g}): a stop, restart or "
                f"deploy cuts requests that run longer than {r.drain_timeout_s:g}s (their clients see an error; "
                "streams are not migrated on a planned stop); raise drain_timeout_s or lower the request deadlines. "
                f"Stops then take up to {r.stop_budget_s}s (rendered into supervisord's stopwaitsecs and systemd's "
                "TimeoutStopSec)")
        return out

    def workers(self, kind: str) -> dict[str, WorkerConfig]:
        """Daemon name -> resolved settings of every worker of ``kind`` ("prefill-worker", ...)."""
        base: WorkerConfig = getattr(self, WORKER_KINDS[kind])
        if not base.instances:
            return {kind: base}
        return {
            worker_name(kind, name): type(base).model_validate({**base.model_dump(exclude={"instances"}), **o})
            for name, o in base.instances.items()
        }

    def decode_workers(self) -> dict[str, DecodeWorkerConfig]:
        """Daemon name -> resolved settings of every decode-worker."""
        return {name: w for name, w in self.workers("decode-worker").items() if isinstance(w, DecodeWorkerConfig)}

    def shared_front_door(self) -> tuple[str, int] | None:
        """(host, port) of the box's one endpoint (``decode_worker.shared_port``), None when there is none."""
        for w in self.decode_workers().values():
            if w.shared_port is not None:
                return w.host, w.shared_port
        return None

    def worker(self, kind: str, instance: str | None) -> WorkerConfig:
        """One worker's settings; ConfigError if ``instance`` does not match the config."""
        section = WORKER_KINDS[kind]
        names = sorted(getattr(self, section).instances)
        if names and instance is None:
            raise ConfigError(f"{self.source}: {section}.instances: this config defines instances "
                              f"({', '.join(names)}): start the daemon with --instance NAME")
        if instance is not None and instance not in names:
            raise ConfigError(f"{self.source}: {section}.instances: no instance {instance!r} "
                              f"(defined: {', '.join(names) or 'none'})")
        return self.workers(kind)[worker_name(kind, instance)]

    def cluster_daemon_names(self) -> list[str]:
        """Every daemon of the whole deployment, dependencies first."""
        names = ["lmcache-server", *self.workers("prefill-worker"), *self.workers("decode-worker")]
        return [COORDINATOR, *names] if self.cluster is not None else names

    def daemon_names(self) -> list[str]:
        """The daemons this machine runs, dependencies first (in a cluster: this host's)."""
        host = self.host
        names = self.cluster_daemon_names()
        return names if host is None else [n for n in names if n in host.daemons]

    @model_validator(mode="after")
    def _one_shared_port(self) -> Config:
        """decode-worker instances that share a port share all of it: the same port, on the same address."""
        doors = {name: w for name, w in self.decode_workers().items() if w.shared_port is not None}
        if not doors:
            return self
        if len(doors) != len(self.decode_workers()):
            raise ValueError("decode_worker.shared_port: set for some instances and not others; set it once, for "
                             "all of them (decode_worker.shared_port), or for none")
        if len({(w.shared_port, w.host) for w in doors.values()}) > 1:
            raise ValueError("decode_worker.shared_port: the instances name different shared ports or hosts; the "
                             "box's one endpoint is one port on one address (set shared_port and host once, "
                             "not per instance)")
        return self

    @model_validator(mode="after")
    def _no_port_clash(self) -> Config:
        owners: dict[int, str] = {}
        for key, port in self.listening_ports().items():
            if port in owners:
                raise ValueError(f"port {port} is used by both {owners[port]} and {key}")
            owners[port] = key
        return self

    def listening_ports(self) -> dict[str, int]:
        """Every port some daemon listens on, by its config key."""
        ports = {
            "lmcache.port": self.lmcache.port,
            "lmcache.http_port": self.lmcache.http_port,
            "lmcache_server.metrics_port": self.lmcache_server.metrics_port,
        }
        if self.cluster is not None:
            ports["cluster.coordinator_port"] = self.cluster.coordinator_port
            ports["cluster.p2p_port"] = self.cluster.p2p_port
            ports["lmcache_coordinator.metrics_port"] = self.lmcache_coordinator.metrics_port
        for kind, section in WORKER_KINDS.items():
            for name, worker in self.workers(kind).items():
                instance = DaemonId.parse(name).instance
                prefix = section if instance is None else f"{section}.instances.{instance}"
                for key in ("port", "engine_port", "metrics_port"):
                    ports[f"{prefix}.{key}"] = getattr(worker, key)
        shared = self.shared_front_door()
        if shared is not None:  # one socket, however many front doors accept on it
            ports["decode_worker.shared_port"] = shared[1]
        return ports


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def config_changes(old: Config, new: Config) -> dict[str, str]:
    """The keys whose values differ between two configs: dotted key -> "old -> new"."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return {key: f"{a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def with_applied(old: Config, new: Config, keys: Iterable[str]) -> Config:
    """The running config after a reload: ``old`` with the values of ``keys`` (dotted, as :func:`config_changes`
    names them) taken from ``new``. What a daemon applied live it now runs, so the next reload compares against it
    (a key set back to its old value is a change again); what needs a restart stays old, and is reported again.
    ``old`` itself when the mix does not validate (the daemon then compares against what it started with)."""
    keys = set(keys)
    if not keys:
        return old
    tree, src = old.model_dump(mode="json"), new.model_dump(mode="json")
    for key in keys:
        *sections, leaf = key.split(".")
        node: dict[str, Any] = tree
        theirs: Any = src
        for section in sections:
            child = node.get(section)
            if not isinstance(child, dict):
                child = node[section] = {}
            node = child
            theirs = theirs.get(section) if isinstance(theirs, dict) else None
        if isinstance(theirs, dict) and leaf in theirs:
            node[leaf] = theirs[leaf]
        else:
            node.pop(leaf, None)
    try:
        return Config.model_validate({**tree, "source": old.source, "host_id": old.host_id})
    except ValidationError as exc:
        log.warning("reload: the running config with %s applied does not validate (%s): later reloads compare "
                    "against the config this daemon started with", ", ".join(sorted(keys)), exc)
        return old


def _describe(err: Any, prefix: str = "") -> str:
    """One pydantic error as "dotted.key: message", the key under ``prefix``."""
    key = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    msg = msg.removeprefix("Value error, ")
    return f"{key}: {msg}" if key else msg


def _format_errors(path: Path, exc: ValidationError) -> str:
    return "\n".join(f"{path}: {_describe(err)}" for err in exc.errors())


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for key in ("runtime_dir", "log_dir"):
        if isinstance(raw.get(key), str):
            raw[key] = str((base / os.path.expanduser(raw[key])).resolve())
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        model["path"] = str((base / os.path.expanduser(model["path"])).resolve())


def parse_config(raw: Any, source: Path, *, require_model: bool = True) -> Config:
    """Validate an already-parsed YAML document; ``source`` names it in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: <top level>: must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    raw["model"] = dict(raw["model"]) if isinstance(raw.get("model"), dict) else raw.get("model")
    if raw["model"] is None:
        raw.pop("model")
    _resolve_paths(raw, source.parent)
    try:
        config = Config.model_validate({**raw, "source": source})
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
    if require_model:
        check_model_present(config)
    return config


def check_model_present(config: Config) -> None:
    path = config.model.path
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{config.source}: model.path: no model at {path} (config.json missing); "
            "make one with `disaggctl make-model` or point model.path at a local model directory"
        )


def config_path(cli_value: str | None) -> Path:
    """The config file to use: --config, then $DISAGG_CONFIG, then etc/disagg.yaml."""
    return Path(cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: Path | str, *, require_model: bool = True) -> Config:
    path = Path(path).absolute()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_config(raw, path, require_model=require_model)
