"""What the front door is told: the decode-worker's settings it reads, from the config (:meth:`from_config`).
Replaced whole on SIGHUP (decode_worker's ``apply_config``): the fields here are the keys a reload changes live."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from daemons.config_sections import DecodeWorkerConfig
from daemons.edge.request_limits import WorkLimits


def _default(name: str) -> Any:
    """The config's default for ``decode_worker.<name>``: the front door has no defaults of its own."""
    return DecodeWorkerConfig.model_fields[name].default


@dataclass(frozen=True)
class FrontDoorSettings:
    """What the front door is told, from the decode-worker's config (:meth:`from_config`)."""

    engine_url: str
    prefill_timeout_s: float = _default("prefill_timeout_s")
    first_token_timeout_s: float = _default("first_token_timeout_s")
    request_timeout_s: float = _default("request_timeout_s")
    max_concurrent_requests: int = _default("max_concurrent_requests")
    max_queued_requests: int = _default("max_queued_requests")
    queue_timeout_s: float = _default("queue_timeout_s")
    max_body_bytes: int = _default("max_body_bytes")
    disaggregate_min_tokens: int = _default("disaggregate_min_tokens")
    short_prompt_max_in_flight: int = _default("short_prompt_max_in_flight")
    balance_short_prompts: bool = _default("balance_short_prompts")
    routing: str = _default("routing")
    overflow_backlog_tokens: int = _default("overflow_backlog_tokens")
    overflow_max_local_tokens: int = _default("overflow_max_local_tokens")
    failover_max_in_flight: int = _default("failover_max_in_flight")
    migration_attempts: int = _default("migration_attempts")
    kv_crosscheck: bool = _default("kv_crosscheck")
    access_log: bool = _default("access_log")
    kv_crosscheck_tolerance: float = _default("kv_crosscheck_tolerance")
    body_timeout_s: float = _default("body_timeout_s")
    write_timeout_s: float = _default("write_timeout_s")
    stream_idle_timeout_s: float = _default("stream_idle_timeout_s")
    max_choices: int = _default("max_choices")
    max_prompts: int = _default("max_prompts")
    max_output_tokens: int = _default("max_output_tokens")
    max_logprobs: int = _default("max_logprobs")

    @property
    def work_limits(self) -> WorkLimits:
        return WorkLimits(self.max_choices, self.max_prompts, self.max_output_tokens, self.max_logprobs)

    @classmethod
    def from_config(cls, worker: DecodeWorkerConfig, engine_url: str) -> FrontDoorSettings:
        names = [f.name for f in fields(cls) if f.name != "engine_url"]
        return cls(engine_url=engine_url, **{name: getattr(worker, name) for name in names})


# The decode_worker keys a reload (SIGHUP) applies without a restart, in its section or one instance's: the front
# door's settings and the API keys file. Every other key of the config needs a restart of the daemon that reads it
# (the reload says which; the configuration reference marks each key).
SETTINGS_KEYS = frozenset(f.name for f in fields(FrontDoorSettings) if f.name != "engine_url")
LIVE_KEYS = SETTINGS_KEYS | {"api_keys_file"}
# Live keys another daemon also reads, at its start only: there a change waits for that daemon's restart.
ALSO_READ_AT_START = {"max_body_bytes": "prefill-worker"}  # the prefill API's own body cap
