"""The front door's calls to the engines and prefill-workers, on aiohttp's client.

Every request crosses two hops (prefill call, decode call); the client's cost
is paid twice per request on the busiest path of the stack. httpx's connection
pool scans every pooled connection several times per request (a fifth of the
front door's CPU under load); aiohttp's does not (``benchmarks/frontdoor_overhead.py``).
Probes, peers and canaries stay on httpx: they are few.

Errors come out as two exceptions, so callers need not know the library:
:class:`UpstreamTimeout` (a deadline passed) and :class:`UpstreamError`
(refused, reset, broken). Abandoning a call (task cancelled, deadline passed,
stream closed) closes its connection: vLLM aborts a request whose connection
closes, and our daemons do the same for theirs.

Except a call to an engine (``orphan=True``): abandoned before its answer
begins, it is not aborted: it runs on unseen (an *orphan*) until the
engine's first streamed bytes, its whole answer, or the engine reports no
request deferred (:class:`Orphans`), then its connection closes.
vLLM aborts a request whose connection closes, and an abort that lands while
the engine is loading the request's KV from LMCache (WAITING_FOR_REMOTE_KVS)
kills the engine: LMCache 0.5.3's MP connector then reports the request
finished twice and vLLM's scheduler asserts (``assert req_id in
self.requests``; LMCache#4938, #4185, vLLM#46240, unfixed in the pinned
versions). On the GPU a prefill-worker whose caller's prefill deadline passed
under overload aborted such a prefill and took its engine down, and LMCache's
server with it. Once an engine streams, its load is over and an abort is safe:
a stream closed after its first bytes closes at once. An orphan is closed
after :data:`ORPHAN_S` whatever it holds.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from daemons.children.stall import engine_load

CONNECT_TIMEOUT_S = 5.0
# Idle pooled connections are dropped after this long: below the 5 s after which uvicorn (vLLM's
# API server, our prefill API) closes an idle keep-alive connection. aiohttp's default (15 s) let a
# call go out on a connection the server was closing: ServerDisconnectedError, a spurious 503 from
# prefill-worker (seen on a prefill call sent 5 s after the previous one).
KEEPALIVE_S = 3.0
# An abandoned call runs on at most this long (then it is closed, the engine's request aborted): longer than any
# engine queue a deadline gives up on, short enough that a wedged engine holds no connection for good.
ORPHAN_S = 600.0
CALM_POLL_S = 0.25  # how often an engine with orphans is asked whether an abort is safe there

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """The call failed: refused, reset, a broken stream."""


class UpstreamTimeout(UpstreamError):
    """The call's deadline passed."""


@dataclass
class Answer:
    """A whole (non-streamed) answer."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class Stream:
    """A streamed answer: ``status_code``, ``headers``, :meth:`events` (server-sent events), :meth:`aclose`."""

    def __init__(self, response: aiohttp.ClientResponse, orphans: Orphans | None = None) -> None:
        self._response = response
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers
        self._orphans = orphans
        self._begun = False  # the engine has sent body bytes: its KV load is over, an abort is safe
        self._abandoned = False  # closed before it began: an orphan runs the rest

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(repr(exc)) from exc
        finally:
            self._response.release()

    async def error_body(self) -> bytes:
        """The body of an answer that is not a stream (an error), or b"" if it cannot be read; closed after."""
        try:
            return await self.aread()
        except UpstreamError:
            return b""
        finally:
            await self.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, untouched (a pass-through relay)."""
        try:
            async for chunk in self._response.content.iter_any():
                self._begun = True
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(repr(exc)) from exc

    async def events(self) -> AsyncIterator[str]:
        """The server-sent events, one string each (without the blank line); a stream that ends inside an
        event raises :class:`UpstreamError` (never pass a truncated event on)."""
        buffer = ""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span two chunks
        try:
            async for chunk in self._response.content.iter_any():
                self._begun = True
                buffer += decoder.decode(chunk)
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    yield event
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(repr(exc)) from exc
        if buffer.strip():
            raise UpstreamError(f"stream ended inside an event ({len(buffer)} bytes)")

    async def aclose(self) -> None:
        """Done with it: an unfinished stream's connection is closed (the engine aborts the request), once the
        engine has begun to send (before that the stream is an orphan until it does: the module's docstring)."""
        if self._response.closed or self._abandoned:  # (a relay's finally and its response may both close it)
            return
        if self._begun or self._orphans is None:
            self._response.close()
            return
        self._abandoned = True
        self._orphans.adopt(self._until_begun(), "stream", str(self._response.url))

    async def _until_begun(self) -> None:
        try:
            await self._response.content.readany()
        finally:
            self._response.close()


class Orphans:
    """Abandoned engine calls, running on until their engine has begun to answer or an abort is safe there, at most
    :data:`ORPHAN_S`.

    An abort is safe once the engine has no deferred request (``vllm:num_requests_waiting_by_reason{reason=
    "deferred"}`` 0: none waits for an LMCache lookup or load, the only state in which an abort kills it): an engine
    that is not backed up drops an abandoned call within :data:`CALM_POLL_S`, so a client that leaves stops its work
    as before; a backed-up one finishes it. One poll of an engine's /metrics serves all its orphans."""

    def __init__(self, fetch: Callable[[str], Awaitable[str]] | None = None) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.adopted = 0  # since start: how often a caller walked away before its engine answered
        self._fetch = fetch  # GET a URL's body (None: never judged calm, orphans run until they are answered)
        self._calm: dict[str, asyncio.Task[None]] = {}  # an engine's poll, while it has orphans
        self._waiting: dict[str, int] = {}  # orphans per engine
        self._closed = False

    def adopt(self, work: Any, what: str, url: str) -> None:
        """Run ``work`` (the abandoned call's remainder) until it ends, its engine (``url``'s origin) is calm, or
        :data:`ORPHAN_S` has passed; then cancel it (closing its connection: the engine aborts what is left)."""
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"

        call = asyncio.ensure_future(work)
        if self._closed:  # shutting down: nothing runs on
            call.cancel()
            return

        async def bounded() -> None:
            self._waiting[base] = self._waiting.get(base, 0) + 1
            calm = asyncio.shield(self._calm_task(base))
            try:
                done, _ = await asyncio.wait({call, calm}, timeout=ORPHAN_S, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    log.warning("an abandoned %s call to %s had no answer after %.0fs: closed (its engine aborts it)",
                                what, base, ORPHAN_S)
            finally:
                call.cancel()
                calm.cancel()
                await asyncio.gather(call, calm, return_exceptions=True)
                self._waiting[base] -= 1
                if not self._waiting[base]:  # the engine's last orphan: stop asking it
                    del self._waiting[base]
                    poll = self._calm.pop(base, None)
                    if poll is not None:
                        poll.cancel()

        self.adopted += 1
        task = asyncio.get_running_loop().create_task(bounded())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _calm_task(self, base: str) -> asyncio.Task[None]:
        task = self._calm.get(base)
        if task is None or task.done():
            task = self._calm[base] = asyncio.get_running_loop().create_task(self._until_calm(base))
        return task

    async def _until_calm(self, base: str) -> None:
        """Returns once ``base``'s engine reports no deferred request on two polls in a row; never if it cannot say
        (no fetch, no such metric: an older vLLM), so its orphans run until answered."""
        if self._fetch is None:
            await asyncio.Event().wait()
        calm_polls = 0
        while not self._closed:  # (a cancel that lands as a fetch ends can be lost on Python 3.11: wait_for)
            try:
                deferred = engine_load(await self._fetch(f"{base}/metrics")).deferred  # type: ignore[misc]
            except (UpstreamError, OSError, aiohttp.ClientError, TimeoutError):
                deferred = None
            # Twice in a row, a poll apart: the gauge is as of the engine's last step, and a request may be taken
            # into a lookup between a step and the abort.
            calm_polls = calm_polls + 1 if deferred == 0 else 0
            if calm_polls >= 2:
                return
            await asyncio.sleep(CALM_POLL_S)

    async def aclose(self) -> None:
        """Shutdown: every orphan is closed now (the engines abort what they hold)."""
        self._closed = True
        for task in [*self.tasks, *self._calm.values()]:
            task.cancel()
        await asyncio.gather(*self.tasks, *self._calm.values(), return_exceptions=True)


class Upstream:
    """One connection pool for the front door's proxied calls (made in the serving event loop).

    The pool itself is unbounded: admission bounds the calls (``max_concurrent_requests``, live on SIGHUP). A pool
    sized from it at start stayed at the old size after a reload raised the cap, and calls past it waited for a
    connection until their connect deadline and were taken for a broken engine."""

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self.headers = dict(headers or {})  # on every call (across hosts: the cluster's secret)
        self._session: aiohttp.ClientSession | None = None
        self.orphans = Orphans(self._metrics_text)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None,
                                               keepalive_timeout=KEEPALIVE_S),
                trust_env=False, auto_decompress=False, skip_auto_headers=("User-Agent",), headers=self.headers)
        return self._session

    async def post(self, url: str, body: bytes | dict[str, Any], *, headers: Mapping[str, str] | None = None,
                   timeout_s: float | None = None, orphan: bool = False) -> Answer:
        """POST a JSON body and read the whole answer; ``timeout_s`` bounds the wait (None: no bound); ``orphan``:
        a call to an engine, which runs on when abandoned (the module's docstring)."""
        return await self._call("POST", url, body, headers, timeout_s, orphan)

    async def get(self, url: str, *, timeout_s: float | None = None) -> Answer:
        return await self._call("GET", url, None, None, timeout_s, False)

    async def _call(self, method: str, url: str, body: bytes | dict[str, Any] | None,
                    headers: Mapping[str, str] | None, timeout_s: float | None, orphan: bool) -> Answer:
        if not orphan:  # aiohttp's own deadline: no task of ours on the busiest path
            return await self._answer(method, url, body, headers, timeout_s)
        call = asyncio.ensure_future(self._answer(method, url, body, headers, None))
        try:
            return await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except TimeoutError as exc:
            self.orphans.adopt(call, method, url)
            raise UpstreamTimeout(f"no answer within {timeout_s}s") from exc
        except asyncio.CancelledError:
            self.orphans.adopt(call, method, url)
            raise

    async def _answer(self, method: str, url: str, body: bytes | dict[str, Any] | None,
                      headers: Mapping[str, str] | None, timeout_s: float | None) -> Answer:
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=CONNECT_TIMEOUT_S)
        data, hdrs = _encode(body, headers)
        try:
            async with self.session.request(method, url, data=data, headers=hdrs, timeout=timeout) as resp:
                return Answer(resp.status, resp.headers, await resp.read())
        except TimeoutError as exc:
            raise UpstreamTimeout("no connection" if timeout_s is None else f"no answer within {timeout_s}s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(repr(exc)) from exc

    async def stream(self, url: str, body: bytes | dict[str, Any], *,
                     headers: Mapping[str, str] | None = None, orphan: bool = False) -> Stream:
        """POST and return as soon as the answer's headers are in (no deadline on the body: the caller's);
        ``orphan``: a call to an engine, which runs on when abandoned before it streams (the module's docstring)."""
        if not orphan:
            return Stream(await self._open(url, body, headers))
        call = asyncio.ensure_future(self._open(url, body, headers))
        try:
            resp = await asyncio.shield(call)
        except asyncio.CancelledError:
            self.orphans.adopt(self._until_begun(call), "stream", url)
            raise
        return Stream(resp, self.orphans)

    async def _open(self, url: str, body: bytes | dict[str, Any], headers: Mapping[str, str] | None
                    ) -> aiohttp.ClientResponse:
        data, hdrs = _encode(body, headers)
        try:
            return await self.session.post(url, data=data, headers=hdrs,
                                           timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S))
        except TimeoutError as exc:
            raise UpstreamTimeout("no connection") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(repr(exc)) from exc

    @staticmethod
    async def _until_begun(call: asyncio.Future[aiohttp.ClientResponse]) -> None:
        await Stream(await call)._until_begun()

    async def _metrics_text(self, url: str) -> str:
        return (await self.get(url, timeout_s=2.0)).text

    async def aclose(self) -> None:
        await self.orphans.aclose()
        if self._session is not None:
            await self._session.close()


def _encode(body: bytes | dict[str, Any] | None, headers: Mapping[str, str] | None) -> tuple[bytes | None,
                                                                                             dict[str, str]]:
    hdrs = dict(headers or {})
    if body is None:
        return None, hdrs
    hdrs["content-type"] = "application/json"
    return (body if isinstance(body, bytes) else json.dumps(body).encode()), hdrs
