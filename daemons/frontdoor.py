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
- ``fallback``: prefill was skipped or failed (``x-disagg-fallback-reason``);
- ``short_prompt``: the prompt is shorter than ``disaggregate_min_tokens``, where
  loading its KV would cost the decode engine more than computing it, and at most
  ``short_prompt_max_in_flight`` requests are in progress: no prefill call is made
  (estimated length: :mod:`daemons.prompt_size`). Not a fallback. Under load every
  prompt goes to prefill: the prefill engine's capacity then matters more.
- ``prefill_busy``: prefill calls already in flight hold at least
  ``overflow_backlog_tokens`` prompt tokens, so the decode engine computes this
  prompt (a bounded amount at a time; :mod:`daemons.prefill_backlog`). Not a fallback.
- ``decode_busy``: with ``balance_short_prompts`` on, a short prompt that arrives
  under load goes whole to whichever side has fewer requests in progress; this one
  went to a prefill engine, which computed the prompt and decoded it (no KV moved;
  :mod:`daemons.engine_share`). Were that prefill-worker unreachable, the decode
  engine serves the request (``fallback``, ``prefill_unreachable``). Not a fallback.

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
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .admission import Admission, Overloaded
from .auth import ApiKeys
from .canary import cached_tokens
from .disconnect import ClientGone, unless_disconnected
from .metrics import FrontDoorMetrics
from .engine_share import EngineShare
from .prefill_backlog import Backlog
from .prefill_router import PrefillOutcome, PrefillRouter
from .prompt_size import PromptSizer
from .request_limits import BadRequest, parse_json_object, read_body
from .request_limits import request_id as checked_request_id
from .sse_relay import RelayedResponse, StreamRelay
from .upstream import Answer, Stream, Upstream, UpstreamError, UpstreamTimeout
from .worker import openai_error


class PrefillLost(Exception):
    """The prefill-worker a call went to was found unusable while the call was in flight."""


class WholeCallFailed(Exception):
    """A request sent whole to a prefill-worker (path decode_busy) got no answer from it: not served there."""

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5

__all__ = ["FrontDoor", "PrefillOutcome"]


def _int_header(resp: Answer, name: str) -> int | None:
    try:
        return int(resp.headers[name])
    except (KeyError, ValueError):
        return None


class FrontDoor:
    def __init__(
        self,
        *,
        engine_url: str,
        client: Upstream,
        metrics: FrontDoorMetrics,
        router: PrefillRouter,
        prefill_timeout_s: float,
        health: Callable[[], tuple[str, bool, str]],
        first_token_timeout_s: float = 120.0,
        request_timeout_s: float = 600.0,
        admission: Admission | None = None,
        keys: ApiKeys | None = None,
        max_body_bytes: int = 8 << 20,
        disaggregate_min_tokens: int = 0,
        short_prompt_max_in_flight: int = 8,
        sizer: PromptSizer | None = None,
        backlog: Backlog | None = None,
        share: EngineShare | None = None,
    ) -> None:
        self.engine_url = engine_url
        self.client = client
        self.metrics = metrics
        self.router = router
        self.prefill_timeout_s = prefill_timeout_s
        self.health_of = health  # (state, serving, reason) for /health
        self.first_token_timeout_s = first_token_timeout_s
        self.request_timeout_s = request_timeout_s
        self.admission = admission if admission is not None else Admission(64, 256, 30.0)
        self.keys = keys if keys is not None else ApiKeys(None, env={})
        self.max_body_bytes = max_body_bytes
        self.disaggregate_min_tokens = disaggregate_min_tokens
        self.short_prompt_max_in_flight = short_prompt_max_in_flight
        self.sizer = sizer if sizer is not None else PromptSizer()
        self.backlog = backlog if backlog is not None else Backlog()
        self.share = share if share is not None else EngineShare()
        metrics.prompt_tokens_in_flight.labels(where="prefill").set_function(lambda: self.backlog.prefill_tokens)
        metrics.prompt_tokens_in_flight.labels(where="decode").set_function(lambda: self.backlog.local_tokens)
        metrics.on_prefill_engines.set_function(lambda: self.share.on_prefill)

    # -- prefill ---------------------------------------------------------------------
    def short_prompt(self, tokens: int) -> PrefillOutcome | None:
        """Where a prompt of ``tokens`` (estimated) goes if it is too short to disaggregate: the decode engine
        while the box is quiet; under load, the decode engine or (balance_short_prompts) a prefill engine,
        whichever is less busy, else the prefill call. None: not short, or disaggregate it."""
        if self.disaggregate_min_tokens <= 0 or tokens >= self.disaggregate_min_tokens:
            return None
        others = self.admission.active - 1
        if others < self.short_prompt_max_in_flight:
            return PrefillOutcome("short_prompt")
        if not self.share.enabled:
            return None
        if self.share.to_prefill(others, self.backlog.prefill_calls, len(self.router.working_prefills())):
            choice = self.router.choose()
            if choice.url is not None:
                self.share.taken()
                return PrefillOutcome("decode_busy", engine_url=f"{choice.url}/whole")
        return PrefillOutcome("short_prompt")

    async def prefill(self, route: str, body: dict[str, Any], request_id: str) -> PrefillOutcome:
        """Have a prefill-worker compute the prompt (its KV goes to LMCache); the router counts the outcome."""
        tokens = self.sizer.estimate(route, body)
        short = self.short_prompt(tokens)
        if short is not None:
            return short
        if self.backlog.overflow(tokens):
            return PrefillOutcome("prefill_busy", local_tokens=tokens)
        with self.backlog.at_prefill(tokens):
            return await self._prefill_call(route, body, request_id)

    async def _prefill_call(self, route: str, body: dict[str, Any], request_id: str) -> PrefillOutcome:
        choice = self.router.choose()
        if choice.url is None:
            return self.router.report(PrefillOutcome("fallback", choice.skip), request_id)
        prefill_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        t0 = time.monotonic()
        try:
            resp = await self._unless_lost(choice.daemon, self.client.post(
                f"{choice.url}{route}", prefill_body, timeout_s=self.prefill_timeout_s,
                headers={"x-request-id": request_id}))
        except PrefillLost as exc:
            log.warning("[%s] prefill call abandoned: %s", request_id, exc)
            outcome = PrefillOutcome("fallback", "prefill_lost", time.monotonic() - t0)
        except UpstreamTimeout:
            outcome = PrefillOutcome("fallback", "prefill_timeout", time.monotonic() - t0)
        except UpstreamError as exc:
            log.warning("[%s] prefill-worker unreachable: %s", request_id, exc)
            outcome = PrefillOutcome("fallback", "prefill_unreachable", time.monotonic() - t0)
        else:
            elapsed = time.monotonic() - t0
            if resp.status_code == 200:
                outcome = PrefillOutcome("disaggregated", seconds=elapsed,
                                         expected=_int_header(resp, "x-disagg-kv-expected-tokens"),
                                         stored=_int_header(resp, "x-disagg-kv-stored-tokens"))
            elif 400 <= resp.status_code < 500:
                # The request itself is bad: the client hears the prefill engine's answer.
                outcome = PrefillOutcome("fallback", "prefill_rejected", elapsed,
                                         rejection=(resp.status_code, resp.content))
            else:
                log.warning("[%s] prefill-worker answered %d: %s", request_id, resp.status_code, resp.text[:200])
                outcome = PrefillOutcome("fallback", "prefill_error", elapsed)
        return self.router.report(outcome, request_id)

    async def _unless_lost(self, prefill: str, call: Awaitable[Answer]) -> Answer:
        """``call``, abandoned (its connection closed) if ``prefill`` is found unusable meanwhile."""
        if not prefill:
            return await call
        lost = self.router.lost_signal(prefill)
        task = asyncio.ensure_future(call)
        waiter = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise PrefillLost(f"{prefill} was found unusable while the call was in flight")
        return task.result()

    # -- what reached the decode engine ------------------------------------------------------------
    def _count_path(self, outcome: PrefillOutcome, cached: int | None, request_id: str) -> None:
        path, reason = outcome.verdict(cached)
        self.metrics.paths.labels(path=path).inc()
        if path == "recomputed":
            self.metrics.recomputes.labels(reason=reason).inc()
            if reason != "no_full_chunk":
                log.warning("[%s] decode engine computed the prompt although prefill ran (%s: %s of %s "
                            "full-chunk tokens stored, %s loaded)", request_id, reason, outcome.stored,
                            outcome.expected, cached)
                self.router.kv_missed(reason)

    # -- routes ----------------------------------------------------------------------
    async def generate(self, request: Request) -> Response:
        """One completion: checks, a slot, prefill, decode; never a hang, never a 500 for bad input."""
        route = request.url.path
        t0 = time.monotonic()
        try:
            request_id = checked_request_id(request)
            if not self.keys.allows(request.headers.get("authorization")):
                raise BadRequest(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                 "authentication_error")
            body = parse_json_object(await read_body(request, self.max_body_bytes))
            await self.admission.acquire()
        except BadRequest as exc:
            kind = {401: "unauthorized", 413: "too_large"}.get(exc.status, "bad_request")
            return self._refuse(route, exc.status, kind, exc.message, exc.kind)
        except Overloaded as exc:
            log.info("refused (%s): %d in progress, %d queued", exc.reason, self.admission.active,
                     self.admission.queued)
            return self._refuse(route, 429, "overloaded", f"too many requests in progress ({exc.reason}); retry",
                                "rate_limit_error", {"retry-after": str(RETRY_AFTER_S)})
        self.metrics.in_flight.inc()
        streamed = False
        status = 499
        outcome: PrefillOutcome | None = None
        try:
            outcome = await unless_disconnected(request, self.prefill(route, body, request_id))
            if outcome.rejection is not None:
                # The prefill engine refused the request (too long a prompt, a bad parameter):
                # the decode engine would too. The client hears why, and no decode work is done.
                status, content = outcome.rejection
                return Response(content, status_code=status, media_type="application/json")
            with self.backlog.on_decode(outcome.local_tokens):  # until the first token: the decode engine's prefill
                try:
                    response = await unless_disconnected(request, self._answer(route, body, request_id, outcome, t0))
                except WholeCallFailed as exc:
                    log.warning("[%s] prefill-worker did not serve the request (%s): the decode engine does",
                                request_id, exc)
                    self.share.released()
                    outcome = self.router.report(PrefillOutcome("fallback", "prefill_unreachable"), request_id)
                    response = await unless_disconnected(request, self._answer(route, body, request_id, outcome, t0))
                streamed = isinstance(response, StreamingResponse)
            status = response.status_code
            return response
        except ClientGone:
            log.info("[%s] client went away after %.1fs: its engine requests are aborted", request_id,
                     time.monotonic() - t0)
            self.metrics.errors.labels(kind="client_gone").inc()
            return Response(status_code=499)
        finally:
            if not streamed:  # a stream ends (and counts itself) when its relay ends
                self._finished(route, status, outcome)

    async def _answer(self, route: str, body: dict[str, Any], request_id: str, outcome: PrefillOutcome,
                      t0: float) -> Response:
        """Generate on the decode engine (or, decode_busy, whole on a prefill engine)."""
        if body.get("stream"):
            return await self._stream(route, body, request_id, outcome, t0)
        response = await self._complete(route, body, request_id, outcome)
        if response.status_code == 200:
            self.metrics.e2e.observe(time.monotonic() - t0)
        return response

    def _finished(self, route: str, status: int, outcome: PrefillOutcome | None) -> None:
        if outcome is not None and outcome.path == "decode_busy":
            self.share.released()
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(route=route, status=str(status)).inc()
        self.admission.release()

    def _refuse(self, route: str, status: int, kind: str, message: str, error_type: str,
                headers: dict[str, str] | None = None) -> Response:
        self.metrics.errors.labels(kind=kind).inc()
        self.metrics.requests.labels(route=route, status=str(status)).inc()
        return openai_error(status, message, error_type, headers=headers)

    def _decode_timeout(self, what: str, request_id: str) -> Response:
        log.warning("[%s] decode engine: %s; answering 503", request_id, what)
        self.metrics.errors.labels(kind="decode_timeout").inc()
        self.router.kv_missed("decode_timeout")
        return openai_error(503, f"decode engine: {what}", "service_unavailable",
                            headers={"retry-after": str(RETRY_AFTER_S)})

    async def _complete(self, route: str, body: dict[str, Any], request_id: str, outcome: PrefillOutcome) -> Response:
        engine_url = outcome.engine_url or self.engine_url
        try:
            resp = await asyncio.wait_for(self.client.post(
                f"{engine_url}{route}", body, headers={"x-request-id": request_id},
            ), self.request_timeout_s)
        except asyncio.TimeoutError:
            return self._decode_timeout(f"no answer within {self.request_timeout_s:.0f}s", request_id)
        except UpstreamError as exc:
            if outcome.engine_url:
                raise WholeCallFailed(str(exc)) from exc
            self.metrics.errors.labels(kind="engine_unavailable").inc()
            return openai_error(503, f"decode engine unavailable: {exc}", "service_unavailable",
                                headers={"retry-after": str(RETRY_AFTER_S)})
        if resp.status_code == 503 and outcome.engine_url:
            raise WholeCallFailed(f"prefill-worker answered 503: {resp.text[:200]}")
        cached: int | None = None
        if resp.status_code == 200:
            try:
                answer = resp.json()
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                self.metrics.count_usage(answer.get("usage"))
                cached = cached_tokens(answer)
                usage = answer.get("usage")
                if isinstance(usage, dict):
                    self.sizer.learn(route, body, usage.get("prompt_tokens"))
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
        deadline = time.monotonic() + self.first_token_timeout_s
        try:
            upstream: Stream = await asyncio.wait_for(self.client.stream(
                f"{outcome.engine_url or self.engine_url}{route}", upstream_body, headers={"x-request-id": request_id},
            ), self.first_token_timeout_s)
        except asyncio.TimeoutError:
            return self._decode_timeout(f"no first token within {self.first_token_timeout_s:.0f}s", request_id)
        except UpstreamError as exc:
            if outcome.engine_url:
                raise WholeCallFailed(str(exc)) from exc
            self.metrics.errors.labels(kind="engine_unavailable").inc()
            return openai_error(503, f"decode engine unavailable: {exc}", "service_unavailable",
                                headers={"retry-after": str(RETRY_AFTER_S)})
        if upstream.status_code != 200:
            content = await upstream.error_body()
            if upstream.status_code == 503 and outcome.engine_url:
                raise WholeCallFailed(f"prefill-worker answered 503: {content[:200]!r}")
            self.metrics.errors.labels(kind=f"engine_{upstream.status_code}").inc()
            return Response(content, status_code=upstream.status_code, media_type="application/json",
                            headers=outcome.headers())
        # Hold the response until the first event is in: a decode engine that
        # produces nothing gets the request a clean 503, not a silent stream.
        events = upstream.events()
        try:
            first_event = await asyncio.wait_for(anext(events), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            await upstream.aclose()
            return self._decode_timeout(f"no first token within {self.first_token_timeout_s:.0f}s", request_id)
        except StopAsyncIteration:
            first_event = None
        except UpstreamError as exc:
            await upstream.aclose()
            self.metrics.errors.labels(kind="engine_unavailable").inc()
            return openai_error(503, f"decode engine stream broke: {exc}", "service_unavailable",
                                headers={"retry-after": str(RETRY_AFTER_S)})
        except asyncio.CancelledError:  # the client went away: abort the engine's request
            await upstream.aclose()
            raise

        def on_end(completed: bool, cached: int | None) -> None:
            self._finished(route, 200 if completed else 499, outcome)
            if completed:
                self.metrics.e2e.observe(time.monotonic() - t0)
                self._count_path(outcome, cached, request_id)
                self.sizer.learn(route, body, relay.prompt_tokens)

        relay = StreamRelay(upstream, first_event, events, metrics=self.metrics,
                            client_wants_usage=client_wants_usage, t0=t0, request_id=request_id, on_end=on_end)
        return RelayedResponse(relay, headers={**outcome.headers(), "cache-control": "no-cache"})

    async def models(self, request: Request) -> Response:
        if not self.keys.allows(request.headers.get("authorization")):
            return self._refuse(request.url.path, 401, "unauthorized", "missing or invalid API key "
                                "(send Authorization: Bearer <key>)", "authentication_error")
        try:
            resp = await self.client.get(f"{self.engine_url}/v1/models", timeout_s=10.0)
        except UpstreamError as exc:
            return openai_error(503, f"decode engine unavailable: {exc}", "service_unavailable")
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")

    async def health(self, _: Request) -> Response:
        # Public and unauthenticated: the state only. The reason can name internal addresses; it is in
        # the state file, `disaggctl status`, STATUS= and the log.
        state, serving, _reason = self.health_of()
        return JSONResponse({"state": state}, status_code=200 if serving else 503)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
            Route("/v1/models", self.models),
            Route("/health", self.health),
        ])

