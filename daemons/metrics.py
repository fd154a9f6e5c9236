"""The metric catalogue of the request path: what prefill-worker and the front door export.

Label values come from :mod:`daemons.names`; every metric here is listed, with its help text, in the generated
``docs/reference/metrics.md``. What every daemon exports and the /metrics page are in
:mod:`daemons.runtime.exposition`. Registries are injected, so tests get a fresh one.
"""

from __future__ import annotations

import logging

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from daemons.names import CanaryHop, ErrorKind, FallbackReason, RecomputeReason, RequestPath, Stage

log = logging.getLogger(__name__)

# `_created` samples double the series count and no dashboard uses them.
prometheus_client.disable_created_metrics()

# Latency buckets from 5 ms to 2 min: CPU engines are slow, GPU ones fast.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


FALLBACK_REASONS = tuple(r.value for r in FallbackReason)
ERROR_KINDS = tuple(k.value for k in ErrorKind)
PATHS = tuple(p.value for p in RequestPath)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RECOMPUTE_REASONS = tuple(r.value for r in RecomputeReason)
CANARY_RESULTS = tuple(h.value for h in CanaryHop)


class PrefillMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "disagg_prefill_requests", "Prefill requests by outcome.", ["status"], registry=registry
        )
        self.seconds = Histogram(
            "disagg_prefill_duration_seconds", "Time to prefill one prompt (engine call).",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.tokens = Counter("disagg_prefill_tokens", "Prompt tokens prefilled.", registry=registry)
        self.in_flight = Gauge("disagg_prefill_in_flight", "Prefill requests being served.", registry=registry)
        self.store_wait = Histogram(
            "disagg_prefill_store_wait_seconds",
            "After the engine answered, time until LMCache held the prompt's full chunks (or the deadline).",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.kv_tokens = Counter(
            "disagg_prefill_kv_tokens",
            "Full-chunk prompt tokens at answer time: stored (in LMCache) or missing (not there by the deadline).",
            ["state"], registry=registry,
        )
        self.whole_requests = Counter(
            "disagg_prefill_whole_requests",
            "Requests this engine served start to end (path decode_busy: short prompts while the decode engine "
            "was busier), by status.", ["status"], registry=registry,
        )
        self.requests.labels(status="200")
        self.whole_requests.labels(status="200")
        for state in ("stored", "missing"):
            self.kv_tokens.labels(state=state)


LMCACHE_RESTART_REASONS = ("unresponsive", "engine_lost", "peer_replaced")


class LMCacheServerMetrics:
    """lmcache-server watching what it runs: LMCache's answers and its restarts in place."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.restarts = Counter(
            "disagg_lmcache_restarts", "LMCache servers this lmcache-server restarted in place, by reason: "
            "unresponsive (failed its health check or a lookup throughout lmcache.unresponsive_restart_s), "
            "engine_lost (an engine died without a planned stop: lmcache.restart_on_engine_loss), peer_replaced "
            "(several hosts: a peer host's LMCache came back as a new instance).", ["reason"], registry=registry)
        self.unanswered = Gauge(
            "disagg_lmcache_unanswered_seconds", "How long LMCache has failed its health check or a lookup on its "
            "request queue (0 while it answers both).", registry=registry)
        self.probe = Histogram(
            "disagg_lmcache_probe_seconds", "One lookup on LMCache's request queue (what the engines use), as "
            "lmcache-server's probe measured it, by result.", ["result"], buckets=LATENCY_BUCKETS,
            registry=registry)
        for reason in LMCACHE_RESTART_REASONS:
            self.restarts.labels(reason=reason)
        for result in ("ok", "failed"):
            self.probe.labels(result=result)


# Why a front door relays a request to a sibling decode-worker (disagg_sibling_forwards_total{why}).
SIBLING_FORWARD_REASONS = ("load", "round_robin", "full", "engine_down")


class FrontDoorMetrics:
    """The decode-worker's front door, as clients see it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "disagg_requests", "Requests by route and HTTP status.", ["route", "status"], registry=registry
        )
        self.errors = Counter("disagg_request_errors", "Failed requests by kind.", ["kind"], registry=registry)
        self.in_flight = Gauge("disagg_requests_in_flight", "Requests being served.", registry=registry)
        self.prompt_tokens_in_flight = Gauge(
            "disagg_prompt_tokens_in_flight",
            "Estimated prompt tokens being computed: where=prefill (prefill calls in flight), where=decode "
            "(prompts the decode engine computes because prefill was busy, until their first token).",
            ["where"], registry=registry,
        )
        self.on_prefill_engines = Gauge(
            "disagg_requests_on_prefill_engines",
            "Requests in progress that prefill engines serve start to end (path decode_busy, "
            "balance_short_prompts); the rest of disagg_requests_in_flight is the decode engine's or waits on "
            "a prefill call.", registry=registry,
        )
        self.ttft = Histogram(
            "disagg_time_to_first_token_seconds",
            "Request arrival to first token, including the prefill call.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.itl = Histogram(
            "disagg_inter_token_latency_seconds", "Time between streamed tokens.",
            buckets=ITL_BUCKETS, registry=registry,
        )
        self.e2e = Histogram(
            "disagg_request_duration_seconds", "Request arrival to last byte.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.prefill_call = Histogram(
            "disagg_prefill_call_duration_seconds", "Time of the call to prefill-worker, by outcome.",
            ["outcome"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.prompt_tokens = Counter(
            "disagg_prompt_tokens",
            "Prompt tokens by source: kv_cache (reused, not computed by decode) or computed.",
            ["source"], registry=registry,
        )
        self.prompt_len = Histogram(
            "disagg_prompt_length_tokens", "Prompt length in tokens.", buckets=TOKEN_BUCKETS, registry=registry
        )
        self.generated_tokens = Counter("disagg_generation_tokens", "Tokens generated.", registry=registry)
        self.fallbacks = Counter(
            "disagg_fallbacks", "Requests the decode engine prefilled itself, by reason.", ["reason"],
            registry=registry,
        )
        self.stages = Histogram(
            "disagg_request_stage_seconds",
            "Where requests' time went, stage by stage (the Server-Timing header's stages: read, queue, prefill, "
            "store, decode, ttft, total; docs/observe.md).",
            ["stage"], buckets=STAGE_BUCKETS, registry=registry,
        )
        self.kv_checks = Counter(
            "disagg_kv_crosschecks",
            "Greedy requests whose first token from the decode engine was checked against the prefill engine's "
            "own (match, near_tie: another token within the tolerance, mismatch: path kv_mismatch).",
            ["result"], registry=registry,
        )
        self.paths = Counter(
            "disagg_request_paths",
            "Answered requests by the path their prompt took (x-disagg-path; its values are listed in "
            "docs/reference/metrics.md).",
            ["path"], registry=registry,
        )
        self.recomputes = Counter(
            "disagg_recomputes", "Prefilled requests whose decode engine computed the prompt anyway, by reason.",
            ["reason"], registry=registry,
        )
        self.kv_path_ok = Gauge(
            "disagg_kv_path_ok", "1 while the last KV-path canary passed, 0 while it fails.", registry=registry
        )
        self.canaries = Counter(
            "disagg_kv_path_canaries", "KV-path canaries by result (ok, or the hop that broke).", ["result"],
            registry=registry,
        )
        self.canary_seconds = Histogram(
            "disagg_kv_path_canary_duration_seconds", "Time of one KV-path canary.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.decode_engine_up = Gauge(
            "disagg_decode_engine_up", "1 while the decode engine serves; 0 while it loads, reloads or is "
            "silent (requests then fail over to a prefill engine).", registry=registry)
        self.engine_reloads = Counter(
            "disagg_decode_engine_reloads", "Times decode-worker restarted its engine in place (it died, was wedged "
            "or failed the canary at the decode side).", registry=registry)
        self.failover_in_flight = Gauge(
            "disagg_failover_in_flight", "Requests being served whole by a prefill engine because the decode engine "
            "cannot (path failover).", registry=registry)
        self.sibling_forwards = Counter(
            "disagg_sibling_forwards", "Requests this front door relayed to a sibling decode-worker of the box (path "
            "sibling), by why: load (the box's endpoint: the sibling's engine held fewer requests), full (the box's "
            "endpoint: no free slot here, one there) or engine_down (this worker's decode engine could not serve).",
            ["why"], registry=registry)
        for why in SIBLING_FORWARD_REASONS:  # every series from the start (0), so rates and panels have data
            self.sibling_forwards.labels(why=why)
        self.migrations = Counter(
            "disagg_request_migrations", "Streams whose engine broke mid-way, by outcome: continued on another "
            "engine from the tokens generated so far, or failed (ended with an error event).", ["outcome"],
            registry=registry)
        self.lmcache_restarts = Counter(
            "disagg_lmcache_server_restarts_seen",
            "Times this decode-worker saw lmcache-server come back as a new process.", registry=registry,
        )
        # Every label value a dashboard or alert selects exists from the start, at 0.
        for path in PATHS:
            self.paths.labels(path=path)
        for reason in RECOMPUTE_REASONS:
            self.recomputes.labels(reason=reason)
        for result in CANARY_RESULTS:
            self.canaries.labels(result=result)
        for source in ("kv_cache", "computed"):
            self.prompt_tokens.labels(source=source)
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason=reason)
        for outcome in ("ok", "failed", "rejected"):
            self.prefill_call.labels(outcome=outcome)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)
        for outcome in ("continued", "failed"):
            self.migrations.labels(outcome=outcome)
        for result in ("match", "near_tie", "mismatch"):
            self.kv_checks.labels(result=result)
        for stage in Stage:
            self.stages.labels(stage=stage)

    def count_usage(self, usage: object) -> None:
        """Count one answer's ``usage``: prompt tokens by source (LMCache or computed), generated tokens."""
        if not isinstance(usage, dict):
            return
        try:
            prompt = int(usage.get("prompt_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
            generated = int(usage.get("completion_tokens") or 0)
        except (TypeError, ValueError):
            return
        self.prompt_tokens.labels(source="kv_cache").inc(cached)
        self.prompt_tokens.labels(source="computed").inc(max(0, prompt - cached))
        self.prompt_len.observe(prompt)
        self.generated_tokens.inc(generated)


