"""The decode-worker's public, OpenAI-compatible front door.

Per request: ask prefill-worker to compute the prompt (it answers once the
prompt's KV is in LMCache), then generate on the decode engine, which loads the
prompt's KV chunks from LMCache instead of computing them. When prefill-worker
or lmcache-server is unusable, the KV-path canary says a hop is broken, or the
prefill call is slower than ``prefill_timeout_s`` or fails, the decode engine
computes the prompt itself: the request still succeeds and the fallback is
logged and counted.

Responses carry ``x-disagg-path``, truthfully: how the prompt reached the engine that answered
(the values and their reasons are :class:`daemons.names.RequestPath`, listed with what each means in
``docs/reference/metrics.md``). Which path a prompt takes is decided by the rules in
:mod:`daemons.routing` (short prompts, overflow, balancing) and the prefill call's outcome.

A streamed response's headers leave before the decode engine has reported
what it loaded: there the header is prefill's verdict (``disaggregated`` when
LMCache held every full chunk) and ``disagg_request_paths_total`` counts the
truth once the stream's usage arrives.

Deadlines: a non-streamed request whose decode engine has not answered within
``request_timeout_s`` fails with 503 and ``Retry-After`` (counted as
``decode_timeout``); a streamed one with no first token within
``first_token_timeout_s`` (counted the same) fails over to a prefill engine
when it was on this front door's own decode engine (nothing reached the client
yet), else 503. Closing the engine connection aborts it there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from daemons.edge.admission import Admission, Overloaded
from daemons.edge.auth import ApiKeys
from daemons.edge.disconnect import ClientGone, unless_disconnected
from daemons.edge.door_settings import FrontDoorSettings
from daemons.edge.errors import RETRY_AFTER_S, openai_error, unavailable
from daemons.edge.migration import Progress, can_migrate
from daemons.edge.request_limits import BadRequest, check_work, parse_json_object, read_body, too_large
from daemons.edge.request_limits import request_id as checked_request_id
from daemons.edge.sse_relay import RelayedResponse, StreamRelay
from daemons.edge.timing import ASK_HEADER, COMMENT, Timing
from daemons.edge.upstream import Answer, Stream, Upstream, UpstreamError, UpstreamTimeout
from daemons.kv import crosscheck
from daemons.kv.canary import cached_tokens
from daemons.metrics import FrontDoorMetrics
from daemons.names import RequestPath
from daemons.routing.placement import BY_LOAD, FULL_HERE, NoEngine, Placement
from daemons.routing.prefill_router import PrefillChoice, PrefillOutcome, PrefillRouter


class PrefillLost(Exception):
    """The prefill-worker a call went to was found unusable while the call was in flight."""


class WholeCallFailed(Exception):
    """A request sent whole to a prefill-worker (decode_busy, failover) got no answer from it: not served there."""


class DecodeFailed(Exception):
    """The decode engine could not be reached, or its stream broke before the first event: nothing was sent
    to the client yet, so another engine may serve the request."""




log = logging.getLogger(__name__)

# What a vLLM engine answers when it cannot serve at all (its EngineCore died: 500, then it exits; a proxy in
# front: 502/503): the request is served by another engine instead.
ENGINE_DOWN_STATUSES = (500, 502, 503)
# On a request one decode-worker's front door passes to a sibling's (decode_worker.instances): that one serves it on
# its own engine or a prefill engine, never a third front door.
FORWARDED_HEADER = "x-disagg-forwarded"


__all__ = ["FrontDoor", "FrontDoorSettings", "PrefillOutcome"]


async def _chain(first: list[str], rest: AsyncIterator[str]) -> AsyncIterator[str]:
    for event in first:
        yield event
    async for event in rest:
        yield event


def _ms_header(resp: Answer, name: str) -> float | None:
    try:
        return float(resp.headers[name]) / 1000
    except (KeyError, ValueError):
        return None


def _int_header(resp: Answer, name: str) -> int | None:
    try:
        return int(resp.headers[name])
    except (KeyError, ValueError):
        return None


class FrontDoor:
    def __init__(
        self,
        settings: FrontDoorSettings,
        *,
        client: Upstream,
        metrics: FrontDoorMetrics,
        router: PrefillRouter,
        health: Callable[[], tuple[str, bool, str]],
        keys: ApiKeys | None = None,
        decode_down: Callable[[], str] = lambda: "",
        engine_pressed: Callable[[], bool] = lambda: False,
    ) -> None:
        s = self.settings = settings
        self.engine_url = s.engine_url
        self.client = client
        self.metrics = metrics
        self.router = router
        self.health_of = health  # (state, serving, reason) for /health
        self.admission = Admission(s.max_concurrent_requests, s.max_queued_requests, s.queue_timeout_s)
        self.keys = keys if keys is not None else ApiKeys(None, env={})
        self.placement = Placement(lambda: self.settings, router=router, metrics=metrics, admission=self.admission,
                                   decode_down=decode_down, engine_pressed=engine_pressed)

    def _tokens(self, route: str, body: dict[str, Any]) -> int:
        """The prompt's length in tokens, estimated (:mod:`daemons.routing.prompt_size`)."""
        return self.placement.sizer.estimate(route, body)

    def _relay_when_full(self, request: Request, balanced: bool) -> PrefillChoice | None:
        """One admission for the box: a request on the box's endpoint that finds this front door full goes to a
        sibling with a free slot instead of waiting here (it holds a slot past the cap here while it is relayed: at
        most max_concurrent_requests such, so a full front door relays no more than it serves). None: it takes its
        turn here."""
        if not balanced or FORWARDED_HEADER in request.headers or not self.admission.full:
            return None
        choice = self.router.roomy_sibling()
        if choice.url is None or not self.admission.take_beyond(self.settings.max_concurrent_requests):
            return None
        return choice

    async def prefill(self, route: str, body: dict[str, Any], request_id: str,
                      hop: dict[str, str] | None = None, balanced: bool = False,
                      relay_to: PrefillChoice | None = None) -> PrefillOutcome:
        """Where the request goes (:meth:`Placement.place`), else have a prefill-worker compute the prompt (its KV
        goes to LMCache); the router counts the outcome."""
        tokens = self._tokens(route, body)
        placed = self.placement.place(tokens, request_id, hop, balanced, relay_to)
        if placed is not None:
            return placed
        with self.placement.backlog.at_prefill(tokens):
            return await self._prefill_call(route, body, request_id, tokens)

    async def _prefill_call(self, route: str, body: dict[str, Any], request_id: str, tokens: int) -> PrefillOutcome:
        choice = self.router.choose()
        if choice.url is None:
            return self.router.report(PrefillOutcome("fallback", choice.skip), request_id)
        with self.router.holding(choice.daemon, tokens):
            return await self._call_prefill(choice, route, body, request_id)

    async def _call_prefill(self, choice: PrefillChoice, route: str, body: dict[str, Any],
                            request_id: str) -> PrefillOutcome:
        prefill_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        t0 = time.monotonic()
        try:
            resp = await self._unless_lost(choice.daemon, self.client.post(
                f"{choice.url}{route}", prefill_body, timeout_s=self.settings.prefill_timeout_s,
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
                first = crosscheck.parse_first_token_header(resp.headers.get(crosscheck.HEADER)) \
                    if self.settings.kv_crosscheck else None
                outcome = PrefillOutcome("disaggregated", seconds=elapsed,
                                         expected=_int_header(resp, "x-disagg-kv-expected-tokens"),
                                         stored=_int_header(resp, "x-disagg-kv-stored-tokens"), first_token=first,
                                         store_s=_ms_header(resp, "x-disagg-store-wait-ms"))
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

    # -- the KV cross-check (daemons.kv.crosscheck) -----------------------------------------------
    def _checking(self, outcome: PrefillOutcome, body: dict[str, Any]) -> bool:
        """Is this request's first token checked against the prefill engine's (greedy, KV from prefill)?"""
        return outcome.first_token is not None and not outcome.engine_url and crosscheck.greedy(body)

    def _judge(self, outcome: PrefillOutcome, decode: crosscheck.FirstToken | None, request_id: str) -> None:
        if outcome.first_token is None or decode is None:
            return
        verdict = crosscheck.judge(outcome.first_token, decode, self.settings.kv_crosscheck_tolerance)
        outcome.kv_check = verdict
        self.metrics.kv_checks.labels(result=verdict.result).inc()
        if not verdict.ok:
            log.error("[%s] KV cross-check failed: %s; the decode engine answered from KV that means something "
                      "else than the prompt (path kv_mismatch); checking the KV path now", request_id, verdict.detail)
            self.router.kv_missed("kv_mismatch")
        elif verdict.result == "near_tie":
            log.info("[%s] KV cross-check: a near tie (%s)", request_id, verdict.detail)

    @staticmethod
    def _strip(body: dict[str, Any], chat: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Take out of an answer or chunk what the cross-check added and the client did not ask for."""
        keep_ids = bool(body.get("return_token_ids"))
        keep_logprobs = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
        return lambda obj: crosscheck.strip_probe(obj, keep_ids=keep_ids, keep_logprobs=keep_logprobs)

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
    async def generate_balanced(self, request: Request) -> Response:
        """One completion that came in on the box's one endpoint (``decode_worker.shared_port``)."""
        return await self.generate(request, balanced=True)

    async def generate(self, request: Request, balanced: bool = False) -> Response:
        """One completion: checks, a slot, prefill, decode; never a hang, never a 500 for bad input."""
        route = request.url.path
        t0 = time.monotonic()
        timing = Timing(t0)
        try:
            request_id = checked_request_id(request)
            if not self.keys.allows(request.headers.get("authorization")):
                raise BadRequest(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                 "authentication_error")
            too_large(request, self.settings.max_body_bytes)  # 413 at once, before a slot or a byte of the body
            timing.start()
            relay_to = self._relay_when_full(request, balanced)
            if relay_to is None:
                await self.admission.acquire()  # before the body is read: a full box holds no queued bodies
            timing.end("queue")
        except BadRequest as exc:
            kind = {401: "unauthorized", 413: "too_large"}.get(exc.status, "bad_request")
            return self._refuse(route, exc.status, kind, exc.message, exc.kind)
        except Overloaded as exc:
            log.info("refused (%s): %d in progress, %d queued", exc.reason, self.admission.active,
                     self.admission.queued)
            return self._refuse(route, 429, "overloaded", f"too many requests in progress ({exc.reason}); retry",
                                "rate_limit_error", {"retry-after": str(RETRY_AFTER_S)})
        try:
            timing.start()
            body = parse_json_object(await asyncio.wait_for(read_body(request, self.settings.max_body_bytes),
                                                            self.settings.body_timeout_s))
            check_work(body, self.settings.work_limits)
            timing.end("read")
        except (BadRequest, TimeoutError) as exc:
            self.admission.release()
            if isinstance(exc, TimeoutError):
                exc = BadRequest(408, f"request body not received within {self.settings.body_timeout_s:.0f}s",
                                 "invalid_request_error")
            kind = {413: "too_large", 408: "slow_client"}.get(exc.status, "bad_request")
            return self._refuse(route, exc.status, kind, exc.message, exc.kind)
        self.metrics.in_flight.inc()
        streamed = False
        status = 499
        outcome: PrefillOutcome | None = None
        try:
            hop = self._hop(request)
            outcome = await unless_disconnected(request, self.prefill(route, body, request_id, hop, balanced,
                                                                      relay_to))
            outcome.hop = hop
            if outcome.seconds:
                timing.set("prefill", outcome.seconds)
                timing.set("store", outcome.store_s)
            timing.wants_comment = ASK_HEADER in request.headers
            if outcome.rejection is not None:
                # The prefill engine refused the request (too long a prompt, a bad parameter):
                # the decode engine would too. The client hears why, and no decode work is done.
                status, content = outcome.rejection
                return Response(content, status_code=status, media_type="application/json")
            with self.placement.backlog.on_decode(outcome.local_tokens):  # until the first token: the decode engine's prefill
                tried: list[str] = []  # siblings that failed this request
                # The decode engine, else another engine that can serve it: each sibling, then prefill engines.
                attempts = 3 + len(self.router.siblings)
                for _attempt in range(attempts):
                    try:
                        response = await unless_disconnected(request, self._answer(route, body, request_id, outcome,
                                                                                   timing))
                        break
                    except WholeCallFailed as exc:
                        if outcome.path == RequestPath.SIBLING and outcome.held is not None:
                            tried.append(outcome.held[0])  # not that sibling again
                        self.placement.release(outcome)
                        if outcome.path == RequestPath.SIBLING and outcome.reason == FULL_HERE:
                            # Full here, and the sibling that had room took it not: the box is full.
                            log.info("[%s] refused: full here, and %s did not take it (%s)", request_id,
                                     outcome.engine_url, exc)
                            self.metrics.errors.labels(kind="overloaded").inc()
                            status = 429
                            return openai_error(429, "too many requests in progress (full); retry",
                                                "rate_limit_error", headers={"retry-after": str(RETRY_AFTER_S)})
                        if outcome.path == RequestPath.SIBLING and outcome.reason == BY_LOAD:
                            # Sent away by load, not because this engine cannot serve: it is served here.
                            log.warning("[%s] %s did not take the request (%s): served here", request_id,
                                        outcome.engine_url, exc)
                            outcome = await unless_disconnected(request, self.prefill(route, body, request_id, hop))
                            outcome.hop = hop
                            if outcome.rejection is not None:
                                status, content = outcome.rejection
                                return Response(content, status_code=status, media_type="application/json")
                            continue
                        if outcome.path in (RequestPath.FAILOVER, RequestPath.SIBLING):
                            log.warning("[%s] %s to %s failed (%s)", request_id, outcome.path, outcome.engine_url, exc)
                            why, outcome = outcome.reason, None
                            outcome = self.placement.failover(why, request_id, self._tokens(route, body), hop, tried)
                            continue
                        log.warning("[%s] prefill-worker did not serve the request (%s): the decode engine does",
                                    request_id, exc)
                        outcome = self.router.report(PrefillOutcome("fallback", "prefill_unreachable"), request_id)
                        outcome.hop = hop
                    except DecodeFailed as exc:
                        log.warning("[%s] decode engine could not serve the request (%s): failing over", request_id,
                                    exc)
                        outcome = self.placement.failover(str(exc), request_id, self._tokens(route, body), hop)
                else:
                    raise NoEngine(f"no engine served the request in {attempts} attempts")
                streamed = isinstance(response, StreamingResponse)
            status = response.status_code
            return response
        except NoEngine as exc:
            log.warning("[%s] refused: %s (%s)", request_id, exc, exc.detail or "no detail")
            self.metrics.errors.labels(kind="no_engine").inc()
            status = 503
            return unavailable(f"no engine can serve this request now: {exc}")
        except ClientGone:
            log.info("[%s] client went away after %.1fs: its engine requests are aborted", request_id,
                     time.monotonic() - t0)
            self.metrics.errors.labels(kind="client_gone").inc()
            return Response(status_code=499)
        except Exception:  # noqa: BLE001 - a bug: the client hears 500, counted as one (never as a client's 499)
            log.exception("[%s] unexpected error while serving the request", request_id)
            self.metrics.errors.labels(kind="internal").inc()
            status = 500
            return openai_error(500, "internal error (the front door's log has it)", "internal_server_error")
        finally:
            if not streamed:  # a stream ends (and counts itself) when its relay ends
                self._finished(route, status, outcome)
                if outcome is not None and status < 500 and "ttft" in timing.stages:
                    timing.since_arrival("total")
                    self._access(request_id, route, status, outcome, timing)

    async def _answer(self, route: str, body: dict[str, Any], request_id: str, outcome: PrefillOutcome,
                      timing: Timing) -> Response:
        """Generate on the decode engine (or, decode_busy, whole on a prefill engine)."""
        if body.get("stream"):
            return await self._stream(route, body, request_id, outcome, timing)
        response = await self._complete(route, body, request_id, outcome, timing)
        if response.status_code == 200:
            self.metrics.e2e.observe(time.monotonic() - timing.t0)
        return response

    def _timed(self, timing: Timing, outcome: PrefillOutcome, cached: int | None = None) -> dict[str, str]:
        """The path headers and Server-Timing, up to the first token; the stages observed in the histograms."""
        for stage in ("read", "queue", "prefill", "store", "decode", "ttft"):
            if stage in timing.stages:
                self.metrics.stages.labels(stage=stage).observe(timing.stages[stage])
        headers = outcome.headers(cached)
        headers["server-timing"] = timing.header(headers["x-disagg-path"])
        return headers

    def _access(self, request_id: str, route: str, status: int, outcome: PrefillOutcome, timing: Timing,
                cached: int | None = None) -> None:
        if self.settings.access_log:
            path, _ = outcome.verdict(cached)
            log.info("[%s] %s %d %s server-timing: %s", request_id, route, status, path, timing.header())

    @staticmethod
    def _hop(request: Request) -> dict[str, str] | None:
        """What a call to a sibling decode-worker's front door carries for this request: the client's key and the
        mark that keeps it from going on to a third. None: it came from a sibling (it goes no further)."""
        if FORWARDED_HEADER in request.headers:
            return None
        hop = {FORWARDED_HEADER: "1"}
        if (key := request.headers.get("authorization")) is not None:
            hop["authorization"] = key
        return hop

    @staticmethod
    def _call_headers(request_id: str, hop: dict[str, str] | None = None) -> dict[str, str]:
        """What a call to an engine carries; to a sibling's front door also ``hop`` (:meth:`_hop`)."""
        return {"x-request-id": request_id, **(hop or {})}

    @classmethod
    def _outcome_headers(cls, outcome: PrefillOutcome, request_id: str) -> dict[str, str]:
        return cls._call_headers(request_id, outcome.hop if outcome.path == RequestPath.SIBLING else None)

    @staticmethod
    def _elsewhere_statuses(outcome: PrefillOutcome) -> tuple[int, ...]:
        """Answers after which a whole request goes to another engine: an engine down; from a sibling's front door
        also full (429: the client was admitted here) and a key it does not take (401/403: the client's key is
        good here; the two api_keys_file differ)."""
        return (*ENGINE_DOWN_STATUSES, 401, 403, 429) if outcome.path == RequestPath.SIBLING else ENGINE_DOWN_STATUSES

    def _finished(self, route: str, status: int, outcome: PrefillOutcome | None) -> None:
        self.placement.release(outcome)
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(route=route, status=str(status)).inc()
        self.admission.release()

    def _refuse(self, route: str, status: int, kind: str, message: str, error_type: str,
                headers: dict[str, str] | None = None) -> Response:
        self.metrics.errors.labels(kind=kind).inc()
        self.metrics.requests.labels(route=route, status=str(status)).inc()
        return openai_error(status, message, error_type, headers=headers)

    def _engine_unavailable(self, outcome: PrefillOutcome, exc: UpstreamError) -> Response:
        """The engine could not be reached before any answer: a whole request on a prefill engine is retried
        elsewhere (:class:`WholeCallFailed`), one on the decode engine fails over (:class:`DecodeFailed`)."""
        self.metrics.errors.labels(kind="engine_unavailable").inc()
        if outcome.engine_url:
            raise WholeCallFailed(str(exc)) from exc
        raise DecodeFailed(f"decode engine unreachable: {exc}") from exc

    def _decode_timeout(self, what: str, request_id: str) -> Response:
        log.warning("[%s] decode engine: %s; answering 503", request_id, what)
        self.metrics.errors.labels(kind="decode_timeout").inc()
        self.router.kv_missed("decode_timeout")
        return unavailable(f"decode engine: {what}")

    def _no_first_token(self, outcome: PrefillOutcome, request_id: str) -> Response:
        """A stream's engine sent no first token in time. Nothing has reached the client: on this front door's own
        decode engine (wedged, or stuck on a KV store that went away) the request fails over like one the engine
        refused (:class:`DecodeFailed`); elsewhere (a prefill engine serving it whole, a sibling) it is a 503."""
        what = f"no first token within {self.settings.first_token_timeout_s:g}s"
        if outcome.engine_url:
            return self._decode_timeout(what, request_id)
        self.metrics.errors.labels(kind="decode_timeout").inc()
        self.router.kv_missed("decode_timeout")
        raise DecodeFailed(f"decode engine: {what}")

    async def _complete(self, route: str, body: dict[str, Any], request_id: str, outcome: PrefillOutcome,
                        timing: Timing) -> Response:
        engine_url = outcome.engine_url or self.engine_url
        chat = route.endswith("/chat/completions")
        check = self._checking(outcome, body)
        sent = {**body, **crosscheck.decode_fields(body, chat)} if check else body
        timing.start()
        try:
            resp = await asyncio.wait_for(self.client.post(
                f"{engine_url}{route}", sent, headers=self._outcome_headers(outcome, request_id),
                orphan=not outcome.engine_url,  # this worker's own engine: never aborted before it answers
            ), self.settings.request_timeout_s)
        except TimeoutError:
            return self._decode_timeout(f"no answer within {self.settings.request_timeout_s:.0f}s", request_id)
        except UpstreamError as exc:
            return self._engine_unavailable(outcome, exc)
        if resp.status_code in self._elsewhere_statuses(outcome) and outcome.engine_url:
            # A prefill engine that cannot serve (draining for a planned restart, its EngineCore gone): elsewhere.
            raise WholeCallFailed(f"{outcome.engine_url} answered {resp.status_code}: {resp.text[:200]}")
        if resp.status_code in ENGINE_DOWN_STATUSES and not outcome.engine_url:
            self.metrics.errors.labels(kind=f"engine_{resp.status_code}").inc()
            raise DecodeFailed(f"decode engine answered {resp.status_code}: {resp.text[:200]}")
        timing.end("decode")
        timing.since_arrival("ttft")
        cached: int | None = None
        content = resp.content
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
                    self.placement.sizer.learn(route, body, usage.get("prompt_tokens"))
                if check:
                    self._judge(outcome, crosscheck.decode_first_token(answer), request_id)
                    content = json.dumps(self._strip(body, chat)(answer), ensure_ascii=False).encode()
            self._count_path(outcome, cached, request_id)
        else:
            self.metrics.errors.labels(kind=f"engine_{resp.status_code}").inc()
        return Response(content, status_code=resp.status_code, media_type="application/json",
                        headers=self._timed(timing, outcome, cached))

    async def _stream(
        self, route: str, body: dict[str, Any], request_id: str, outcome: PrefillOutcome, timing: Timing
    ) -> Response:
        t0 = timing.t0
        opts: dict[str, Any] = body["stream_options"] if isinstance(body.get("stream_options"), dict) else {}
        client_wants_usage = bool(opts.get("include_usage"))
        upstream_body = {**body, "stream_options": {**opts, "include_usage": True}}
        migrate = self.settings.migration_attempts > 0 and can_migrate(body)
        if migrate:  # the token ids a continuation needs, should the engine die mid-stream
            upstream_body["return_token_ids"] = True
        chat = route.endswith("/chat/completions")
        check = self._checking(outcome, body)
        if check:
            upstream_body.update(crosscheck.decode_fields(body, chat))
        deadline = time.monotonic() + self.settings.first_token_timeout_s
        timing.start()
        try:
            upstream: Stream = await asyncio.wait_for(self.client.stream(
                f"{outcome.engine_url or self.engine_url}{route}", upstream_body,
                headers=self._outcome_headers(outcome, request_id), orphan=not outcome.engine_url,
            ), self.settings.first_token_timeout_s)
        except TimeoutError:
            return self._no_first_token(outcome, request_id)
        except UpstreamError as exc:
            return self._engine_unavailable(outcome, exc)
        if upstream.status_code != 200:
            content = await upstream.error_body()
            if upstream.status_code in self._elsewhere_statuses(outcome) and outcome.engine_url:
                raise WholeCallFailed(f"{outcome.engine_url} answered {upstream.status_code}: {content[:200]!r}")
            if upstream.status_code in ENGINE_DOWN_STATUSES and not outcome.engine_url:
                self.metrics.errors.labels(kind=f"engine_{upstream.status_code}").inc()
                raise DecodeFailed(f"decode engine answered {upstream.status_code}: {content[:200]!r}")
            self.metrics.errors.labels(kind=f"engine_{upstream.status_code}").inc()
            return Response(content, status_code=upstream.status_code, media_type="application/json",
                            headers=outcome.headers())
        # Hold the response until the first event is in: a decode engine that
        # produces nothing gets the request a clean 503, not a silent stream.
        events = upstream.events()
        try:
            first_event = await asyncio.wait_for(anext(events), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            await upstream.aclose()
            return self._no_first_token(outcome, request_id)
        except StopAsyncIteration:
            first_event = None
        except UpstreamError as exc:
            await upstream.aclose()
            return self._engine_unavailable(outcome, exc)
        except asyncio.CancelledError:  # the client went away: abort the engine's request
            await upstream.aclose()
            raise
        prelude: list[str] = []
        if check and first_event is not None:  # the headers say the cross-check's verdict: hold them for it
            try:
                prelude = await asyncio.wait_for(self._until_first_token(first_event, events, outcome, request_id),
                                                 max(0.0, deadline - time.monotonic()))
            except (TimeoutError, UpstreamError) as exc:
                await upstream.aclose()
                if isinstance(exc, UpstreamError):
                    return self._engine_unavailable(outcome, exc)
                return self._no_first_token(outcome, request_id)
            except asyncio.CancelledError:
                await upstream.aclose()
                raise
            first_event, events = prelude[0], _chain(prelude[1:], events)
        timing.end("decode")  # the first event is in (a chat stream's role-only opener comes with the first token)
        timing.since_arrival("ttft")

        def on_end(completed: bool, cached: int | None) -> None:
            # Unfinished: the engine side broke (502, what a 5xx alert must see) or the client left (499).
            self._finished(route, 200 if completed else 502 if relay.broken else 499, outcome)
            if completed:
                self.metrics.e2e.observe(timing.since_arrival("total"))
                self.metrics.stages.labels(stage="total").observe(timing.stages["total"])
                self._count_path(outcome, cached, request_id)
                self.placement.sizer.learn(route, body, relay.prompt_tokens)
                self._access(request_id, route, 200, outcome, timing, cached)

        def trailer() -> str:  # the whole breakdown, for a client that asked, before [DONE]
            timing.since_arrival("total")
            return COMMENT + timing.header(outcome.verdict(relay.cached)[0])

        failed_on = [outcome.engine_url or self.engine_url]

        async def resume(progress: Progress, why: str) -> tuple[Stream, AsyncIterator[str]] | None:
            """The rest of this stream from an engine that can serve it (not the one whose stream broke)."""
            cont = progress.continuation(body)
            if cont is None:
                return None
            for _attempt in range(2 + len(self.router.siblings)):  # a refusing sibling passes it to the next
                target, headers = self._continue_on(failed_on, request_id, outcome.hop)
                if target is None:
                    return None
                failed_on.append(target)
                stream = await asyncio.wait_for(self.client.stream(
                    f"{target}/v1/completions", cont, headers=headers, orphan=target == self.engine_url),
                    self.settings.first_token_timeout_s)
                if stream.status_code == 200:
                    return stream, stream.events()
                log.warning("[%s] continuation refused by %s: %d %r", request_id, target, stream.status_code,
                            (await stream.error_body())[:200])
                await stream.aclose()
                if target not in self.router.siblings.values():
                    return None
            return None

        progress = Progress(client_wants_ids=bool(body.get("return_token_ids"))) if migrate else None
        relay = StreamRelay(upstream, first_event, events, metrics=self.metrics,
                            client_wants_usage=client_wants_usage, t0=t0, request_id=request_id, on_end=on_end,
                            progress=progress, resume=resume, max_migrations=self.settings.migration_attempts,
                            idle_timeout_s=self.settings.stream_idle_timeout_s,
                            strip=self._strip(body, chat) if check else None,
                            trailer=trailer if timing.wants_comment else None)
        return RelayedResponse(relay, headers={**self._timed(timing, outcome), "cache-control": "no-cache"},
                               write_timeout_s=self.settings.write_timeout_s)

    async def _until_first_token(self, first_event: str, events: AsyncIterator[str], outcome: PrefillOutcome,
                                 request_id: str) -> list[str]:
        """The stream's events up to the first that carries a token (chat opens with a role-only one), judged."""
        held = [first_event]
        while True:
            event = held[-1]
            if event.startswith("data: ") and event != "data: [DONE]":
                try:
                    token = crosscheck.decode_first_token(json.loads(event[6:]))
                except ValueError:
                    token = None
                if token is not None:
                    self._judge(outcome, token, request_id)
                    return held
            if event == "data: [DONE]" or len(held) > 8:
                return held
            try:
                held.append(await anext(events))
            except StopAsyncIteration:
                return held

    def _continue_on(self, failed: Sequence[str], request_id: str,
                     hop: dict[str, str] | None) -> tuple[str | None, dict[str, str]]:
        """Where a broken stream goes on, and what the call carries: the decode engine if it did not break and can
        serve, else a sibling decode-worker's front door (``hop`` allowing) that has not failed it, else a ready
        prefill engine's pass-through route (``/whole``); None when there is none. ``failed``: the URLs that
        broke it so far."""
        headers = self._call_headers(request_id)
        if self.engine_url not in failed and not self.placement.decode_down():  # never back to the one that broke it
            return self.engine_url, headers
        if hop is not None:
            tried = [name for name, url in self.router.siblings.items() if url in failed]
            sibling = self.router.choose_sibling(exclude=tried)
            if sibling.url is not None:
                log.info("[%s] the stream goes on on %s", request_id, sibling.daemon)
                return sibling.url, self._call_headers(request_id, hop)
        choice = self.router.choose_any()
        if choice.url is None:
            return None, headers
        log.info("[%s] the stream goes on on %s", request_id, choice.daemon)
        return f"{choice.url}/whole", headers

    async def models(self, request: Request) -> Response:
        if not self.keys.allows(request.headers.get("authorization")):
            return self._refuse(request.url.path, 401, "unauthorized", "missing or invalid API key "
                                "(send Authorization: Bearer <key>)", "authentication_error")
        try:
            resp = await self.client.get(f"{self.engine_url}/v1/models", timeout_s=10.0)
        except UpstreamError as exc:
            log.warning("GET /v1/models: decode engine unavailable: %s", exc)
            return unavailable("decode engine unavailable")
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")

    async def health(self, _: Request) -> Response:
        # Public and unauthenticated: the state only. The reason can name internal addresses; it is in
        # the state file, `disaggctl status`, STATUS= and the log.
        state, serving, _reason = self.health_of()
        return JSONResponse({"state": state}, status_code=200 if serving else 503)

    def app(self, shared: bool = False) -> Starlette:
        """The front door's routes; ``shared``: on the box's one endpoint, where requests are routed by load."""
        generate = self.generate_balanced if shared else self.generate
        return Starlette(routes=[
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/models", self.models),
            Route("/health", self.health),
        ])

