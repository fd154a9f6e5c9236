"""The one YAML config that all daemons read, validated as a whole.

A bad config is an operator error, not a crash: :func:`load_config` raises
:class:`ConfigError` with one line per problem, each naming the key, and the
daemons exit with :data:`EX_CONFIG` (78) so systemd and supervisord do not
restart-loop on it.

:class:`Config` is the file: its sections (:mod:`daemons.config_sections`), each worker's instances resolved, and the
checks that need several sections. What follows from it on one machine (which daemons run here, where each listens,
the sockets held for them) is :class:`daemons.deployment.Deployment`'s.

Relative paths in the file resolve against the directory that holds the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from daemons.config_sections import (
    INSTANCE_NAME_RE,
    ClusterConfig,
    DecodeWorkerConfig,
    KVPathConfig,
    LMCacheConfig,
    LMCacheCoordinatorConfig,
    LMCacheServerConfig,
    LogsConfig,
    ModelConfig,
    PrefillWorkerConfig,
    ReadinessConfig,
    WorkerConfig,
    _Section,
)
from daemons.engine_flags import gpu_indices, kv_engine_args
from daemons.names import WORKER_KINDS, DaemonId, worker_name

log = logging.getLogger(__name__)

EX_CONFIG = 78
DEFAULT_CONFIG = "etc/disagg.yaml"
CONFIG_ENV = "DISAGG_CONFIG"


class ConfigError(Exception):
    """The config file is missing, unreadable or invalid; the message names the key."""


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

    @model_validator(mode="after")
    def _resolve_instances(self) -> Config:
        for section in WORKER_KINDS.values():
            base: WorkerConfig = getattr(self, section)
            for name, override in base.instances.items():
                if not INSTANCE_NAME_RE.match(name):
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
        shared = {w.shared_port for w in self.decode_workers().values() if w.shared_port is not None}
        if shared:  # one socket, however many front doors accept on it (_one_shared_port)
            ports["decode_worker.shared_port"] = min(shared)
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
        return Config.model_validate({**tree, "source": old.source})
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
