"""prefill-worker: a vLLM engine as LMCache KV producer, serving prefill requests.

Its API takes the same bodies as OpenAI's /v1/completions and
/v1/chat/completions and always runs them with one output token and no
streaming: computing the prompt pushes its KV into LMCache, where the decode
engine picks it up. ``/whole/v1/...`` passes a request to the engine as it is
(streamed or not) and relays the answer untouched: the front door's path
``decode_busy``, a short prompt served start to end here while the decode engine
is busier (:mod:`daemons.routing.engine_share`).

The engine answers as soon as it has computed the prompt, but its connector
stores the KV into LMCache asynchronously: on a GPU the store lands a few
milliseconds *after* the answer, and a decode engine that looked then found
nothing and recomputed the whole prompt. So a prefill call is answered only
once LMCache holds the prompt's full chunks (asked with LMCache's own lookup,
see :mod:`daemons.kv.kv_lookup`), or when ``kv_path.store_timeout_s`` has passed;
either way the answer says how many tokens are stored:

  x-disagg-kv-expected-tokens: full-chunk tokens of the prompt
  x-disagg-kv-stored-tokens:   of those, in LMCache when we answered

Ready when lmcache-server is ready, the engine answers and its stores land.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemons.children.worker import EngineDaemon
from daemons.config import Config
from daemons.edge.cluster_auth import HEADER, ClusterKeyMiddleware, cluster_headers
from daemons.edge.disconnect import ClientGone, unless_disconnected
from daemons.edge.errors import openai_error, unavailable
from daemons.edge.request_limits import BadRequest, parse_json_object, read_body
from daemons.edge.request_limits import request_id as checked_request_id
from daemons.edge.sse_relay import BROKEN_STREAM_EVENT, ClosingStreamingResponse
from daemons.edge.upstream import Upstream, UpstreamError
from daemons.kv import crosscheck
from daemons.kv.canary import canary_prompt, vocabulary
from daemons.kv.kv_lookup import KVLookup
from daemons.metrics import PrefillMetrics
from daemons.runtime.cli import run_daemon
from daemons.runtime.lifecycle import DaemonFailed
from daemons.runtime.states import State

log = logging.getLogger(__name__)


# What only generation needs: prefill computes the prompt once and answers with one token, so
# several choices, beams, log-probabilities or a minimum length would only cost (or, for
# min_tokens > 1, make the engine refuse a one-token request).
GENERATION_ONLY = ("stream", "stream_options", "n", "best_of", "use_beam_search", "length_penalty", "logprobs",
                   "top_logprobs", "prompt_logprobs", "min_tokens", "echo")


def as_prefill(body: dict[str, object], *, chat: bool = False) -> dict[str, object]:
    """The same request, cut down to computing the prompt: one token, no stream. A greedy request also asks
    for that token's log-probabilities (the KV cross-check: :mod:`daemons.kv.crosscheck`)."""
    out = {k: v for k, v in body.items() if k not in GENERATION_ONLY}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out["return_token_ids"] = True  # the prompt's token ids: what we ask LMCache about
    if crosscheck.greedy(body):
        out.update(crosscheck.probe_fields(chat))
    return out


def prompt_token_ids(answer: Any) -> list[int] | None:
    """The prompt's token ids from an engine answer made with ``return_token_ids``."""
    try:
        ids = answer.get("prompt_token_ids") or answer["choices"][0]["prompt_token_ids"]
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
    return ids if isinstance(ids, list) else None


# Prefills in a row whose KV did not reach LMCache before prefill-worker says so.
MISSED_STORES_DEGRADED = 3


class PrefillWorker(EngineDaemon):
    """Run the prefill engine (KV producer) and serve prefill requests."""

    kind = "prefill-worker"
    role = "kv_producer"

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)
        self.prefill_metrics = PrefillMetrics(self.registry)
        self.chunk_size = config.lmcache.chunk_size
        self.store_timeout_s = config.kv_path.store_timeout_s
        self.kv = KVLookup(
            server_url=f"tcp://{self.deployment.lmcache_address}:{config.lmcache.port}",
            model=str(config.model.path),
            mq_timeout_s=config.lmcache.mq_timeout_s,
            heartbeat_interval_s=config.lmcache.heartbeat_interval_s,
            log_path=Path(config.log_dir) / f"{self.name}-kv-lookup.log", logs=config.logs,
            world_size=self.worker.tensor_parallel_size,
        )
        self.proxy = Upstream()  # the prefill calls' own pool, on aiohttp (probes use httpx)
        self.cluster_secret = cluster_headers(config).get(HEADER, "")  # ConfigError (exit 78): unreadable, short
        self.max_body_bytes = config.decode_worker.max_body_bytes
        self.missed_stores = 0  # prefills in a row whose KV was not in LMCache by the deadline
        self.last_miss = ""
        self.last_store_landed = time.monotonic()
        self._vocab = vocabulary(config.model.path)
        self._self_test: asyncio.Task[None] | None = None
        self.failed_self_tests = 0  # in a row, while LMCache answered lookups

    @property
    def api_host(self) -> str:
        # One box: loopback (config check). Several hosts: the private address, for the decode hosts.
        return self.deployment.listen_address(self.name)

    async def start_up(self) -> None:
        if not await self.start_serving(self.app(), "prefill API"):
            return
        try:
            await self.kv.start()
        except RuntimeError as exc:
            log.error("%s: prefill answers will not wait for LMCache stores until it runs", exc)
        self.set_state(State.READY)

    async def check(self) -> bool:
        ok = await self.engine_ok()
        if self.state.serving:
            self.kv.ensure_started()  # the lookup child died: bring it back
        if self.failed_self_tests >= self.config.kv_path.restart_after_failures:
            # LMCache answers lookups, yet what this engine computes does not reach it:
            # the engine's connector is wedged. A fresh engine connects again.
            stuck = time.monotonic() - self.last_store_landed
            raise DaemonFailed(f"no prefill's KV reached LMCache for {stuck:.0f}s ({self.failed_self_tests} store "
                               f"self-tests failed, {self.last_miss}) while LMCache answers; exiting to be restarted")
        if self.missed_stores >= MISSED_STORES_DEGRADED and (self._self_test is None or self._self_test.done()):
            # Out of rotation while degraded: no real prefill would ever clear this. Test the store ourselves.
            self._self_test = asyncio.create_task(self.store_self_test(), name="store-self-test")
        if self.state.serving:
            lm = await self.peers.view("lmcache-server")
            if not lm.ready:
                self.set_state(State.DEGRADED, f"lmcache-server {lm.state}: {lm.reason}")
            elif self.engine_problem:
                self.set_state(State.DEGRADED, self.engine_problem)
            elif self.missed_stores >= MISSED_STORES_DEGRADED:
                self.set_state(State.DEGRADED, f"the last {self.missed_stores} prefills' KV did not reach LMCache "
                                               f"within {self.store_timeout_s}s ({self.last_miss})")
            else:
                self.set_state(State.READY)
        return ok

    async def store_self_test(self) -> None:
        """One synthetic prompt through this engine; its KV landing in LMCache clears the missed stores."""
        body = {"model": self.config.model.name, "prompt": canary_prompt(random.Random(), self._vocab, self.chunk_size),
                "max_tokens": 1, "return_token_ids": True}
        try:
            resp = await self.http.post(f"{self.engine_url}/v1/completions", json=body,
                                        timeout=self.config.kv_path.canary_timeout_s)
            if resp.status_code == 200:
                await self.confirm_stored(resp.json(), "store-self-test")
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("store self-test: engine did not answer: %r", exc)
            return  # an engine that does not answer is the stall detector's case
        if self.missed_stores == 0:
            self.failed_self_tests = 0
        elif self.kv.healthy:
            self.failed_self_tests += 1
            log.warning("store self-test %d: the KV did not reach LMCache (%s)", self.failed_self_tests,
                        self.last_miss)

    async def shut_down(self) -> None:
        if self._self_test is not None:
            self._self_test.cancel()
            await asyncio.gather(self._self_test, return_exceptions=True)
        await self.kv.stop()
        await super().shut_down()
        await self.proxy.aclose()

    async def confirm_stored(self, answer: Any, request_id: str) -> dict[str, str]:
        """Wait until LMCache holds the prompt's full chunks (bounded); the headers that say how it went."""
        ids = prompt_token_ids(answer)
        if ids is None:
            return {}
        # The full chunks a decode engine can load: it must compute the prompt's last
        # token itself, so a prompt of exactly N chunks can reuse only N - 1 of them.
        expected = max(0, len(ids) - 1) // self.chunk_size * self.chunk_size
        stored = 0
        t0 = time.monotonic()
        if expected:
            try:
                stored = await self.kv.wait_stored(ids, expected, self.store_timeout_s)
            except (RuntimeError, TimeoutError) as exc:
                # Not known: say nothing about it (the decode side's cached tokens will tell).
                why = str(exc) if str(exc) else f"no answer within kv_path.store_timeout_s ({self.store_timeout_s:g}s)"
                log.warning("[%s] cannot ask LMCache whether the KV is stored: %s", request_id, why)
                return {"x-disagg-kv-expected-tokens": str(expected)}
        waited = time.monotonic() - t0
        self.prefill_metrics.store_wait.observe(waited)
        stored = min(stored, expected)
        self.prefill_metrics.kv_tokens.labels(state="stored").inc(stored)
        self.prefill_metrics.kv_tokens.labels(state="missing").inc(expected - stored)
        if stored < expected:
            self.missed_stores += 1
            self.last_miss = f"{stored} of {expected} tokens stored"
            log.warning("[%s] LMCache holds %d of the prompt's %d full-chunk tokens after %.2fs",
                        request_id, stored, expected, time.monotonic() - t0)
        else:
            if self.missed_stores:
                log.info("prefill KV reaches LMCache again")
            self.missed_stores = 0
            self.last_store_landed = time.monotonic()
        return {"x-disagg-kv-expected-tokens": str(expected), "x-disagg-kv-stored-tokens": str(stored),
                "x-disagg-store-wait-ms": f"{waited * 1000:.1f}"}

    def app(self) -> Any:
        async def prefill(request: Request) -> Response:
            route = request.url.path
            try:
                request_id = checked_request_id(request)
                body = parse_json_object(await read_body(request, self.max_body_bytes))
            except BadRequest as exc:
                self.prefill_metrics.requests.labels(status=str(exc.status)).inc()
                return openai_error(exc.status, exc.message, exc.kind)
            t0 = time.monotonic()
            self.prefill_metrics.in_flight.inc()
            try:
                resp = await unless_disconnected(request, self.proxy.post(
                    f"{self.engine_url}{route}", as_prefill(body, chat=route.endswith("/chat/completions")),
                    headers={"x-request-id": request_id}, orphan=True,
                ))
            except ClientGone:
                # The front door gave up (its prefill deadline) or its client left. The engine's request is not
                # aborted while the engine defers requests (an abort while it loads KV from LMCache kills it:
                # daemons/edge/upstream.py): it runs on unseen until it ends or the engine defers nothing.
                log.info("[%s] caller went away after %.1fs: the engine's request runs on until an abort is safe "
                         "there", request_id, time.monotonic() - t0)
                self.prefill_metrics.requests.labels(status="499").inc()
                return Response(status_code=499)
            except UpstreamError as exc:
                self.prefill_metrics.requests.labels(status="503").inc()
                log.warning("prefill engine unavailable: %s", exc)
                return unavailable("prefill engine unavailable")
            finally:
                self.prefill_metrics.in_flight.dec()
            elapsed = time.monotonic() - t0
            self.prefill_metrics.requests.labels(status=str(resp.status_code)).inc()
            if resp.status_code != 200:
                return Response(resp.content, status_code=resp.status_code, media_type="application/json")
            self.prefill_metrics.seconds.observe(elapsed)
            try:
                answer = resp.json()
                self.prefill_metrics.tokens.inc(int(answer["usage"]["prompt_tokens"]))
            except (ValueError, KeyError, TypeError):
                answer = None
            headers = await self.confirm_stored(answer, request_id)
            first = crosscheck.prefill_first_token(answer) if crosscheck.greedy(body) else None
            if first is not None:  # what the decode engine must pick too
                headers[crosscheck.HEADER] = crosscheck.first_token_header(first)
            return Response(resp.content, status_code=200, media_type="application/json", headers=headers)

        async def whole(request: Request) -> Response:
            route = request.url.path.removeprefix("/whole")
            count = self.prefill_metrics.whole_requests
            try:
                request_id = checked_request_id(request)
                raw = await read_body(request, self.max_body_bytes)
                streamed = parse_json_object(raw).get("stream") is True
            except BadRequest as exc:
                count.labels(status=str(exc.status)).inc()
                return openai_error(exc.status, exc.message, exc.kind)
            url, headers = f"{self.engine_url}{route}", {"x-request-id": request_id}
            try:
                if not streamed:
                    resp = await unless_disconnected(request, self.proxy.post(url, raw, headers=headers, orphan=True))
                    count.labels(status=str(resp.status_code)).inc()
                    return Response(resp.content, status_code=resp.status_code, media_type="application/json")
                upstream = await unless_disconnected(request, self.proxy.stream(url, raw, headers=headers,
                                                                                 orphan=True))
            except ClientGone:
                count.labels(status="499").inc()
                return Response(status_code=499)
            except UpstreamError as exc:
                count.labels(status="503").inc()
                log.warning("prefill engine unavailable: %s", exc)
                return unavailable("prefill engine unavailable")
            count.labels(status=str(upstream.status_code)).inc()
            if upstream.status_code != 200:
                return Response(await upstream.error_body(), status_code=upstream.status_code,
                                media_type="application/json")

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.chunks():
                        yield chunk
                except UpstreamError as exc:  # the engine's stream broke: one error event, as the front door's relay
                    log.warning("[%s] engine stream broke: %s", request_id, exc)
                    yield f"data: {BROKEN_STREAM_EVENT}\n\n".encode()
                finally:
                    await upstream.aclose()  # a caller gone mid-stream: the engine aborts the request (once it streams)

            return ClosingStreamingResponse(relay(), upstream.aclose, headers={"cache-control": "no-cache"})

        async def health(_: Request) -> Response:
            return JSONResponse({"state": self.state.value, "reason": self.reason},
                                status_code=200 if self.state.serving else 503)

        app = Starlette(routes=[
            Route("/v1/completions", prefill, methods=["POST"]),
            Route("/v1/chat/completions", prefill, methods=["POST"]),
            Route("/whole/v1/completions", whole, methods=["POST"]),
            Route("/whole/v1/chat/completions", whole, methods=["POST"]),
            Route("/health", health),
            self.state_route(),
        ])
        # Across hosts the prefill API is on the private network: only the cluster's own daemons may call it.
        return ClusterKeyMiddleware(app, self.cluster_secret) if self.cluster_secret else app


def main(argv: list[str] | None = None) -> int:
    return run_daemon(PrefillWorker, argv)


if __name__ == "__main__":
    sys.exit(main())
