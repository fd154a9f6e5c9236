"""uvicorn servers that run inside a daemon's event loop.

Several servers share one loop (the API and the metrics endpoint), and the
daemon owns SIGTERM: uvicorn's own signal capture is switched off, and the
daemon asks a server to stop with :meth:`EmbeddedServer.stop`, which stops
accepting, lets in-flight requests finish for up to ``drain_s``, then cancels them.

The edge's limits (:class:`EdgeLimits`): the keep-alive idle timeout (longer than a load
balancer's, or a request races the close), a deadline for a request's headers once its
first byte arrived (a slowloris connection is closed), and a cap on open connections
(uvicorn answers 503 past it). A server can also be handed its listening socket (systemd's
socket activation, or the socket holder under supervisord) instead of binding one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger(__name__)


class _NoSignalServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass(frozen=True)
class EdgeLimits:
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    header_timeout_s: float | None = None  # a request's headers must be complete this long after its first byte
    max_connections: int | None = None  # open connections (and requests) at once; past it, 503


def header_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's HTTP protocol, closing a connection whose request headers are not complete ``timeout_s`` after
    the request's first byte (uvicorn itself times only idle keep-alive connections)."""

    class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _waiting_on: object = None

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._waiting_on = self.cycle
                self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._waiting_on:  # headers complete
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is self._waiting_on and self.transport is not None and not self.transport.is_closing():
                log.info("closing a connection whose request headers took over %.0fs", timeout_s)
                self.transport.close()

    return HeaderDeadline


class EmbeddedServer:
    def __init__(self, app: Any, host: str, port: int, *, name: str, drain_s: float = 30.0,
                 limits: EdgeLimits | None = None, sock: socket.socket | None = None) -> None:
        self.name = name
        self.address = f"{host}:{port}"
        self.sock = sock  # a listening socket handed to us (socket activation): not bound here, never closed here
        limits = limits or EdgeLimits()
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(max(1, drain_s)),
            timeout_keep_alive=max(1, round(limits.keep_alive_s)),
            limit_concurrency=limits.max_connections,
            http=header_deadline_protocol(limits.header_timeout_s) if limits.header_timeout_s else "auto",
        )
        self._server = _NoSignalServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind (or take the socket handed over) and serve in the background; raises OSError if the port cannot
        be bound."""
        sockets = [self.sock] if self.sock is not None else None
        self._task = asyncio.create_task(self._server.serve(sockets=sockets), name=f"http-{self.name}")
        while not self._server.started:
            if self._task.done():
                exc = self._task.exception()
                if exc is None or isinstance(exc, SystemExit):
                    raise OSError(f"{self.name}: could not listen on {self.address} (port in use?)")
                raise exc
            await asyncio.sleep(0.02)
        log.info("%s listening on http://%s", self.name, self.address)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("%s stopped with %r", self.name, exc)
        self._task = None

    @property
    def in_flight(self) -> int:
        return len(self._server.server_state.tasks)
