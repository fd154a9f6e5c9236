"""The sections of the config file: one pydantic model each, every key with its type, default and description
(``docs/reference/configuration.md`` is generated from them). A section checks what it alone can see; what
needs several sections (ports, engines that must agree, hosts that run the workers) is :class:`daemons.config.Config`'s.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from daemons.engine_flags import ENGINE_OWNED_FLAGS, TP_FLAGS, gpu_indices
from daemons.names import COORDINATOR

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveFloat = Annotated[float, Field(gt=0)]
_DEVICE_RE = re.compile(r"^(cpu|cuda:\d+(-\d+)?(,\d+(-\d+)?)*)$")


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


INSTANCE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
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
            if not INSTANCE_NAME_RE.match(host_id):
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
