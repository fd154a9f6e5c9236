"""A stand-in for :class:`daemons.upstream.Upstream` in unit tests of the front door's logic.

Each call goes to ``handler(httpx.Request) -> httpx.Response`` (plain or async), the shape
httpx.MockTransport handlers have; an httpx timeout the handler raises becomes
:class:`UpstreamTimeout`, any other httpx error :class:`UpstreamError`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx

from daemons.edge.upstream import Answer, UpstreamError, UpstreamTimeout


class FakeStream:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers: Mapping[str, str] = response.headers
        self.closed = False

    async def aread(self) -> bytes:
        return self._response.content

    async def events(self) -> AsyncIterator[str]:
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
                   timeout_s: float | None = None) -> Answer:
        resp = await self._respond("POST", url, body, headers, timeout_s)
        return Answer(resp.status_code, resp.headers, resp.content)

    async def get(self, url: str, *, timeout_s: float | None = None) -> Answer:
        resp = await self._respond("GET", url, None, None, timeout_s)
        return Answer(resp.status_code, resp.headers, resp.content)

    async def stream(self, url: str, body: bytes | dict[str, Any], *,
                     headers: Mapping[str, str] | None = None) -> FakeStream:
        return FakeStream(await self._respond("POST", url, body, headers, None))

    async def aclose(self) -> None:
        pass
