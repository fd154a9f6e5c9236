"""What the unit tests of the front door's logic share: stand-ins and waits with deadlines.

- :class:`FakeUpstream` for :class:`daemons.edge.upstream.Upstream`: each call goes to ``handler(httpx.Request)
  -> httpx.Response`` (plain or async), the shape httpx.MockTransport handlers have; an httpx timeout the handler
  raises becomes :class:`UpstreamTimeout`, any other httpx error :class:`UpstreamError`. It skips aiohttp's pool
  and timeouts: tests of the upstream client itself use a real socket (test_live_reload, test_stream_deadlines).
- :class:`OnePrefill` for :class:`daemons.routing.prefill_router.PrefillRouter`: one working prefill-worker.
- :func:`wait_until` / :func:`until`: poll a condition, in a thread or a coroutine, up to a generous deadline
  (ordering by an event seen, never by a sleep).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx

from daemons.edge.upstream import Answer, UpstreamError, UpstreamTimeout
from daemons.routing.prefill_router import PrefillChoice, PrefillOutcome, PrefillRouter


class OnePrefill:
    """Stands in for PrefillRouter: one working prefill-worker at ``url``; counts what it is asked and told."""

    def __init__(self, url: str = "http://prefill", daemon: str = "p0") -> None:
        self.url, self.daemon = url, daemon
        self.asked = 0  # choose() calls
        self.reports: list[PrefillOutcome] = []
        self.missed: list[str] = []  # kv_missed() reasons
        self.load: dict[str, int] = {}  # prompt tokens on the prefill engine (PrefillRouter.load)
        self.requests: dict[str, int] = {}  # requests there (PrefillRouter.requests)

    def working_prefills(self) -> list[str]:
        return [self.daemon]

    def choose(self) -> PrefillChoice:
        self.asked += 1
        return PrefillChoice(url=self.url, daemon=self.daemon)

    def choose_any(self) -> PrefillChoice:
        return PrefillChoice(url=self.url, daemon=self.daemon)

    siblings: dict[str, str] = {}  # noqa: RUF012 - never written: no sibling decode-worker

    def choose_sibling(self, exclude: object = ()) -> PrefillChoice:
        return PrefillChoice(skip="no_sibling")

    def report(self, outcome: PrefillOutcome, request_id: str) -> PrefillOutcome:
        self.reports.append(outcome)
        return outcome

    def kv_missed(self, reason: str) -> None:
        self.missed.append(reason)

    def lost_signal(self, name: str) -> asyncio.Event:
        return asyncio.Event()

    # The load it is told of, counted as the real router counts it (every take given back by the end).
    take = PrefillRouter.take
    give_back = PrefillRouter.give_back
    holding = PrefillRouter.holding
    relayed = PrefillRouter.relayed


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` (in a thread: real processes, files) until true; AssertionError naming ``what`` after
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.05)


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """:func:`wait_until` in a coroutine: the event loop runs meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        await asyncio.sleep(0.01)


class FakeStream:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers: Mapping[str, str] = response.headers
        self.closed = False

    async def aread(self) -> bytes:
        return self._response.content

    async def events(self) -> AsyncIterator[str]:
        if not self._response.is_stream_consumed and not hasattr(self._response, "_content"):
            await self._response.aread()  # a handler's streamed body (one that stalls: a wedged engine)
        text = self._response.text
        *events, rest = text.split("\n\n")
        for event in events:
            yield event
        if rest.strip():
            raise UpstreamError("stream ended inside an event")

    async def aclose(self) -> None:
        self.closed = True

    async def error_body(self) -> bytes:
        self.closed = True
        return self._response.content


class FakeUpstream:
    def __init__(self, handler: Callable[[httpx.Request], Any]) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.orphaned: list[str] = []  # the calls made as engine calls (run on when abandoned: edge/upstream.py)

    async def _respond(self, method: str, url: str, body: bytes | dict[str, Any] | None,
                       headers: Mapping[str, str] | None, timeout_s: float | None) -> httpx.Response:
        content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        request = httpx.Request(method, url, content=content, headers=dict(headers or {}))
        self.requests.append(request)

        async def call() -> httpx.Response:
            result = self.handler(request)
            return await result if inspect.isawaitable(result) else result

        try:
            return await asyncio.wait_for(call(), timeout_s)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise UpstreamTimeout(repr(exc)) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(repr(exc)) from exc

    async def post(self, url: str, body: bytes | dict[str, Any], *, headers: Mapping[str, str] | None = None,
                   timeout_s: float | None = None, orphan: bool = False) -> Answer:
        if orphan:
            self.orphaned.append(url)
        resp = await self._respond("POST", url, body, headers, timeout_s)
        return Answer(resp.status_code, resp.headers, resp.content)

    async def get(self, url: str, *, timeout_s: float | None = None) -> Answer:
        resp = await self._respond("GET", url, None, None, timeout_s)
        return Answer(resp.status_code, resp.headers, resp.content)

    async def stream(self, url: str, body: bytes | dict[str, Any], *,
                     headers: Mapping[str, str] | None = None, orphan: bool = False) -> FakeStream:
        if orphan:
            self.orphaned.append(url)
        return FakeStream(await self._respond("POST", url, body, headers, None))

    async def aclose(self) -> None:
        pass
