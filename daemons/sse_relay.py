"""Relaying a decode engine's server-sent events to the client.

Events pass through whole (never a truncated one: a stream that ends inside an
event is a broken stream), time to first token and inter-token latency are
measured on the way, and the usage chunk the front door always asks for is
counted and forwarded only when the client asked for it too. A stream that
breaks ends with one OpenAI-style error event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse

from .canary import cached_tokens
from .metrics import FrontDoorMetrics
from .upstream import Stream, UpstreamError

log = logging.getLogger(__name__)

BROKEN_STREAM_EVENT = json.dumps(
    {"error": {"message": "engine stream broke", "type": "service_unavailable", "code": 503}})


def has_token(obj: dict[str, Any]) -> bool:
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


class StreamRelay:
    """One streamed response: iterate :meth:`body` to relay it; ``on_end(completed, cached)`` runs once at the end
    (``cached``: prompt tokens the decode engine loaded, from the usage chunk; None when it never came)."""

    def __init__(self, upstream: Stream, first_event: str | None, events: AsyncIterator[str], *,
                 metrics: FrontDoorMetrics, client_wants_usage: bool, t0: float, request_id: str,
                 on_end: Callable[[bool, int | None], None]) -> None:
        self.upstream = upstream
        self.first_event = first_event
        self.events = events
        self.metrics = metrics
        self.client_wants_usage = client_wants_usage
        self.t0 = t0
        self.request_id = request_id
        self.on_end = on_end
        self._first: float | None = None
        self._last: float | None = None
        self._completed = False
        self._cached: int | None = None
        self.prompt_tokens: int | None = None  # as the decode engine counted them (the usage chunk)
        self._closed = False

    async def _all_events(self) -> AsyncIterator[str]:
        if self.first_event is not None:
            yield self.first_event
        async for event in self.events:
            yield event

    def _forward(self, event: str) -> tuple[bool, int | None]:
        """Account for one event: (pass it to the client?, cached tokens if it is the usage chunk)."""
        if not event.startswith("data: ") or event == "data: [DONE]":
            return True, None
        try:
            obj = json.loads(event[6:])
        except ValueError:
            obj = {}
        if not isinstance(obj, dict):
            obj = {}
        if obj.get("usage") and not obj.get("choices"):
            self.metrics.count_usage(obj["usage"])
            usage = obj["usage"]
            self.prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            return self.client_wants_usage, cached_tokens(obj)
        if has_token(obj):
            now = time.monotonic()
            if self._first is None:
                self._first = now
                self.metrics.ttft.observe(now - self.t0)
            elif self._last is not None:
                self.metrics.itl.observe(now - self._last)
            self._last = now
        return True, None

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for event in self._all_events():
                forward, usage_cached = self._forward(event)
                if usage_cached is not None:
                    self._cached = usage_cached
                self._completed = self._completed or event == "data: [DONE]"
                if forward:
                    yield (event + "\n\n").encode()
        except UpstreamError as exc:
            log.warning("[%s] decode engine stream broke: %s", self.request_id, exc)
            self.metrics.errors.labels(kind="stream_broken").inc()
            yield f"data: {BROKEN_STREAM_EVENT}\n\n".encode()
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the engine's stream (aborting it there if unfinished) and report the end, once."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.upstream.aclose()
        finally:
            self.on_end(self._completed, self._cached)


class ClosingStreamingResponse(StreamingResponse):
    """An event stream whose engine side is closed however the response ends, even when the client went away
    before the first byte (then the body is never iterated and its own cleanup never runs)."""

    def __init__(self, body: AsyncIterator[bytes], close: Callable[[], Awaitable[None]],
                 headers: dict[str, str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


class RelayedResponse(ClosingStreamingResponse):
    """The client's streaming response of one :class:`StreamRelay`."""

    def __init__(self, relay: StreamRelay, headers: dict[str, str]) -> None:
        super().__init__(relay.body(), relay.close, headers)
        self.relay = relay
