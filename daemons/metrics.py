"""Prometheus metrics: one registry per daemon, injected so tests get a fresh one.

Each daemon's /metrics serves its own registry plus, re-exposed, the metric
families of its child (an engine's ``vllm:*`` as ``vllm_*``, LMCache's
``lmcache_*``), filtered by prefix so that names never collide.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .statefile import State

log = logging.getLogger(__name__)

# `_created` samples double the series count and no dashboard uses them.
prometheus_client.disable_created_metrics()

# Latency buckets from 5 ms to 2 min: CPU engines are slow, GPU ones fast.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


FALLBACK_REASONS = (
    "lmcache_unavailable", "prefill_unavailable", "prefill_timeout", "prefill_unreachable", "prefill_lost",
    "prefill_error", "prefill_rejected", "kv_path_broken",
)
ERROR_KINDS = ("bad_request", "too_large", "unauthorized", "overloaded", "client_gone", "engine_unavailable",
               "stream_broken", "decode_timeout")
# How a request's prompt reached the decode engine (x-disagg-path).
PATHS = ("disaggregated", "recomputed", "fallback", "short_prompt", "prefill_busy", "decode_busy")
RECOMPUTE_REASONS = ("kv_not_stored", "kv_not_loaded", "no_full_chunk")
CANARY_RESULTS = ("ok", "prefill", "lmcache_store", "decode_engine", "decode_load", "p2p_fetch")


class DaemonMetrics:
    """What every daemon exports."""

    def __init__(self, daemon: str, registry: CollectorRegistry, *, version: str, digest: str) -> None:
        self.registry = registry
        ProcessCollector(registry=registry)
        Info("disagg_build", "Version and config digest of this daemon.", registry=registry).info(
            {"daemon": daemon, "version": version, "config_digest": digest}
        )
        self.ready = Gauge("disagg_ready", "1 when the daemon serves (ready or degraded), else 0.", registry=registry)
        self.state = Gauge(
            "disagg_state", "1 for the daemon's current state, 0 for the others.", ["state"], registry=registry
        )
        self.readiness_seconds = Gauge(
            "disagg_readiness_seconds", "Seconds from process start to first ready.", registry=registry
        )
        self.dependency_wait_seconds = Gauge(
            "disagg_dependency_wait_seconds", "Seconds spent waiting for a dependency at start.",
            ["dependency"], registry=registry,
        )
        self.starts = Gauge(
            "disagg_starts", "Times this daemon has started with this runtime dir (restarts + 1).", registry=registry
        )

    def set_state(self, state: State) -> None:
        self.ready.set(1 if state.serving else 0)
        for s in State:
            self.state.labels(state=s.value).set(1 if s is state else 0)


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
        self.paths = Counter(
            "disagg_request_paths",
            "Answered requests by the path their prompt took: disaggregated (decode loaded every full chunk "
            "from LMCache), recomputed (prefill ran but decode computed the prompt anyway), fallback "
            "(decode computed it, prefill skipped or failed), short_prompt (shorter than disaggregate_min_tokens: "
            "decode computed it, by design), prefill_busy (prefill calls in flight held overflow_backlog_tokens: "
            "decode computed it, by design), decode_busy (short, under load, the decode engine busier: a prefill "
            "engine served it start to end, by design).",
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


_SAMPLE_SUFFIXES = ("", "_bucket", "_sum", "_count", "_total", "_created", "_info")


def _family_names(text: str) -> dict[str, str]:
    """Family name -> type, from the ``# TYPE`` lines."""
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split(" ")
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
    return types


def _exposed_name(family: str, kind: str, rename: dict[str, str]) -> str:
    for old, new in rename.items():
        if family.startswith(old):
            family = new + family[len(old):]
            break
    if kind != "counter" and family.endswith("_total"):
        family = family[: -len("_total")]  # `_total` is for counters only
    return family


def filter_families(text: str, prefixes: tuple[str, ...], rename: dict[str, str] | None = None) -> str:
    """Keep only the metric families whose names start with one of ``prefixes``.

    Names are made to follow Prometheus naming on the way: ``rename`` maps a name
    prefix to another (vLLM's ``vllm:`` becomes ``vllm_``: colons are reserved for
    recording rules), a non-counter family loses a ``_total`` suffix, and
    ``*_created`` series are dropped."""
    types = _family_names(text)
    exposed = {f: _exposed_name(f, t, rename or {}) for f, t in types.items() if f.startswith(prefixes)}
    out = []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split(" ", 3)[2]
            family = name
        elif line.startswith("#") or not line.strip():
            continue
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
            family = next((f for f in exposed if name.startswith(f) and name[len(f):] in _SAMPLE_SUFFIXES), name)
        if not name.startswith(prefixes) or name.endswith("_created"):
            continue
        if family in exposed:
            line = line.replace(name, exposed[family] + name[len(family):], 1)
        elif rename:
            for old, new in rename.items():
                if name.startswith(old):
                    line = line.replace(name, new + name[len(old):], 1)
                    break
        out.append(line)
    return "\n".join(out) + ("\n" if out else "")


def metrics_app(registry: CollectorRegistry, extra: Callable[[], Awaitable[str]],
                routes: list[Route] | None = None) -> Starlette:
    async def metrics(_: Request) -> Response:
        body = generate_latest(registry).decode()
        try:
            body += await extra()
        except Exception as exc:  # noqa: BLE001 - our own metrics must still be served
            log.debug("bridged metrics unavailable: %s", exc)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def root(_: Request) -> Response:
        return PlainTextResponse("metrics at /metrics\n")

    return Starlette(routes=[Route("/metrics", metrics), Route("/", root), *(routes or [])])


async def scrape(
    client: httpx.AsyncClient, url: str, prefixes: tuple[str, ...], rename: dict[str, str] | None = None
) -> str:
    """Fetch a child's /metrics and filter it."""
    resp = await client.get(url, timeout=3.0)
    resp.raise_for_status()
    return filter_families(resp.text, prefixes, rename)
