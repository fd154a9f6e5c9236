"""The run loop every daemon shares: start up, heartbeat, signals, drain, exit.

A daemon subclasses :class:`Daemon` and implements :meth:`Daemon.start_up`
(wait for dependencies, start its child, open its API) and may override
:meth:`Daemon.check` (called every heartbeat) and :meth:`Daemon.shut_down`.
States and their legal transitions are in :mod:`daemons.runtime.states`; telling the
world (state file, systemd, metrics) is :mod:`daemons.runtime.status`; judging peers is
:mod:`daemons.runtime.peers`; the command line is :mod:`daemons.runtime.cli`.

How :meth:`Daemon.run` ends:

- SIGHUP: re-read the config file, apply what can change live, log (and put in the
  state file's ``restart_needed_for``) what needs a restart; the daemon goes on.
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

from daemons import __version__
from daemons.config import Config, ConfigError, config_changes, load_config, with_applied
from daemons.deployment import Deployment
from daemons.names import DaemonId
from daemons.runtime.digest import digest_of, digest_parts
from daemons.runtime.exposition import DaemonMetrics, metrics_app
from daemons.runtime.httpserver import EmbeddedServer
from daemons.runtime.peers import Peers
from daemons.runtime.remote_state import state_route
from daemons.runtime.sdnotify import SystemdNotifier, watchdog_interval_s
from daemons.runtime.statefile import PeerView, StateRecord, read_state
from daemons.runtime.states import Lifecycle, State, strict_from_env
from daemons.runtime.status import StatusReporter

log = logging.getLogger(__name__)

class DaemonFailed(RuntimeError):
    """The daemon cannot go on; the message becomes the state file's reason."""


# Failures that explain themselves: logged as one line, no traceback.
EXPLAINED_FAILURES = (DaemonFailed, TimeoutError, OSError)


class Daemon:
    kind: str = "daemon"  # lmcache-server, prefill-worker, decode-worker

    def __init__(
        self, config: Config, *, instance: str | None = None, host_id: str | None = None,
        registry: CollectorRegistry | None = None, strict: bool | None = None,
    ) -> None:
        self.id = DaemonId(self.kind, instance)
        self.name = str(self.id)
        self.config = config
        # Where this daemon and its peers run (``host_id``: which host of the config's cluster this is; else
        # $DISAGG_HOST_ID, else the host whose address this machine has). Follows the config on a reload.
        self.deployment = Deployment.on_host(config, host_id)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.digest_parts = digest_parts(config)
        self.digest = digest_of(self.digest_parts)
        self.metrics = DaemonMetrics(self.name, self.registry, version=__version__, digest=self.digest,
                                     engines=self.digest_parts.get("versions", ""))
        self.notifier = SystemdNotifier()
        self.started_at = time.time()
        self.details: dict[str, object] = {}
        self.status = StatusReporter(config.runtime_dir, self.state_record, notifier=self.notifier,
                                     metrics=self.metrics, started_at=self.started_at)
        self.lifecycle = Lifecycle(self.name, strict=strict_from_env() if strict is None else strict,
                                   on_change=self.status.changed)
        self.peers = Peers(config.runtime_dir, config.readiness.heartbeat_timeout_s, expect_digest=self.digest,
                           expect_parts=self.digest_parts)
        self._stop = asyncio.Event()
        self._servers: list[EmbeddedServer] = []
        self._reload_tasks: set[asyncio.Task[list[str]]] = set()
        self._metrics_server: EmbeddedServer | None = None
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0), trust_env=False)
        previous = self.previous_record = read_state(config.runtime_dir, self.name)  # this daemon's last process's
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
        """Called every heartbeat: re-evaluate state; False means the child is unhealthy now (the watchdog still
        gets its ping: it guards the daemon's own loop, and a child's silence follows the stall rule).

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

    async def sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if asked to stop meanwhile; True when stopping."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass
        return self.stopping

    def set_state(self, state: State, reason: str = "") -> bool:
        """Move to ``state`` (see :mod:`daemons.runtime.states` for what is legal); False when refused."""
        return self.lifecycle.to(state, reason)

    def state_record(self) -> StateRecord:
        """What the state file says now."""
        host, port = self.metrics_address
        return StateRecord(
            daemon=self.name, pid=os.getpid(), state=self.state, endpoint=self.endpoint, metrics=f"{host}:{port}",
            config_digest=self.digest, version=__version__, started_at=self.started_at, reason=self.reason,
            details=dict(self.details), config_parts=dict(self.digest_parts),
        )

    def state_route(self) -> Route:
        """``GET /disagg/state``: this daemon's record for peers on other hosts (:mod:`daemons.runtime.remote_state`)."""
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

    def _intervals(self) -> tuple[float, float | None]:
        """(the heartbeat's interval, systemd's watchdog interval or None)."""
        interval = self.config.readiness.heartbeat_interval_s
        wd = watchdog_interval_s() if self.config.readiness.watchdog else None
        return (interval if wd is None else min(interval, wd)), wd

    async def _heartbeat(self) -> None:
        interval, wd = self._intervals()
        if wd is not None:
            log.info("systemd watchdog on: pinging every %.1fs", interval)
        while not self.stopping:
            try:
                await self.check()
            except DaemonFailed:
                raise
            except Exception:  # noqa: BLE001 - a failing check must not kill the heartbeat
                log.exception("health check raised")
            self.status.publish()
            # The watchdog guards the daemon itself (its loop runs its checks); a silent or wedged child follows
            # the documented rule (kv_path.engine_stall_timeout_s, then a clean exit or a restart in place),
            # under systemd as under supervisord, never a SIGABRT before it.
            if wd is not None:
                self.notifier.watchdog()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
            except TimeoutError:
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
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self.status.changed(self.state, self.reason, True)
        for warning in self.config.warnings():  # legal but probably not meant (check-config prints them too)
            log.warning("config: %s", warning)
        failure: str | None = None
        heartbeat: asyncio.Task[None] | None = None
        try:
            await self._start_metrics()
            heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
            await self._serve_until_stopped(heartbeat)
        except (KeyboardInterrupt, asyncio.CancelledError):
            log.warning("%s interrupted: stopping", self.name)
        except EXPLAINED_FAILURES as exc:
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
            # A drain takes up to 2 x drain_timeout_s: systemd hears STOPPING=1 and the watchdog keeps being fed, and
            # the state file stays fresh (a draining prefill-worker is not taken for a hung one).
            self.notifier.stopping()
            keepalive = asyncio.create_task(self._drain_heartbeat(), name="drain-heartbeat")
            try:
                await self._drain()
            finally:
                keepalive.cancel()
                await asyncio.gather(keepalive, return_exceptions=True)
            if failure is None:
                self.set_state(State.STOPPED, "stopped on request")
            if self._metrics_server is not None:
                await self._metrics_server.stop()
            await self.http.aclose()
            self.status.close()
        return 0 if failure is None else 1

    async def _drain_heartbeat(self) -> None:
        """While draining: the state file's heartbeat and systemd's watchdog, as the heartbeat did (no checks)."""
        interval, wd = self._intervals()
        while True:
            self.status.publish()
            if wd is not None:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _on_hup(self) -> None:
        """SIGHUP (``systemctl reload``, ``ExecReload=``, logrotate): re-read the config, apply what can change
        live, say what needs a restart. It never stops the daemon."""
        if self.stopping:
            return
        task = asyncio.get_running_loop().create_task(self.reload_config(), name="reload")
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_done)

    def _reload_done(self, task: asyncio.Task[list[str]]) -> None:
        """A reload that failed says so, with its reason and where; the running config stays, the daemon goes on."""
        self._reload_tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("reload failed: %s: %s; the running config stays for what was not applied", type(exc).__name__,
                      exc, exc_info=exc)
            self.details["reload_failed"] = f"{type(exc).__name__}: {exc}"[:300]
            self.status.publish()

    async def reload_config(self) -> list[str]:
        """Re-read the config file; apply what :meth:`apply_config` can change live; the keys that need a restart."""
        source = self.config.source
        if source is None:
            log.error("reload: this config was not read from a file: nothing to re-read")
            return []
        try:
            new = await asyncio.to_thread(load_config, source)
            Deployment.on_host(new, self.deployment.host_id)  # this host is still one of the config's
        except ConfigError as exc:
            log.error("reload: %s: the running config stays", exc)
            return []
        changed = config_changes(self.config, new)
        if not changed:
            log.info("reload: %s re-read, nothing changed", source)
            return []
        applied = self.apply_config(new, changed)
        self.config = with_applied(self.config, new, applied)
        self.deployment = Deployment(self.config, self.deployment.host_id)
        pending = [key for key in changed if key not in applied]
        log.info("reload: %s: applied %s", source, ", ".join(f"{k} ({changed[k]})" for k in applied) or "nothing")
        if pending:
            log.warning("reload: these changes need a restart of %s to take effect: %s", self.name,
                        ", ".join(f"{k} ({changed[k]})" for k in pending))
        self.details["restart_needed_for"] = pending
        self.status.publish()
        return pending

    def apply_config(self, new: Config, changed: dict[str, str]) -> set[str]:
        """Apply what can change live from ``new`` (the changed keys: dotted name -> "old -> new"); the keys
        applied. A daemon that can change nothing live applies nothing."""
        return set()

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
            grace = self.config.readiness.drain_grace_s if self.state.serving else 0.0
            self.set_state(State.DRAINING, "finishing in-flight requests" if not grace else
                           f"/health answers 503 for {grace:.0f}s while requests are served, then in-flight "
                           "requests finish")
            if grace:  # a load balancer sees /health answer 503 first and moves away while this daemon still serves
                await asyncio.sleep(grace)
        for server in self._servers:
            await server.stop()
        self._servers.clear()
        try:
            await self.shut_down()
        except Exception:  # noqa: BLE001
            log.exception("error while shutting down")

