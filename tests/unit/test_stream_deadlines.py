"""Streams after their first token (issue 30.9): an engine that stops sending breaks its stream at
``stream_idle_timeout_s`` (a real socket: the front door's own upstream client), a continuation that does not
answer in time ends the stream with an error event, and a stream the engine side broke counts as a 5xx, never as a
client's 499."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry

from daemons.edge.door_settings import FrontDoorSettings
from daemons.edge.frontdoor import FrontDoor
from daemons.edge.migration import Progress
from daemons.edge.sse_relay import BROKEN_STREAM_EVENT, StreamRelay
from daemons.edge.upstream import Upstream, UpstreamError
from daemons.metrics import FrontDoorMetrics
from daemons.routing.prefill_router import PrefillRouter
from daemons.runtime.peers import Peers

TOKEN = b'data: {"choices":[{"index":0,"text":" hi","token_ids":[7]}]}\n\n'


def test_an_engine_that_stops_sending_breaks_its_stream_at_the_idle_deadline(tmp_path: Path) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def stalled_engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + TOKEN + TOKEN)
            await writer.drain()
            await release.wait()  # then nothing: a SIGSTOPped engine keeps its connections open
            writer.close()

        server = await asyncio.start_server(stalled_engine, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        metrics = FrontDoorMetrics(CollectorRegistry())
        router = PrefillRouter([], Peers(tmp_path, 5, expect_digest=None), metrics)  # no other engine to go on on
        settings = FrontDoorSettings(engine_url=f"http://127.0.0.1:{port}", disaggregate_min_tokens=0,
                                     stream_idle_timeout_s=0.5, kv_crosscheck=False)
        door = FrontDoor(settings, client=Upstream(), metrics=metrics, router=router,
                         health=lambda: ("ready", True, ""))
        body = {"model": "m", "prompt": "hello", "max_tokens": 50, "stream": True}
        async with server, httpx.AsyncClient(transport=httpx.ASGITransport(door.app()), base_url="http://d") as c:
            resp = await asyncio.wait_for(c.post("/v1/completions", json=body), 20)
            release.set()
        await door.client.aclose()
        assert resp.status_code == 200
        assert resp.text.count(" hi") == 2 and BROKEN_STREAM_EVENT in resp.text
        assert metrics.errors.labels(kind="stream_broken")._value.get() == 1
        assert metrics.requests.labels(route="/v1/completions", status="502")._value.get() == 1
        assert metrics.requests.labels(route="/v1/completions", status="499")._value.get() == 0
        assert door.admission.active == 0
    asyncio.run(scenario())


class Closed:
    async def aclose(self) -> None:
        return None


def test_a_continuation_that_does_not_answer_in_time_ends_the_stream_with_an_error_event() -> None:
    async def broken_after_one() -> AsyncIterator[str]:
        yield TOKEN.decode().strip()
        raise UpstreamError("the engine died")

    async def too_slow(progress: Progress, why: str) -> None:
        raise TimeoutError  # asyncio.wait_for on the continuation's call

    async def scenario() -> tuple[list[bytes], StreamRelay]:
        ended: list[bool] = []
        relay = StreamRelay(Closed(), None, broken_after_one(), metrics=FrontDoorMetrics(CollectorRegistry()),  # type: ignore[arg-type]
                            client_wants_usage=False, t0=0.0, request_id="r", on_end=lambda c, _: ended.append(c),
                            progress=Progress(client_wants_ids=False), resume=too_slow, max_migrations=2)
        out = [chunk async for chunk in relay.body()]
        assert ended == [False]
        return out, relay

    out, relay = asyncio.run(scenario())
    assert out[-1] == f"data: {BROKEN_STREAM_EVENT}\n\n".encode() and relay.broken
    assert relay.metrics.migrations.labels(outcome="failed")._value.get() == 1
    assert json.loads(BROKEN_STREAM_EVENT)["error"]
