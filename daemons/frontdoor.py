"""The decode-worker's public, OpenAI-compatible front door.

Per request: ask prefill-worker to compute the prompt (it answers once the
prompt's KV is in LMCache), then generate on the decode engine, which loads the
prompt's KV chunks from LMCache instead of computing them. When prefill-worker
or lmcache-server is unusable, the KV-path canary says a hop is broken, or the
prefill call is slower than ``prefill_timeout_s`` or fails, the decode engine
computes the prompt itself: the request still succeeds and the fallback is
logged and counted.

Responses carry ``x-disagg-path``, truthfully:

- ``disaggregated``: the decode engine loaded every full chunk of the prompt
  from LMCache;
- ``recomputed``: prefill ran, but the decode engine computed (part of) the
  prompt anyway (``x-disagg-recompute-reason``: ``kv_not_stored``,
  ``kv_not_loaded``, ``no_full_chunk``);
- ``fallback``: prefill was skipped or failed (``x-disagg-fallback-reason``).

A streamed response's headers leave before the decode engine has reported
what it loaded: there the header is prefill's verdict (``disaggregated`` when
LMCache held every full chunk) and ``disagg_request_paths_total`` counts the
truth once the stream's usage arrives.

Deadlines: a non-streamed request whose decode engine has not answered within
``request_timeout_s``, or a streamed one with no first token within
``first_token_timeout_s``, fails with 503 and ``Retry-After`` (counted as
``decode_timeout``); closing the engine connection aborts it there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .canary import cached_tokens
from .metrics import FrontDoorMetrics
from .worker import openai_error

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
# Fallbacks decided before any call, from what status already says (no new news to report).
KNOWN_STATE_FALLBACKS = ("lmcache_unavailable", "kv_path_broken", "prefill_unavailable")


@dataclass
class PrefillOutcome:
    path: str  # "disaggregated" (prefill ran) or "fallback"
    reason: str = ""  # fallback reason
    seconds: float = 0.0
    expected: int | None = None  # full-chunk tokens of the prompt (prefill-worker's header)
    stored: int | None = None  # of those, in LMCache when prefill answered

    def verdict(self, cached: int | None) -> tuple[str, str]:
        """(path, reason) once the decode engine said how many prompt tokens it loaded (None: not yet)."""
        if self.path == "fallback":
            return "fallback", self.reason
        if self.expected is not None and self.expected == 0:
            return "recomputed", "no_full_chunk"
        if self.stored is not None and self.expected is not None and self.stored < self.expected:
            return "recomputed", "kv_not_stored"
        if cached is not None and self.expected is not None and cached < self.expected:
            return "recomputed", "kv_not_loaded"
        return "disaggregated", ""

    def headers(self, cached: int | None = None) -> dict[str, str]:
        path, reason = self.verdict(cached)
        h = {"x-disagg-path": path}
        if reason:
            h["x-disagg-fallback-reason" if path == "fallback" else "x-disagg-recompute-reason"] = reason
        return h


def _int_header(resp: httpx.Response, name: str) -> int | None:
    try:
        return int(resp.headers[name])
    except (KeyError, ValueError):
        return None


class FrontDoor:
    def __init__(
        self,
        *,
        engine_url: str,
        client: httpx.AsyncClient,
        metrics: FrontDoorMetrics,
        prefill_url: Callable[[], str | None],
        prefill_blocker: Callable[[], str | None],
        on_prefill_result: Callable[[str | None], None],
        prefill_timeout_s: float,
        state: Callable[[], tuple[str, bool, str]],
        first_token_timeout_s: float = 120.0,
        request_timeout_s: float = 600.0,
        on_kv_miss: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.engine_url = engine_url
        self.client = client
        self.metrics = metrics
        self.prefill_url = prefill_url
        self.prefill_blocker = prefill_blocker
        self.on_prefill_result = on_prefill_result
        self.prefill_timeout_s = prefill_timeout_s
        self.state = state
        self.first_token_timeout_s = first_token_timeout_s
        self.request_timeout_s = request_timeout_s
        self.on_kv_miss = on_kv_miss

    # -- prefill ---------------------------------------------------------------------
    async def prefill(self, route: str, body: dict[str, Any], request_id: str) -> PrefillOutcome:
        blocker = self.prefill_blocker()
        url = self.prefill_url()
        if blocker is None and url is None:
            blocker = "prefill_unavailable"
        if blocker is not None:
            return self._fallback(blocker, request_id, 0.0)
        prefill_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        t0 = time.monotonic()
        try:
            resp = await self.client.post(
                f"{url}{route}", json=prefill_body, timeout=self.prefill_timeout_s,
                headers={"x-request-id": request_id},
            )
        except httpx.TimeoutException:
            return self._fallback("prefill_timeout", request_id, time.monotonic() - t0)
        except httpx.HTTPError as exc:
            log.warning("[%s] prefill-worker unreachable: %r", request_id, exc)
            return self._fallback("prefill_unreachable", request_id, time.monotonic() - t0)
        elapsed = time.monotonic() - t0
        if resp.status_code == 200:
            self.metrics.prefill_call.labels(outcome="ok").observe(elapsed)
            self.on_prefill_result(None)
            return PrefillOutcome("disaggregated", seconds=elapsed,
                                  expected=_int_header(resp, "x-disagg-kv-expected-tokens"),
                                  stored=_int_header(resp, "x-disagg-kv-stored-tokens"))
        if 400 <= resp.status_code < 500:
            # The request itself is bad; the decode engine will say so to the client.
            self.metrics.prefill_call.labels(outcome="rejected").observe(elapsed)
            self.metrics.fallbacks.labels(reason="prefill_rejected").inc()
            return PrefillOutcome("fallback", "prefill_rejected", elapsed)
        log.warning("[%s] prefill-worker answered %d: %s", request_id, resp.status_code, resp.text[:200])
        return self._fallback("prefill_error", request_id, elapsed)

    def _fallback(self, reason: str, request_id: str, elapsed: float) -> PrefillOutcome:
        # A known-broken hop (status says which) is an INFO per request; a call that failed is a WARNING.
        level = logging.INFO if reason in KNOWN_STATE_FALLBACKS else logging.WARNING
        log.log(level, "[%s] fallback: decode engine computes the prompt itself (%s)", request_id, reason)
        self.metrics.fallbacks.labels(reason=reason).inc()
        if elapsed:
            self.metrics.prefill_call.labels(outcome="failed").observe(elapsed)
        if reason not in KNOWN_STATE_FALLBACKS:
            self.on_prefill_result(reason)
        return PrefillOutcome("fallback", reason, elapsed)

    # -- usage accounting ------------------------------------------------------------------
    def _count_path(self, outcome: PrefillOutcome, cached: int | None, request_id: str) -> None:
        path, reason = outcome.verdict(cached)
        self.metrics.paths.labels(path=path).inc()
        if path == "recomputed":
            self.metrics.recomputes.labels(reason=reason).inc()
            if reason != "no_full_chunk":
                log.warning("[%s] decode engine computed the prompt although prefill ran (%s: %s of %s "
                            "full-chunk tokens stored, %s loaded)", request_id, reason, outcome.stored,
                            outcome.expected, cached)
                self.on_kv_miss(reason)

    def _count_usage(self, usage: dict[str, Any] | None) -> None:
        if not isinstance(usage, dict):
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = cached_tokens({"usage": usage})
        self.metrics.prompt_tokens.labels(source="kv_cache").inc(cached)
        self.metrics.prompt_tokens.labels(source="computed").inc(max(0, prompt - cached))
        self.metrics.prompt_len.observe(prompt)
        self.metrics.generated_tokens.inc(int(usage.get("completion_tokens") or 0))

    # -- routes ----------------------------------------------------------------------
    async def generate(self, request: Request) -> Response:
        route = request.url.path
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        t0 = time.monotonic()
        self.metrics.in_flight.inc()
        streaming = False
        status = 500
        try:
            try:
                body = json.loads(await request.body())
            except ValueError:
                status = 400
                self.metrics.errors.labels(kind="bad_request").inc()
                return openai_error(400, "request body is not valid JSON")
            if not isinstance(body, dict):
                status = 400
                self.metrics.errors.labels(kind="bad_request").inc()
                return openai_error(400, "request body must be a JSON object")
            outcome = await self.prefill(route, body, request_id)
            if body.get("stream"):
                response = await self._stream(route, body, request_id, outcome, t0)
                streaming = isinstance(response, StreamingResponse)
                status = response.status_code
                return response
            response = await self._complete(route, body, request_id, outcome)
            status = response.status_code
            if status == 200:
                self.metrics.e2e.observe(time.monotonic() - t0)
            return response
        finally:
            if not streaming:
                self.metrics.in_flight.dec()
                self.metrics.requests.labels(route=route, status=str(status)).inc()

    def _decode_timeout(self, what: str, request_id: str) -> Response:
        log.warning("[%s] decode engine: %s; answering 503", request_id, what)
        self.metrics.errors.labels(kind="decode_timeout").inc()
        self.on_kv_miss("decode_timeout")
        return openai_error(503, f"decode engine: {what}", "service_unavailable",
                            headers={"retry-after": str(RETRY_AFTER_S)})

    async def _complete(self, route: str, body: dict[str, Any], request_id: str, outcome: PrefillOutcome) -> Response:
        try:
            resp = await asyncio.wait_for(self.client.post(
                f"{self.engine_url}{route}", json=body, timeout=httpx.Timeout(None, connect=5.0),
                headers={"x-request-id": request_id},
            ), self.request_timeout_s)
        except asyncio.TimeoutError:
            return self._decode_timeout(f"no answer within {self.request_timeout_s:.0f}s", request_id)
        except httpx.HTTPError as exc:
            self.metrics.errors.labels(kind="engine_unavailable").inc()
            return openai_error(503, f"decode engine unavailable: {exc!r}", "service_unavailable",
                                headers={"retry-after": str(RETRY_AFTER_S)})
        cached: int | None = None
        if resp.status_code == 200:
            try:
                answer = resp.json()
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                self._count_usage(answer.get("usage"))
                cached = cached_tokens(answer)
            self._count_path(outcome, cached, request_id)
        else:
            self.metrics.errors.labels(kind=f"engine_{resp.status_code}").inc()
        return Response(resp.content, status_code=resp.status_code, media_type="application/json",
                        headers=outcome.headers(cached))

    async def _stream(
        self, route: str, body: dict[str, Any], request_id: str, outcome: PrefillOutcome, t0: float
    ) -> Response:
        opts = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        client_wants_usage = bool(opts.get("include_usage"))
        upstream_body = {**body, "stream_options": {**opts, "include_usage": True}}
        req = self.client.build_request(
            "POST", f"{self.engine_url}{route}", json=upstream_body,
            timeout=httpx.Timeout(None, connect=5.0), headers={"x-request-id": request_id},
        )
        deadline = time.monotonic() + self.first_token_timeout_s
        try:
            upstream = await asyncio.wait_for(self.client.send(req, stream=True), self.first_token_timeout_s)
        except asyncio.TimeoutError:
            return self._decode_timeout(f"no first token within {self.first_token_timeout_s:.0f}s", request_id)
        except httpx.HTTPError as exc:
            self.metrics.errors.labels(kind="engine_unavailable").inc()
            return openai_error(503, f"decode engine unavailable: {exc!r}", "service_unavailable",
                                headers={"retry-after": str(RETRY_AFTER_S)})
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            self.metrics.errors.labels(kind=f"engine_{upstream.status_code}").inc()
            return Response(content, status_code=upstream.status_code, media_type="application/json",
                            headers=outcome.headers())
        # Hold the response until the first event is in: a decode engine that
        # produces nothing gets the request a clean 503, not a silent stream.
        events = _sse_events(upstream)
        try:
            first_event = await asyncio.wait_for(anext(events), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            await upstream.aclose()
            return self._decode_timeout(f"no first token within {self.first_token_timeout_s:.0f}s", request_id)
        except StopAsyncIteration:
            first_event = None
        except httpx.HTTPError as exc:
            await upstream.aclose()
            self.metrics.errors.labels(kind="engine_unavailable").inc()
            return openai_error(503, f"decode engine stream broke: {exc!r}", "service_unavailable",
                                headers={"retry-after": str(RETRY_AFTER_S)})
        return StreamingResponse(
            self._relay(upstream, first_event, events, route, client_wants_usage, t0, request_id, outcome),
            media_type="text/event-stream",
            headers={**outcome.headers(), "cache-control": "no-cache"},
        )

    async def _relay(
        self, upstream: httpx.Response, first_event: str | None, events: AsyncIterator[str], route: str,
        client_wants_usage: bool, t0: float, request_id: str, outcome: PrefillOutcome,
    ) -> AsyncIterator[bytes]:
        first: float | None = None
        last: float | None = None
        completed = False
        cached: int | None = None

        async def all_events() -> AsyncIterator[str]:
            if first_event is not None:
                yield first_event
            async for event in events:
                yield event

        try:
            async for event in all_events():
                forward = True
                if event.startswith("data: ") and event != "data: [DONE]":
                    try:
                        obj = json.loads(event[6:])
                    except ValueError:
                        obj = {}
                    if not isinstance(obj, dict):
                        obj = {}
                    if obj.get("usage") and not obj.get("choices"):
                        self._count_usage(obj["usage"])
                        cached = cached_tokens(obj)
                        forward = client_wants_usage
                    elif _has_token(obj):
                        now = time.monotonic()
                        if first is None:
                            first = now
                            self.metrics.ttft.observe(now - t0)
                        elif last is not None:
                            self.metrics.itl.observe(now - last)
                        last = now
                elif event == "data: [DONE]":
                    completed = True
                if forward:
                    yield (event + "\n\n").encode()
            if completed:
                self._count_path(outcome, cached, request_id)
        except httpx.HTTPError as exc:
            log.warning("[%s] decode engine stream broke: %r", request_id, exc)
            self.metrics.errors.labels(kind="stream_broken").inc()
            err = {"error": {"message": "decode engine stream broke", "type": "service_unavailable", "code": 503}}
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            await upstream.aclose()
            self.metrics.in_flight.dec()
            status = "200" if completed else "499"
            self.metrics.requests.labels(route=route, status=status).inc()
            if completed:
                self.metrics.e2e.observe(time.monotonic() - t0)

    async def models(self, _: Request) -> Response:
        try:
            resp = await self.client.get(f"{self.engine_url}/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            return openai_error(503, f"decode engine unavailable: {exc!r}", "service_unavailable")
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")

    async def health(self, _: Request) -> Response:
        state, serving, reason = self.state()
        return JSONResponse({"state": state, "reason": reason}, status_code=200 if serving else 503)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
            Route("/v1/models", self.models),
            Route("/health", self.health),
        ])


async def _sse_events(upstream: httpx.Response) -> AsyncIterator[str]:
    """The server-sent events of a response, one string each (without the blank line)."""
    buffer = ""
    async for text in upstream.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            yield event
    if buffer.strip():
        # The engine's stream ended inside an event: never pass a truncated event on.
        raise httpx.RemoteProtocolError(f"decode engine stream ended inside an event ({len(buffer)} bytes)")


def _has_token(obj: dict[str, Any]) -> bool:
    """True for a stream chunk that carries generated tokens (not chat's role-only opener).

    A chunk's text can be empty while its token is an incomplete UTF-8 sequence,
    so presence counts, not content."""
    for choice in obj.get("choices") or ():
        if "text" in choice:
            return True
        delta = choice.get("delta") or {}
        if "role" not in delta and delta.get("content") is not None:
            return True
    return False
