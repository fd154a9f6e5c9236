"""A daemon's own Prometheus page: the metrics every daemon exports, its /metrics app, and its child's
metric families re-exposed (an engine's ``vllm:*`` as ``vllm_*``, LMCache's ``lmcache_*``), filtered by prefix so
that names never collide. Registries are injected, so tests get a fresh one."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Info, ProcessCollector, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from daemons.runtime.states import State

log = logging.getLogger(__name__)

# `_created` samples double the series count and no dashboard uses them.
prometheus_client.disable_created_metrics()


class DaemonMetrics:
    """What every daemon exports."""

    def __init__(self, daemon: str, registry: CollectorRegistry, *, version: str, digest: str,
                 engines: str = "") -> None:
        self.registry = registry
        ProcessCollector(registry=registry)
        Info("disagg_build", "This daemon's version, config digest and the vLLM/LMCache it runs (mid-upgrade they "
             "differ between daemons).", registry=registry).info(
            {"daemon": daemon, "version": version, "config_digest": digest, "engines": engines}
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
