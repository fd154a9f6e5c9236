"""The small names every part of disagg shares: daemon kinds and names, and how a request's prompt reached an engine.

This is the one place the request paths (``x-disagg-path``) and their reasons are listed; the metrics'
label values, the front door's headers and the generated reference (``docs/reference/metrics.md``) are
all read from here. Each member's description is what the docs say of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Described(StrEnum):
    """A str-enum whose members carry one line for the docs."""

    description: str

    def __new__(cls, value: str, description: str = "") -> Described:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member


class DaemonKind(Described):
    LMCACHE_SERVER = "lmcache-server", "LMCache's multi-process server: holds the KV between the engines."
    PREFILL_WORKER = "prefill-worker", "A vLLM engine as KV producer and the prefill API."
    DECODE_WORKER = "decode-worker", "A vLLM engine as KV consumer and the public front door."
    LMCACHE_COORDINATOR = "lmcache-coordinator", "LMCache's coordinator (several hosts only: membership, no KV)."


# The worker kinds and the config section each is read from.
WORKER_KINDS = {"prefill-worker": "prefill_worker", "decode-worker": "decode_worker"}
COORDINATOR = "lmcache-coordinator"
# The name of the box's one endpoint (decode_worker.shared_port): the socket every decode-worker accepts on, besides
# its own (the holder's name for it, and the FileDescriptorName of disagg-front-door.socket).
SHARED_FRONT_DOOR = "front-door"


@dataclass(frozen=True)
class DaemonId:
    """Which daemon: its kind and, for one of several workers of a kind, its instance."""

    kind: str  # lmcache-server, prefill-worker, decode-worker, lmcache-coordinator
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


class RequestPath(Described):
    """How a request's prompt reached the engine that generated its answer (``x-disagg-path``)."""

    DISAGGREGATED = "disaggregated", "The decode engine loaded every full chunk of the prompt from LMCache."
    RECOMPUTED = "recomputed", ("Prefill ran, but the decode engine computed the prompt anyway "
                                "(`x-disagg-recompute-reason`).")
    FALLBACK = "fallback", ("Prefill was skipped or failed; the decode engine computed the prompt "
                            "(`x-disagg-fallback-reason`).")
    SHORT_PROMPT = "short_prompt", ("Shorter than `decode_worker.disaggregate_min_tokens`: no prefill call, the "
                                    "decode engine computed it (by design, not a fallback).")
    PREFILL_BUSY = "prefill_busy", ("Prefill calls in flight held `decode_worker.overflow_backlog_tokens`: the "
                                    "decode engine computed it (by design, not a fallback).")
    DECODE_BUSY = "decode_busy", ("`balance_short_prompts`: a short prompt under load, the decode engine busier "
                                  "than a prefill engine, which computed and decoded it whole (by design).")
    KV_MISMATCH = "kv_mismatch", ("A greedy request whose first token from the decode engine, which loaded the KV, "
                                  "is not the prefill engine's own (`x-disagg-kv-check: mismatch`): the KV means "
                                  "something else than the prompt. Served as computed, counted, alerted; the "
                                  "canary checks the path at once.")
    FAILOVER = "failover", ("The decode engine could not serve (loading, reloading, wedged, or its call failed): a "
                            "prefill engine computed and decoded the request whole, within "
                            "`decode_worker.failover_max_in_flight` at once.")
    SIBLING = "sibling", ("The decode engine could not serve: another decode-worker of the box "
                          "(`decode_worker.instances`) whose engine serves took the request whole through its own "
                          "front door (its prefill call, its decode engine), before any failover to a prefill engine.")

    @property
    def by_design(self) -> bool:
        """The front door chose to skip the prefill call (not a fallback, not a KV miss)."""
        return self in (RequestPath.SHORT_PROMPT, RequestPath.PREFILL_BUSY, RequestPath.DECODE_BUSY)

    @property
    def whole_on_prefill(self) -> bool:
        """A prefill engine served the request start to end (no KV moved)."""
        return self in (RequestPath.DECODE_BUSY, RequestPath.FAILOVER)


class RecomputeReason(Described):
    KV_NOT_STORED = "kv_not_stored", "LMCache did not hold the prompt's full chunks when prefill answered."
    KV_NOT_LOADED = "kv_not_loaded", "LMCache held them, but the decode engine loaded fewer."
    NO_FULL_CHUNK = "no_full_chunk", "The prompt is shorter than one chunk: there was nothing to load."


class FallbackReason(Described):
    LMCACHE_UNAVAILABLE = "lmcache_unavailable", "lmcache-server is not ready."
    PREFILL_UNAVAILABLE = "prefill_unavailable", "No prefill-worker is ready."
    PREFILL_TIMEOUT = "prefill_timeout", "The prefill call took longer than `decode_worker.prefill_timeout_s`."
    PREFILL_UNREACHABLE = "prefill_unreachable", "The prefill call could not connect, or the connection broke."
    PREFILL_LOST = "prefill_lost", "The prefill-worker was found dead, hung or unreachable while the call was in flight."
    PREFILL_ERROR = "prefill_error", "prefill-worker answered with a 5xx."
    PREFILL_REJECTED = "prefill_rejected", ("The prefill engine refused the request (a 4xx: a prompt over "
                                            "max_model_len, a bad parameter); the client gets that answer.")
    KV_PATH_BROKEN = "kv_path_broken", "The KV-path canary says a hop is broken."


class ErrorKind(Described):
    BAD_REQUEST = "bad_request", "The request was malformed (400)."
    TOO_LARGE = "too_large", "The body was over `decode_worker.max_body_bytes` (413)."
    UNAUTHORIZED = "unauthorized", "No or a wrong API key (401)."
    OVERLOADED = "overloaded", "Admission control refused it (429 + Retry-After)."
    CLIENT_GONE = "client_gone", "The client went away; its engine requests were aborted."
    SLOW_CLIENT = "slow_client", "The request's body did not arrive within `decode_worker.body_timeout_s` (408)."
    ENGINE_UNAVAILABLE = "engine_unavailable", "The engine could not be reached, or its stream broke (503)."
    STREAM_BROKEN = "stream_broken", "The engine's stream broke after the first event (the stream ends with an error event)."
    NO_ENGINE = "no_engine", ("No engine could serve it: the decode engine down and no prefill-worker ready, or "
                              "failover at its bound (503 + Retry-After).")
    DECODE_TIMEOUT = "decode_timeout", ("No first token within `first_token_timeout_s`, or no answer within "
                                        "`request_timeout_s` (503 + Retry-After).")
    INTERNAL = "internal", ("A bug: an unexpected exception while serving it (500, or a stream's error event); "
                            "the log has its traceback.")


class CanaryHop(Described):
    """Which hop of the KV path a canary found broken (``ok``: none)."""

    OK = "ok", "The decode engine reported the canary's chunk as cached."
    PREFILL = "prefill", "The prefill call failed."
    LMCACHE_STORE = "lmcache_store", "LMCache did not hold the chunk after prefill answered."
    DECODE_ENGINE = "decode_engine", "The decode engine did not answer."
    DECODE_LOAD = "decode_load", "The decode engine answered but did not load the chunk."
    P2P_FETCH = "p2p_fetch", "Several hosts: the chunk did not cross from the prefill host's LMCache to the decode host's."
    KV_MISMATCH = "kv_mismatch", ("The decode engine loaded the chunk but chose another first token than the prefill "
                                  "engine (greedy): the KV it loaded means something else.")


class Stage(Described):
    """Where a request's time went (the ``Server-Timing`` header's stages, the stage histogram's labels)."""

    READ = "read", "The request's headers checked and its body read (a slow client shows here)."
    QUEUE = "queue", "Waiting for an admission slot (`decode_worker.max_concurrent_requests`)."
    PREFILL = "prefill", "The prefill call (absent when none was made: short prompts, failover, early fallbacks)."
    STORE = "store", "Of the prefill call: prefill-worker waiting for LMCache to hold the prompt's full chunks."
    DECODE = "decode", ("The engine that generated, from the call to its first token (a request not streamed: to its "
                        "whole answer).")
    TTFT = "ttft", "Arrival to the first token (not streamed: to the answer): read + queue + prefill + decode."
    TOTAL = "total", "Arrival to the last byte."
