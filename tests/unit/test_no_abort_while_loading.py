"""An engine request is never aborted before the engine has begun to answer (daemons/edge/upstream.py).

On the GPU, a prefill-worker whose caller's prefill deadline passed under overload closed its call to the engine;
vLLM aborted the request while it was loading KV from LMCache, LMCache 0.5.3's connector reported it finished twice
and vLLM's scheduler assert killed the engine (and LMCache's server was restarted after it). Here a real socket
stands in for the engine and sees when its connection closes: after the answer began (the call abandoned first
runs on unseen), never before; a stream closed after its first bytes closes at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from daemons.edge import upstream as upstream_module
from daemons.edge.upstream import Upstream, UpstreamTimeout

from .fakes import until

ANSWER = b'{"choices":[{"text":"x"}]}'
EVENT = b'data: {"choices":[{"text":"x"}]}\n\n'


class Engine:
    """One connection at a time: reads a request, then waits for ``answer`` before it writes the answer's body;
    ``closed_in``: what it had sent when the caller's side closed ("nothing", "headers", "body")."""

    def __init__(self, stream: bool, deferred: int = 1) -> None:
        self.stream = stream
        self.deferred = deferred  # what its /metrics says: requests waiting for an LMCache lookup or load
        self.got_request = asyncio.Event()
        self.answer = asyncio.Event()
        self.closed = asyncio.Event()
        self.sent = "nothing"
        self.closed_in = ""
        self.url = ""
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Engine:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1/completions"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /metrics"):
            text = (f'vllm:num_requests_waiting_by_reason{{engine="0",model_name="m",reason="capacity"}} 0.0\n'
                    f'vllm:num_requests_waiting_by_reason{{engine="0",model_name="m",reason="deferred"}} '
                    f'{self.deferred:.1f}\n').encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: "
                         + str(len(text)).encode() + b"\r\n\r\n" + text)
            await writer.drain()
            writer.close()
            return
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length"))
        await reader.readexactly(length)
        self.got_request.set()
        watcher = asyncio.ensure_future(reader.read())  # b"" when the caller's side closes

        def on_close(_: object) -> None:
            self.closed_in = self.sent
            self.closed.set()

        watcher.add_done_callback(on_close)
        if self.stream:  # vLLM sends a stream's headers before the request reaches the engine
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            self.sent = "headers"
        await asyncio.wait({asyncio.ensure_future(self.answer.wait()), watcher}, return_when=asyncio.FIRST_COMPLETED)
        if self.closed.is_set():
            return
        if self.stream:
            self.sent = "body"
            writer.write(f"{len(EVENT):x}\r\n".encode() + EVENT + b"\r\n")
        else:
            self.sent = "body"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)
        await writer.drain()
        await watcher
        writer.close()


async def abandoned_then_answered(engine: Engine, client: Upstream, abandon: Callable[[], Awaitable[None]]) -> None:
    """``abandon`` walks away from the call; then, unless the engine already saw its connection close (the old
    behaviour: an abort), the engine answers; the connection must close only after that."""
    await abandon()
    orphans = getattr(client, "orphans", None)  # (before the fix there were none: the call was closed at once)
    await until(lambda: engine.closed.is_set() or (orphans is not None and len(orphans.tasks) == 1),
                "the call closed or orphaned")
    engine.answer.set()
    await asyncio.wait_for(engine.closed.wait(), 20)
    assert engine.closed_in == "body", f"the engine's connection closed after it sent {engine.closed_in}"
    await until(lambda: not client.orphans.tasks, "the orphan gone once the engine answered")
    assert client.orphans.adopted == 1


@pytest.mark.parametrize("how", ["cancelled", "deadline"])
def test_a_call_abandoned_before_its_answer_runs_on_until_the_answer(how: str) -> None:
    async def scenario() -> None:
        async with Engine(stream=False) as engine:
            client = Upstream()
            try:
                if how == "deadline":
                    async def abandon() -> None:
                        with pytest.raises(UpstreamTimeout):
                            await client.post(engine.url, {"prompt": "p"}, timeout_s=0.2, orphan=True)
                else:
                    async def abandon() -> None:  # the prefill-worker's caller went away: its call is cancelled
                        call = asyncio.ensure_future(client.post(engine.url, {"prompt": "p"}, orphan=True))
                        await asyncio.wait_for(engine.got_request.wait(), 20)
                        call.cancel()
                        await asyncio.gather(call, return_exceptions=True)
                await abandoned_then_answered(engine, client, abandon)
            finally:
                await client.aclose()

    asyncio.run(scenario())


def test_a_stream_closed_before_its_first_bytes_runs_on_until_they_come() -> None:
    async def scenario() -> None:
        async with Engine(stream=True) as engine:
            client = Upstream()
            try:
                async def abandon() -> None:  # no first token in time, or the client left before it
                    stream = await client.stream(engine.url, {"prompt": "p", "stream": True}, orphan=True)
                    assert stream.status_code == 200
                    await stream.aclose()
                await abandoned_then_answered(engine, client, abandon)
            finally:
                await client.aclose()

    asyncio.run(scenario())


def test_a_stream_closed_after_its_first_bytes_closes_at_once() -> None:
    async def scenario() -> None:
        async with Engine(stream=True) as engine:
            client = Upstream()
            try:
                stream = await client.stream(engine.url, {"prompt": "p", "stream": True}, orphan=True)
                engine.answer.set()
                events = stream.events()
                assert (await asyncio.wait_for(anext(events), 20)).startswith("data: ")
                await stream.aclose()
                await asyncio.wait_for(engine.closed.wait(), 20)  # an abort now is safe: the engine streams
                assert engine.closed_in == "body" and not client.orphans.tasks and client.orphans.adopted == 0
            finally:
                await client.aclose()

    asyncio.run(scenario())


def test_an_orphan_is_closed_after_orphan_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wedged engine holds no connection for good: past ORPHAN_S the orphan closes (the engine aborts it)."""
    monkeypatch.setattr(upstream_module, "ORPHAN_S", 0.3)

    async def scenario() -> None:
        async with Engine(stream=False) as engine:
            client = Upstream()
            try:
                with pytest.raises(UpstreamTimeout):
                    await client.post(engine.url, {"prompt": "p"}, timeout_s=0.1, orphan=True)
                await asyncio.wait_for(engine.closed.wait(), 20)
                assert engine.closed_in == "nothing" and client.orphans.adopted == 1
                await until(lambda: not client.orphans.tasks, "the orphan gone")
            finally:
                await client.aclose()

    asyncio.run(scenario())


def test_the_canary_s_decode_call_past_its_deadline_runs_on_until_the_engine_answers() -> None:
    """The decode-side canary loads its prompt's KV from LMCache by design: a canary deadline that closed the call
    while the engine loaded would kill the engine it checks. It fails (hop decode_engine) and the call runs on."""
    import httpx

    from daemons.kv.canary import PathCanary

    def prefill_worker(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": []}, headers={"x-disagg-kv-stored-tokens": "256"})

    async def scenario() -> None:
        async with Engine(stream=False) as engine:
            client = Upstream()
            http = httpx.AsyncClient(transport=httpx.MockTransport(prefill_worker))
            canary = PathCanary(client=http, model="m", vocab=list(range(100, 200)), chunk_size=256,
                                decode_url=engine.url.removesuffix("/v1/completions"), timeout_s=0.2, engine=client)
            try:
                async def abandon() -> None:
                    result = await canary.run("http://prefill-worker")
                    assert (result.ok, result.hop) == (False, "decode_engine"), result
                await abandoned_then_answered(engine, client, abandon)
            finally:
                await client.aclose()
                await http.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("stream", [False, True])
def test_an_abandoned_call_closes_as_soon_as_its_engine_defers_nothing(stream: bool) -> None:
    """An engine with no request waiting for an LMCache lookup or load can abort any: an abandoned call there is
    closed at once (a client that leaves stops its work), not run to its end."""
    async def scenario() -> None:
        async with Engine(stream=stream, deferred=0) as engine:
            client = Upstream()
            try:
                if stream:
                    upstream = await client.stream(engine.url, {"prompt": "p", "stream": True}, orphan=True)
                    await upstream.aclose()
                else:
                    call = asyncio.ensure_future(client.post(engine.url, {"prompt": "p"}, orphan=True))
                    await asyncio.wait_for(engine.got_request.wait(), 20)
                    call.cancel()
                    await asyncio.gather(call, return_exceptions=True)
                await asyncio.wait_for(engine.closed.wait(), 20)  # never answered: closed for the engine's calm
                assert engine.closed_in == ("headers" if stream else "nothing") and client.orphans.adopted == 1
                await until(lambda: not client.orphans.tasks, "the orphan gone")
            finally:
                await client.aclose()

    asyncio.run(scenario())


def test_a_stream_closed_twice_before_its_first_bytes_is_still_one_orphan() -> None:
    """prefill-worker's /whole relay closes its engine stream in its finally and its response closes it again: the
    second close must not abort what the first left running."""
    async def scenario() -> None:
        async with Engine(stream=True) as engine:
            client = Upstream()
            try:
                async def abandon() -> None:
                    stream = await client.stream(engine.url, {"prompt": "p", "stream": True}, orphan=True)
                    await stream.aclose()
                    await stream.aclose()
                await abandoned_then_answered(engine, client, abandon)
            finally:
                await client.aclose()

    asyncio.run(scenario())


def test_an_engine_is_no_longer_polled_once_its_last_orphan_ended() -> None:
    async def scenario() -> None:
        async with Engine(stream=False) as engine:
            client = Upstream()
            try:
                async def abandon() -> None:
                    with pytest.raises(UpstreamTimeout):
                        await client.post(engine.url, {"prompt": "p"}, timeout_s=0.2, orphan=True)
                await abandoned_then_answered(engine, client, abandon)
                await until(lambda: not client.orphans._calm, "the engine's poll stopped")
            finally:
                await client.aclose()

    asyncio.run(scenario())
