"""The readiness protocol across hosts: the same state record, over HTTP.

A daemon on another host cannot read our state file, so every daemon also
serves the record it last wrote at ``GET /disagg/state`` (on its metrics port,
and a prefill-worker on its API port, which the decode host reaches anyway).
The answer carries ``heartbeat_age_s``, computed by the serving daemon from its
own clock: a reader judges freshness without trusting clocks to agree across
hosts. A reader applies the rules it applies to a local file
(:func:`daemons.statefile.assess`): answering stands in for "pid alive and
endpoint accepts"; then fresh, serving, same config digest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from daemons.runtime.statefile import PeerView, StateRecord, judge_record

STATE_PATH = "/disagg/state"
# A peer on another host that has not answered in this long is unreachable (a cut link drops
# packets silently: without a deadline the judging thread would wait for TCP's own timeouts).
REMOTE_TIMEOUT_S = 2.0


def state_route(last_record: Callable[[], tuple[StateRecord, float] | None]) -> Route:
    """``GET /disagg/state``: the record last published and how old its heartbeat is (by our monotonic clock:
    a step of either host's wall clock changes no age)."""

    async def state(_: Request) -> JSONResponse:
        last = last_record()
        if last is None:
            return JSONResponse({"error": "no state published yet"}, status_code=503)
        record, published_at = last
        return JSONResponse({"record": record.to_json(), "heartbeat_age_s": round(time.monotonic() - published_at, 3)})

    return Route(STATE_PATH, state)


def state_url(address: str, port: int) -> str:
    return f"http://{address}:{port}{STATE_PATH}"


def judge(daemon: str, answer: Any, heartbeat_timeout_s: float, expect_digest: str | None,
          expect_parts: Mapping[str, str] | None = None) -> PeerView:
    """Judge a peer from its ``/disagg/state`` answer (already parsed JSON)."""
    try:
        record = StateRecord.from_json(answer["record"])
        age = float(answer["heartbeat_age_s"])
    except (KeyError, TypeError, ValueError) as exc:
        return PeerView(daemon, "stale", False, f"not a valid state answer ({exc})", None)
    if record.daemon != daemon:
        return PeerView(daemon, "stale", False, f"the address answers as {record.daemon}, not {daemon}", None)
    return judge_record(daemon, record, age, heartbeat_timeout_s, expect_digest=expect_digest,
                        expect_parts=expect_parts)


def assess_remote(url: str, daemon: str, heartbeat_timeout_s: float, *, expect_digest: str | None,
                  expect_parts: Mapping[str, str] | None = None, timeout_s: float = REMOTE_TIMEOUT_S,
                  headers: Mapping[str, str] | None = None) -> PeerView:
    """Judge a daemon on another host by asking it (blocking: call it off the event loop)."""
    try:
        resp = httpx.get(url, timeout=timeout_s, trust_env=False, headers=dict(headers or {}))
    except httpx.HTTPError as exc:
        return PeerView(daemon, "unreachable", False, f"{url}: {type(exc).__name__} {exc}".rstrip(), None)
    if resp.status_code != 200:
        return PeerView(daemon, "unreachable", False, f"{url}: HTTP {resp.status_code}", None)
    try:
        answer = resp.json()
    except ValueError:
        return PeerView(daemon, "stale", False, f"{url}: not JSON", None)
    return judge(daemon, answer, heartbeat_timeout_s, expect_digest, expect_parts)
