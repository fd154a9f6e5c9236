"""The edge's limits on a real embedded uvicorn server: a connection whose request headers trickle in is
closed at the header deadline while other requests are served; a stream whose client stops reading is
dropped at the write deadline (its engine side closed); a body that does not arrive is 408."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from daemons.edge.sse_relay import ClosingStreamingResponse
from daemons.runtime.httpserver import EdgeLimits, EmbeddedServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except (TimeoutError, ConnectionError):
        return False


def test_slow_headers_are_closed_at_the_deadline_while_requests_are_served() -> None:
    async def scenario() -> None:
        async def ok(_: Request) -> Response:
            return PlainTextResponse("ok")

        port = free_port()
        server = EmbeddedServer(Starlette(routes=[Route("/health", ok)]), "127.0.0.1", port, name="t",
                                limits=EdgeLimits(header_timeout_s=1.0))
        await server.start()
        try:
            slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
            for _, writer in slow:
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            async with httpx.AsyncClient() as client:  # served meanwhile
                assert (await client.get(f"http://127.0.0.1:{port}/health")).text == "ok"
            for _, writer in slow:
                writer.write(b"X")  # a byte now and then keeps nothing open past the deadline
            # Closed by the server (header deadline 1 s), not held: a generous bound, not a measurement.
            results = await asyncio.gather(*(closed_within(r, 20.0) for r, _ in slow))
            assert all(results)
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_stream_whose_client_stops_reading_is_dropped_at_the_write_deadline() -> None:
    closed = asyncio.Event

    async def scenario() -> None:
        done = closed()

        async def endless() -> AsyncIterator[bytes]:
            chunk = b"data: " + b"x" * 65536 + b"\n\n"
            while True:
                yield chunk
                await asyncio.sleep(0)

        async def stream(_: Request) -> Response:
            async def close() -> None:
                done.set()
            return ClosingStreamingResponse(endless(), close, {}, write_timeout_s=1.0)

        port = free_port()
        server = EmbeddedServer(Starlette(routes=[Route("/s", stream)]), "127.0.0.1", port, name="t")
        await server.start()
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
            await asyncio.wait_for(done.wait(), 15)  # the engine side was closed: its request aborted
            sock.close()
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_body_that_does_not_arrive_is_408_and_frees_its_slot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from .test_edge import front_door

    async def scenario() -> None:
        door = front_door(tmp_path, body_timeout_s=0.5)
        port = free_port()
        server = EmbeddedServer(door.app(), "127.0.0.1", port, name="t")
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            head = await asyncio.wait_for(reader.readline(), 10)
            assert b"408" in head
            assert door.admission.active == 0
            writer.close()
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_keep_alive_is_the_configured_idle_timeout() -> None:
    """A connection reused within the idle timeout is served (a load balancer with a shorter idle timeout never
    races the close); one left idle past it is closed by the server."""

    async def scenario() -> None:
        async def ok(_: Request) -> Response:
            return PlainTextResponse("ok")

        port = free_port()
        server = EmbeddedServer(Starlette(routes=[Route("/health", ok)]), "127.0.0.1", port, name="t",
                                limits=EdgeLimits(keep_alive_s=2.0))
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            for _ in range(2):  # the second on the same connection, 1.5 s later: still open
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
                assert b"200 OK" in head
                await asyncio.sleep(1.5)
            assert await closed_within(reader, 5.0)  # idle past 2 s: closed by the server
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))
