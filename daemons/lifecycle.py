"""The run loop every daemon shares: start up, heartbeat, signals, drain, exit.

A daemon subclasses :class:`Daemon` and implements :meth:`Daemon.start_up`
(wait for dependencies, start its child, open its API) and may override
:meth:`Daemon.check` (called every heartbeat) and :meth:`Daemon.shut_down`.
States and their legal transitions are in :mod:`daemons.states`; telling the
world (state file, systemd, metrics) is :mod:`daemons.status`; judging peers is
:mod:`daemons.peers`; the command line is :mod:`daemons.cli`.

How :meth:`Daemon.run` ends:

- SIGTERM/SIGINT: stop starting up, or drain (``draining``: the API stops
  accepting and finishes in-flight requests), stop the child, ``stopped``,
  exit 0.
- Any exception (``DaemonFailed``, a timeout, a port in use, a bug), in start-up
  or in a heartbeat check: ``failed`` with the reason, which nothing
  overwrites; the API and the child are still stopped; exit 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import httpx
from prometheus_client import CollectorRegistry
from starlette.routing import Route

from . import __version__
from .config import Config, DaemonId
from .digest import config_digest
from .httpserver import EmbeddedServer
from .metrics import DaemonMetrics, metrics_app
from .peers import Peers
from .remote_state import state_route
from .sdnotify import SystemdNotifier, watchdog_interval_s
from .statefile import PeerView, StateRecord, read_state
from .states import Lifecycle, State, strict_from_env
from .status import StatusReporter

log = logging.getLogger(__name__)

# Failures that explain themselves: logged as one line, no traceback.
EXPLAINED_FAILURES: tuple[type[BaseException], ...] = (TimeoutError, OSError)


class DaemonFailed(RuntimeError):
    """The daemon cannot go on; the message becomes the state file's reason."""


class Daemon:
    kind: str = "daemon"  # lmcache-server, prefill-worker, decode-worker

    def __init__(
        self, config: Config, *, instance: str | None = None, registry: CollectorRegistry | None = None,
        strict: bool | None = None,
    ) -> None:
        self.id = DaemonId(self.kind, instance)
        self.name = str(self.id)
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.digest = config_digest(config)
        self.metrics = DaemonMetrics(self.name, self.registry, version=__version__, digest=self.digest)
        self.notifier = SystemdNotifier()
        self.started_at = time.time()
        self.details: dict[str, object] = {}
        self.status = StatusReporter(config.runtime_dir, self.state_record, notifier=self.notifier,
                                     metrics=self.metrics, started_at=self.started_at)
        self.lifecycle = Lifecycle(self.name, strict=strict_from_env() if strict is None else strict,
                                   on_change=self.status.changed)
        self.peers = Peers(config.runtime_dir, config.readiness.heartbeat_timeout_s, expect_digest=self.digest)
        self._stop = asyncio.Event()
        self._servers: list[EmbeddedServer] = []
        self._metrics_server: EmbeddedServer | None = None
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0), trust_env=False)
        previous = read_state(config.runtime_dir, self.name)
        self.starts = int(previous.details.get("starts", 0)) + 1 if previous else 1
        self.details["starts"] = self.starts
        self.metrics.starts.set(self.starts)

    # -- what each daemon provides -------------------------------------------------
    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    @property
    def metrics_address(self) -> tuple[str, int]:
        raise NotImplementedError

    async def start_up(self) -> None:
        """Wait for dependencies, start the child, open the API, then call set_state(READY)."""
        raise NotImplementedError

    async def check(self) -> bool:
        """Called every heartbeat: re-evaluate state; False means unhealthy (no watchdog ping).

        Raise :class:`DaemonFailed` to give up (the daemon exits 1, to be restarted)."""
        return True

    async def shut_down(self) -> None:
        """Stop the child; the API servers are already drained."""

    async def scrape_extra(self) -> str:
        """Extra exposition text appended to /metrics (an engine's or LMCache's own metrics)."""
        return ""

    # -- state -----------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def reason(self) -> str:
        return self.lifecycle.reason

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def set_state(self, state: State, reason: str = "") -> bool:
        """Move to ``state`` (see :mod:`daemons.states` for what is legal); False when refused."""
        return self.lifecycle.to(state, reason)

    def state_record(self) -> StateRecord:
        """What the state file says now."""
        host, port = self.metrics_address
        return StateRecord(
            daemon=self.name, pid=os.getpid(), state=self.state, endpoint=self.endpoint, metrics=f"{host}:{port}",
            config_digest=self.digest, version=__version__, started_at=self.started_at, reason=self.reason,
            details=dict(self.details),
        )

    def state_route(self) -> Route:
        """``GET /disagg/state``: this daemon's record for peers on other hosts (:mod:`daemons.remote_state`)."""
        return state_route(lambda: self.status.last)

    async def wait_for(self, daemon: str | list[str], timeout_s: float | None = None) -> PeerView | None:
        """Wait (``waiting``) until ``daemon``, or any one of a list, is ready; None if asked to stop first."""
        names = [daemon] if isinstance(daemon, str) else list(daemon)
        timeout_s = self.config.readiness.dependency_timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()

        def waiting(reason: str) -> None:
            self.set_state(State.WAITING, reason)
            self.notifier.extend_timeout(10)

        view = await self.peers.wait_ready(names, timeout_s, self._stop, waiting)
        if view is not None:
            self.metrics.dependency_wait_seconds.labels(dependency=DaemonId.parse(names[0]).kind).set(
                time.monotonic() - t0)
        return view

    # -- running -----------------------------------------------------------------------
    async def serve_http(self, server: EmbeddedServer) -> None:
        await server.start()
        self._servers.append(server)

    async def _start_metrics(self) -> None:
        host, port = self.metrics_address
        self._metrics_server = EmbeddedServer(
            metrics_app(self.registry, self.scrape_extra, [self.state_route()]), host, port,
            name=f"{self.name} metrics", drain_s=1
        )
        await self._metrics_server.start()

    async def _heartbeat(self) -> None:
        interval = self.config.readiness.heartbeat_interval_s
        wd = watchdog_interval_s() if self.config.readiness.watchdog else None
        if wd is not None:
            interval = min(interval, wd)
            log.info("systemd watchdog on: pinging every %.1fs", interval)
        while not self.stopping:
            healthy = True
            try:
                healthy = await self.check()
            except DaemonFailed:
                raise
            except Exception:  # noqa: BLE001 - a failing check must not kill the heartbeat
                log.exception("health check raised")
                healthy = False
            self.status.publish()
            if healthy and wd is not None:
                self.notifier.watchdog()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass

    async def _serve_until_stopped(self, heartbeat: asyncio.Task[None]) -> None:
        """Start up, then serve until asked to stop; raises what start-up or a heartbeat check raised."""
        startup = asyncio.create_task(self.start_up(), name="startup")
        stop_wait = asyncio.create_task(self._stop.wait(), name="stop-wait")
        try:
            done, _ = await asyncio.wait({startup, heartbeat, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if startup in done:
                startup.result()
                done, _ = await asyncio.wait({heartbeat, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if heartbeat in done:
                heartbeat.result()
        finally:
            for task in (startup, stop_wait):
                task.cancel()
            await asyncio.gather(startup, stop_wait, return_exceptions=True)

    async def run(self) -> int:
        """Run to the end; 0 after a requested stop, 1 after a failure (the state file says which)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.status.changed(self.state, self.reason, True)
        failure: str | None = None
        heartbeat: asyncio.Task[None] | None = None
        try:
            await self._start_metrics()
            heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
            await self._serve_until_stopped(heartbeat)
        except (KeyboardInterrupt, asyncio.CancelledError):
            log.warning("%s interrupted: stopping", self.name)
        except (DaemonFailed, *EXPLAINED_FAILURES) as exc:
            failure = str(exc) or type(exc).__name__
            log.error("%s failed: %s", self.name, failure)
        except BaseException as exc:  # noqa: BLE001 - whatever it was, the daemon failed and must say so
            failure = f"{type(exc).__name__}: {exc}"
            log.exception("%s failed: unexpected error", self.name)
        finally:
            self._stop.set()
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            if failure is not None:
                self.lifecycle.fail(failure)
            await self._drain()
            if failure is None:
                self.set_state(State.STOPPED, "stopped on request")
            if self._metrics_server is not None:
                await self._metrics_server.stop()
            await self.http.aclose()
            self.status.close()
        return 0 if failure is None else 1

    def _on_signal(self, sig: int) -> None:
        if self.stopping:
            log.warning("second %s: already stopping", signal.Signals(sig).name)
            return
        log.info("%s received: draining", signal.Signals(sig).name)
        self.notifier.stopping()
        self._stop.set()

    async def _drain(self) -> None:
        """Stop the API servers (in-flight requests finish) and the child; ``draining`` unless failed."""
        if (self.state.serving or self._servers) and not self.state.terminal:
            self.set_state(State.DRAINING, "finishing in-flight requests")
        for server in self._servers:
            await server.stop()
        self._servers.clear()
        try:
            await self.shut_down()
        except Exception:  # noqa: BLE001
            log.exception("error while shutting down")

