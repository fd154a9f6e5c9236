"""The front door's calls to the engines and prefill-workers, on aiohttp's client.

Every request crosses two hops (prefill call, decode call); the client's cost
is paid twice per request on the busiest path of the stack. httpx's connection
pool scans every pooled connection several times per request (a fifth of the
front door's CPU under load); aiohttp's does not (``benchmarks/frontdoor_overhead.py``).
Probes, peers and canaries stay on httpx: they are few.

Errors come out as two exceptions, so callers need not know the library:
:class:`UpstreamTimeout` (a deadline passed) and :class:`UpstreamError`
(refused, reset, broken). Abandoning a call (task cancelled) closes its
connection instead of returning it to the pool: vLLM aborts a request whose
connection closes.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

CONNECT_TIMEOUT_S = 5.0
# Idle pooled connections are dropped after this long: below the 5 s after which uvicorn (vLLM's
# API server, our prefill API) closes an idle keep-alive connection. aiohttp's default (15 s) let a
# call go out on a connection the server was closing: ServerDisconnectedError, a spurious 503 from
# prefill-worker (seen on a prefill call sent 5 s after the previous one).
KEEPALIVE_S = 3.0


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

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers

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
                buffer += decoder.decode(chunk)
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    yield event
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(repr(exc)) from exc
        if buffer.strip():
            raise UpstreamError(f"stream ended inside an event ({len(buffer)} bytes)")

    async def aclose(self) -> None:
        """Done with it: an unfinished stream's connection is closed (the engine aborts the request)."""
        if not self._response.closed:
            self._response.close()


class Upstream:
    """One connection pool for the front door's proxied calls (made in the serving event loop).

    The pool itself is unbounded: admission bounds the calls (``max_concurrent_requests``, live on SIGHUP). A pool
    sized from it at start stayed at the old size after a reload raised the cap, and calls past it waited for a
    connection until their connect deadline and were taken for a broken engine."""

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self.headers = dict(headers or {})  # on every call (across hosts: the cluster's secret)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None,
                                               keepalive_timeout=KEEPALIVE_S),
                trust_env=False, auto_decompress=False, skip_auto_headers=("User-Agent",), headers=self.headers)
        return self._session

    async def post(self, url: str, body: bytes | dict[str, Any], *, headers: Mapping[str, str] | None = None,
                   timeout_s: float | None = None) -> Answer:
        """POST a JSON body and read the whole answer; ``timeout_s`` bounds the whole call (None: no bound)."""
        return await self._call("POST", url, body, headers, timeout_s)

    async def get(self, url: str, *, timeout_s: float | None = None) -> Answer:
        return await self._call("GET", url, None, None, timeout_s)

    async def _call(self, method: str, url: str, body: bytes | dict[str, Any] | None,
                    headers: Mapping[str, str] | None, timeout_s: float | None) -> Answer:
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=CONNECT_TIMEOUT_S)
        data, hdrs = _encode(body, headers)
        try:
            async with self.session.request(method, url, data=data, headers=hdrs, timeout=timeout) as resp:
                return Answer(resp.status, resp.headers, await resp.read())
        except TimeoutError as exc:
            raise UpstreamTimeout(f"no answer within {timeout_s}s") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(repr(exc)) from exc

    async def stream(self, url: str, body: bytes | dict[str, Any], *,
                     headers: Mapping[str, str] | None = None) -> Stream:
        """POST and return as soon as the answer's headers are in (no deadline on the body: the caller's)."""
        data, hdrs = _encode(body, headers)
        try:
            resp = await self.session.post(url, data=data, headers=hdrs,
                                           timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S))
        except TimeoutError as exc:
            raise UpstreamTimeout("no connection") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(repr(exc)) from exc
        return Stream(resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _encode(body: bytes | dict[str, Any] | None, headers: Mapping[str, str] | None) -> tuple[bytes | None,
                                                                                             dict[str, str]]:
    hdrs = dict(headers or {})
    if body is None:
        return None, hdrs
    hdrs["content-type"] = "application/json"
    return (body if isinstance(body, bytes) else json.dumps(body).encode()), hdrs
