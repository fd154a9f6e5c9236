"""What the three daemons share: states, state file, heartbeat, sd_notify, signals.

A daemon subclasses :class:`Daemon` and implements :meth:`Daemon.start_up`
(wait for dependencies, start its child, open its API) and may override
:meth:`Daemon.check` (called every heartbeat) and :meth:`Daemon.shut_down`.
:func:`run_daemon` is the console-script entry point: it loads the config
(exit 78 when it is bad), sets up logging and runs the daemon to the end:

  starting -> waiting -> loading -> ready|degraded -> draining -> stopped
                                  any failure -> failed (exit 1)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

import httpx
from prometheus_client import CollectorRegistry

from . import __version__
from .config import EX_CONFIG, WORKER_KINDS, Config, ConfigError, config_path, load_config, worker_name
from .digest import config_digest
from .httpserver import EmbeddedServer
from .metrics import DaemonMetrics, metrics_app
from .sdnotify import SystemdNotifier, watchdog_interval_s
from .statefile import PeerView, State, StateRecord, assess, read_state, write_state

log = logging.getLogger(__name__)


class DaemonFailed(RuntimeError):
    """The daemon cannot go on; the message becomes the state file's reason."""


class Daemon:
    kind: str = "daemon"  # lmcache-server, prefill-worker, decode-worker

    def __init__(
        self, config: Config, *, instance: str | None = None, registry: CollectorRegistry | None = None
    ) -> None:
        self.name = worker_name(self.kind, instance)
        self.instance = instance
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.digest = config_digest(config)
        self.metrics = DaemonMetrics(self.name, self.registry, version=__version__, digest=self.digest)
        self.notifier = SystemdNotifier()
        self.started_at = time.time()
        self.state = State.STARTING
        self.reason = ""
        self.details: dict[str, object] = {}
        self._stop = asyncio.Event()
        self._ready_notified = False
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
        """Called every heartbeat: re-evaluate state; False means unhealthy (no watchdog ping)."""
        return True

    async def shut_down(self) -> None:
        """Stop the child; the API servers are already drained."""

    async def scrape_extra(self) -> str:
        """Extra exposition text appended to /metrics (an engine's or LMCache's own metrics)."""
        return ""

    # -- state -----------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    def set_state(self, state: State, reason: str = "") -> None:
        changed = (state, reason) != (self.state, self.reason)
        self.state, self.reason = state, reason
        if changed:
            level = logging.WARNING if state in (State.DEGRADED, State.FAILED) else logging.INFO
            log.log(level, "%s state -> %s%s", self.name, state.value, f" ({reason})" if reason else "")
        self.metrics.set_state(state)
        self.write_state()
        status = f"{state.value}: {reason}" if reason else state.value
        if state.serving and not self._ready_notified:
            self._ready_notified = True
            self.metrics.readiness_seconds.set(time.time() - self.started_at)
            self.notifier.ready(status)
        elif changed:
            self.notifier.status(status)

    def write_state(self) -> None:
        host, port = self.metrics_address
        record = StateRecord(
            daemon=self.name,
            pid=os.getpid(),
            state=self.state,
            endpoint=self.endpoint,
            metrics=f"{host}:{port}",
            config_digest=self.digest,
            version=__version__,
            started_at=self.started_at,
            reason=self.reason,
            details=self.details,
        )
        try:
            write_state(self.config.runtime_dir, record)
        except OSError as exc:
            log.error("cannot write state file in %s: %s", self.config.runtime_dir, exc)

    def peer(self, daemon: str) -> PeerView:
        return assess(
            self.config.runtime_dir, daemon, self.config.readiness.heartbeat_timeout_s, expect_digest=self.digest
        )

    async def wait_for(self, daemon: str | list[str], timeout_s: float | None = None) -> PeerView | None:
        """Wait until ``daemon`` (or any one of a list) is ready; None if asked to stop first."""
        names = [daemon] if isinstance(daemon, str) else list(daemon)
        label = names[0].split("@", 1)[0]
        timeout_s = self.config.readiness.dependency_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        t0 = time.monotonic()
        last_reason = None
        while not self.stopping:
            views = [await asyncio.to_thread(self.peer, name) for name in names]
            ready = [v for v in views if v.usable and v.state == State.READY.value]
            if ready:
                self.metrics.dependency_wait_seconds.labels(dependency=label).set(time.monotonic() - t0)
                log.info("%s is ready (waited %.1fs)", ready[0].daemon, time.monotonic() - t0)
                return ready[0]
            view = views[0]
            reason = "waiting for " + "; ".join(f"{v.daemon}: {v.state}, {v.reason}" for v in views)
            if reason != last_reason:
                self.set_state(State.WAITING, reason)
                last_reason = reason
            if time.monotonic() > deadline:
                raise TimeoutError(f"{', '.join(names)} not ready after {timeout_s:.0f}s ({view.state}: {view.reason})")
            self.notifier.extend_timeout(10)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
        return None

    # -- running -----------------------------------------------------------------------
    async def serve_http(self, server: EmbeddedServer) -> None:
        await server.start()
        self._servers.append(server)

    async def _start_metrics(self) -> None:
        host, port = self.metrics_address
        self._metrics_server = EmbeddedServer(
            metrics_app(self.registry, self.scrape_extra), host, port, name=f"{self.name} metrics", drain_s=1
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
            self.write_state()
            if healthy and wd is not None:
                self.notifier.watchdog()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.set_state(State.STARTING)
        exit_code = 0
        heartbeat: asyncio.Task[None] | None = None
        try:
            await self._start_metrics()
            heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
            startup = asyncio.create_task(self.start_up(), name="startup")
            stop_wait = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({startup, heartbeat, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if startup in done:
                startup.result()
                done, _ = await asyncio.wait({heartbeat, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            else:
                startup.cancel()
                await asyncio.gather(startup, return_exceptions=True)
            if heartbeat in done:
                heartbeat.result()  # raises the failure
            stop_wait.cancel()
        except (DaemonFailed, TimeoutError, OSError, RuntimeError) as exc:
            log.error("%s failed: %s", self.name, exc)
            self.set_state(State.FAILED, str(exc))
            exit_code = 1
        finally:
            self._stop.set()
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            await self._drain()
            if exit_code == 0:
                self.set_state(State.STOPPED, "stopped on request")
            if self._metrics_server is not None:
                await self._metrics_server.stop()
            await self.http.aclose()
        return exit_code

    def _on_signal(self, sig: int) -> None:
        if self.stopping:
            log.warning("second %s: already stopping", signal.Signals(sig).name)
            return
        log.info("%s received: draining", signal.Signals(sig).name)
        self.notifier.stopping()
        self._stop.set()

    async def _drain(self) -> None:
        if self.state.serving or self._servers:
            self.set_state(State.DRAINING, "finishing in-flight requests")
        for server in self._servers:
            await server.stop()
        self._servers.clear()
        try:
            await self.shut_down()
        except Exception:  # noqa: BLE001
            log.exception("error while shutting down")


def setup_logging(name: str) -> None:
    level = os.environ.get("DISAGG_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per HTTP call (heartbeats, health probes) would drown the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def run_daemon(cls: type[Daemon], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"disagg-{cls.kind}", description=cls.__doc__)
    parser.add_argument("--config", help="config file (default: $DISAGG_CONFIG or etc/disagg.yaml)")
    if cls.kind in WORKER_KINDS:
        parser.add_argument("--instance", help="which of the config's instances of this worker to run")
    args = parser.parse_args(argv)
    instance = getattr(args, "instance", None)
    setup_logging(worker_name(cls.kind, instance))
    path = config_path(args.config)
    try:
        config = load_config(path)
        if cls.kind in WORKER_KINDS:
            config.worker(cls.kind, instance)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            log.error("bad config: %s", line)
        log.error("exiting with status %d (EX_CONFIG): fix the config, then start again", EX_CONFIG)
        return EX_CONFIG
    log.info("%s %s starting (config %s)", worker_name(cls.kind, instance), __version__, path)
    kwargs = {"instance": instance} if instance else {}
    return asyncio.run(cls(config, **kwargs).run())

