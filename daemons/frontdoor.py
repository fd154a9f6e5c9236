"""The decode-worker's public, OpenAI-compatible front door.

Per request: ask prefill-worker to compute the prompt (its KV goes to LMCache),
wait for it, then generate on the decode engine, which loads the prompt's KV
chunks from LMCache instead of computing them. When prefill-worker or
lmcache-server is unusable, slower than ``prefill_timeout_s`` or failing, the
decode engine computes the prompt itself: the request still succeeds and the
fallback is logged and counted. Responses carry ``x-disagg-path``
(``disaggregated`` or ``fallback``) and, on fallback, ``x-disagg-fallback-reason``.
"""

from __future__ import annotations

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

from .metrics import FrontDoorMetrics
from .worker import openai_error

log = logging.getLogger(__name__)


@dataclass
class PrefillOutcome:
    path: str  # "disaggregated" or "fallback"
    reason: str = ""  # fallback reason
    seconds: float = 0.0

    def headers(self) -> dict[str, str]:
        h = {"x-disagg-path": self.path}
        if self.reason:
            h["x-disagg-fallback-reason"] = self.reason
        return h


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
    ) -> None:
        self.engine_url = engine_url
        self.client = client
        self.metrics = metrics
        self.prefill_url = prefill_url
        self.prefill_blocker = prefill_blocker
        self.on_prefill_result = on_prefill_result
        self.prefill_timeout_s = prefill_timeout_s
        self.state = state

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
            return PrefillOutcome("disaggregated", seconds=elapsed)
        if 400 <= resp.status_code < 500:
            # The request itself is bad; the decode engine will say so to the client.
            self.metrics.prefill_call.labels(outcome="rejected").observe(elapsed)
            return PrefillOutcome("fallback", "prefill_rejected", elapsed)
        log.warning("[%s] prefill-worker answered %d: %s", request_id, resp.status_code, resp.text[:200])
        return self._fallback("prefill_error", request_id, elapsed)

    def _fallback(self, reason: str, request_id: str, elapsed: float) -> PrefillOutcome:
        log.warning("[%s] fallback: decode engine computes the prompt itself (%s)", request_id, reason)
        self.metrics.fallbacks.labels(reason=reason).inc()
        if elapsed:
            self.metrics.prefill_call.labels(outcome="failed").observe(elapsed)
        if reason not in ("lmcache_unavailable",):
            self.on_prefill_result(reason)
        return PrefillOutcome("fallback", reason, elapsed)

    # -- usage accounting ------------------------------------------------------------------
    def _count_usage(self, usage: dict[str, Any] | None) -> None:
        if not isinstance(usage, dict):
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
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

    async def _complete(self, route: str, body: dict[str, Any], request_id: str, outcome: PrefillOutcome) -> Response:
        try:
            resp = await self.client.post(
                f"{self.engine_url}{route}", json=body, timeout=httpx.Timeout(None, connect=5.0),
                headers={"x-request-id": request_id},
            )
        except httpx.HTTPError as exc:
            self.metrics.errors.labels(kind="engine_unavailable").inc()
            return openai_error(503, f"decode engine unavailable: {exc!r}", "service_unavailable")
        if resp.status_code == 200:
            try:
                self._count_usage(resp.json().get("usage"))
            except ValueError:
                pass
        else:
            self.metrics.errors.labels(kind=f"engine_{resp.status_code}").inc()
        return Response(resp.content, status_code=resp.status_code, media_type="application/json",
                        headers=outcome.headers())

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
        try:
            upstream = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            self.metrics.errors.labels(kind="engine_unavailable").inc()
            return openai_error(503, f"decode engine unavailable: {exc!r}", "service_unavailable")
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            self.metrics.errors.labels(kind=f"engine_{upstream.status_code}").inc()
            return Response(content, status_code=upstream.status_code, media_type="application/json",
                            headers=outcome.headers())
        return StreamingResponse(
            self._relay(upstream, route, client_wants_usage, t0, request_id),
            media_type="text/event-stream",
            headers={**outcome.headers(), "cache-control": "no-cache"},
        )

    async def _relay(
        self, upstream: httpx.Response, route: str, client_wants_usage: bool, t0: float, request_id: str
    ) -> AsyncIterator[bytes]:
        first: float | None = None
        last: float | None = None
        completed = False
        buffer = ""
        try:
            async for text in upstream.aiter_text():
                buffer += text
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    forward = True
                    if event.startswith("data: ") and event != "data: [DONE]":
                        try:
                            obj = json.loads(event[6:])
                        except ValueError:
                            obj = {}
                        if obj.get("usage") and not obj.get("choices"):
                            self._count_usage(obj["usage"])
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
            if buffer.strip():
                yield buffer.encode()
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
