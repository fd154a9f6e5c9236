"""uvicorn servers that run inside a daemon's event loop.

Several servers share one loop (the API and the metrics endpoint), and the
daemon owns SIGTERM: uvicorn's own signal capture is switched off, and the
daemon asks a server to stop with :meth:`EmbeddedServer.stop`, which stops
accepting, lets in-flight requests finish for up to ``drain_s``, then cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class _NoSignalServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class EmbeddedServer:
    def __init__(self, app: Any, host: str, port: int, *, name: str, drain_s: float = 30.0) -> None:
        self.name = name
        self.address = f"{host}:{port}"
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(max(1, drain_s)),
            timeout_keep_alive=5,
        )
        self._server = _NoSignalServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and serve in the background; raises OSError if the port cannot be bound."""
        self._task = asyncio.create_task(self._server.serve(), name=f"http-{self.name}")
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
