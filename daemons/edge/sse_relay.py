"""Relaying a decode engine's server-sent events to the client.

Events pass through whole (never a truncated one: a stream that ends inside an
event is a broken stream), time to first token and inter-token latency are
measured on the way, and the usage chunk the front door always asks for is
counted and forwarded only when the client asked for it too. A stream that
breaks is continued on another engine where it can be (:mod:`daemons.edge.migration`);
else it ends with one OpenAI-style error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse

from daemons.edge.migration import Progress, data_event
from daemons.edge.upstream import Stream, UpstreamError
from daemons.kv.canary import cached_tokens
from daemons.metrics import FrontDoorMetrics

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


def engine_failed(obj: dict[str, Any]) -> bool:
    """An error event an engine sends when it cannot go on (a 5xx in the stream), not a request's own error."""
    error = obj.get("error")
    if not isinstance(error, dict) or obj.get("choices"):
        return False
    code = error.get("code")
    return not isinstance(code, int) or code >= 500


# Continue a broken stream: (progress so far, why it broke) -> the new stream and its events, or None.
Resume = Callable[[Progress, str], Awaitable["tuple[Stream, AsyncIterator[str]] | None"]]


class StreamRelay:
    """One streamed response: iterate :meth:`body` to relay it; ``on_end(completed, cached)`` runs once at the end
    (``cached``: prompt tokens the decode engine loaded, from the usage chunk; None when it never came)."""

    def __init__(self, upstream: Stream, first_event: str | None, events: AsyncIterator[str], *,
                 metrics: FrontDoorMetrics, client_wants_usage: bool, t0: float, request_id: str,
                 on_end: Callable[[bool, int | None], None], progress: Progress | None = None,
                 resume: Resume | None = None, max_migrations: int = 0,
                 strip: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 trailer: Callable[[], str] | None = None, idle_timeout_s: float | None = None) -> None:
        self.upstream = upstream
        self.idle_timeout_s = idle_timeout_s  # no event from the engine this long: the stream is broken
        self.broken = False  # ended by an engine-side failure (not completed, not the client leaving)
        self.trailer = trailer  # an SSE comment sent just before [DONE] (the request's Server-Timing)
        self.strip = strip  # what the front door added to the engine call and the client did not ask for
        # Migration: the token ids seen so far, and how to go on elsewhere when the engine's stream breaks.
        self.progress = progress
        self.resume = resume if progress is not None else None
        self.max_migrations = max_migrations
        self.migrations = 0
        self._continuing_after: int | None = None  # tokens generated before the current continuation
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

    async def _within_deadline(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """``events``, each within ``idle_timeout_s`` of the last: a stopped engine's stream breaks (UpstreamError)
        instead of holding its client until the engine is found wedged."""
        if self.idle_timeout_s is None:
            async for event in events:
                yield event
            return
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout_s):  # no task per event
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamError(f"no event from the engine for {self.idle_timeout_s:.0f}s") from None
            yield event

    def _forward(self, event: str) -> tuple[bool, int | None, str]:
        """Account for one event: (pass it to the client?, cached tokens if it is the usage chunk, the event as
        the client gets it)."""
        if not event.startswith("data: ") or event == "data: [DONE]":
            return True, None, event
        try:
            obj = json.loads(event[6:])
        except ValueError:
            obj = {}
        if not isinstance(obj, dict):
            obj = {}
        if self.resume is not None and engine_failed(obj):
            # The engine failed mid-stream and said so in an event (vLLM's EngineCore died, the API server shuts
            # down): the stream is broken, whatever follows; go on elsewhere rather than relay the failure.
            raise UpstreamError(f"the engine's stream carried an error: {str(obj.get('error'))[:200]}")
        if self.progress is not None and obj:
            if self._continuing_after is not None:
                obj = self.progress.reshape(obj, self._continuing_after)
            obj = self.progress.observe(obj)
            event = data_event(obj)
        if self.strip is not None and obj.get("choices"):
            obj = self.strip(obj)
            event = data_event(obj)
        if obj.get("usage") and not obj.get("choices"):
            self.metrics.count_usage(obj["usage"])
            usage = obj["usage"]
            self.prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            return self.client_wants_usage, cached_tokens(obj), event
        if has_token(obj):
            now = time.monotonic()
            if self._first is None:
                self._first = now
                self.metrics.ttft.observe(now - self.t0)
            elif self._last is not None:
                self.metrics.itl.observe(now - self._last)
            self._last = now
        return True, None, event

    async def body(self) -> AsyncIterator[bytes]:
        source = self._within_deadline(self._all_events())
        try:
            while True:
                try:
                    async for event in source:
                        forward, usage_cached, out = self._forward(event)
                        if usage_cached is not None:
                            self._cached = usage_cached
                        self._completed = self._completed or event == "data: [DONE]"
                        if event == "data: [DONE]" and self.trailer is not None:
                            yield (self.trailer() + "\n\n").encode()
                        if forward:
                            yield (out + "\n\n").encode()
                    if self._completed or self.resume is None:
                        return
                    raise UpstreamError("the stream ended without [DONE]")
                except UpstreamError as exc:
                    if self.progress is not None and self.progress.finished:
                        # Every token reached the client, finish_reason too; only the usage and [DONE] were lost
                        # (an engine stopped in between): the answer is whole, so the stream ends as one.
                        log.info("[%s] the engine's stream broke after its last token (%s): ended with [DONE]",
                                 self.request_id, exc)
                        for event in self.progress.closing_events(self.client_wants_usage):
                            yield (event + "\n\n").encode()
                        if self.trailer is not None:
                            yield (self.trailer() + "\n\n").encode()
                        yield b"data: [DONE]\n\n"
                        self._completed = True
                        return
                    moved = await self._migrate(str(exc))
                    if moved is None:
                        log.warning("[%s] engine stream broke: %s", self.request_id, exc)
                        self.metrics.errors.labels(kind="stream_broken").inc()
                        self.broken = True
                        yield f"data: {BROKEN_STREAM_EVENT}\n\n".encode()
                        return
                    source = self._within_deadline(moved)
        except Exception:  # noqa: BLE001 - a bug: the client gets the error event, the count sees a 5xx
            log.exception("[%s] unexpected error relaying the stream", self.request_id)
            self.metrics.errors.labels(kind="internal").inc()
            self.broken = True
            yield f"data: {BROKEN_STREAM_EVENT}\n\n".encode()
        finally:
            await self.close()

    async def _migrate(self, why: str) -> AsyncIterator[str] | None:
        """Go on on another engine from the tokens generated so far; its events, or None when it cannot."""
        if self.resume is None or self.progress is None or self.migrations >= self.max_migrations:
            return None
        self.migrations += 1
        before = len(self.progress.generated)
        try:
            got = await self.resume(self.progress, why)
        except (UpstreamError, TimeoutError) as exc:  # a continuation that does not answer in time ends it too
            log.warning("[%s] could not continue the stream elsewhere: %s", self.request_id, exc or "no answer in time")
            got = None
        if got is None:
            self.metrics.migrations.labels(outcome="failed").inc()
            return None
        old, (self.upstream, events) = self.upstream, got
        await old.aclose()
        self._continuing_after = before
        self.metrics.migrations.labels(outcome="continued").inc()
        log.warning("[%s] engine stream broke (%s): continued elsewhere after %d generated tokens", self.request_id,
                    why, before)
        return events

    @property
    def cached(self) -> int | None:
        """Prompt tokens the decode engine loaded (the usage chunk), once it came."""
        return self._cached

    async def close(self) -> None:
        """Close the engine's stream (aborting it there if unfinished) and report the end, once."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.upstream.aclose()
        finally:
            self.on_end(self._completed, self._cached)


class SlowReader(Exception):
    """The client did not take the stream's next bytes within the write deadline."""


class ClosingStreamingResponse(StreamingResponse):
    """An event stream whose engine side is closed however the response ends, even when the client went away
    before the first byte (then the body is never iterated and its own cleanup never runs)."""

    def __init__(self, body: AsyncIterator[bytes], close: Callable[[], Awaitable[None]],
                 headers: dict[str, str], write_timeout_s: float | None = None) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._close = close
        self.write_timeout_s = write_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        timeout = self.write_timeout_s

        async def send_within_deadline(message: Any) -> None:
            # A client that stops reading fills its socket buffer and blocks this send: past the deadline the
            # stream is dropped (its engine request aborted, its admission slot freed) instead of held for good.
            try:
                await asyncio.wait_for(send(message), timeout)
            except TimeoutError:
                raise SlowReader(f"the client read nothing for {timeout:.0f}s") from None

        try:
            await super().__call__(scope, receive, send_within_deadline if timeout else send)
        except SlowReader as exc:
            log.info("dropping a stream: %s", exc)
        finally:
            await self._close()


class RelayedResponse(ClosingStreamingResponse):
    """The client's streaming response of one :class:`StreamRelay`."""

    def __init__(self, relay: StreamRelay, headers: dict[str, str], write_timeout_s: float | None = None) -> None:
        super().__init__(relay.body(), relay.close, headers, write_timeout_s)
        self.relay = relay
