"""What prefill-worker and decode-worker share: a vLLM engine child they own,
start, watch and stop, and whose ``vllm:*`` metrics they re-expose as ``vllm_*``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from daemons.children.child_daemon import ChildDaemon
from daemons.children.engine import KVRole, engine_child, engine_url
from daemons.children.stall import EngineLoad, StallDetector, engine_load
from daemons.config import Config
from daemons.config_sections import WorkerConfig
from daemons.runtime.httpserver import EmbeddedServer
from daemons.runtime.lifecycle import DaemonFailed
from daemons.runtime.listen import inherited_socket
from daemons.runtime.statefile import PeerView, pid_alive
from daemons.runtime.states import State

LMCACHE = "lmcache-server"

log = logging.getLogger(__name__)

# An engine that has not answered /metrics for this long takes its worker out of ``ready``.
ENGINE_SILENT_S = 30.0


def engine_stall_detector(config: Config) -> StallDetector:
    """The rule for a wedged engine (``kv_path.engine_stall_timeout_s``), blind to gaps of several heartbeats in
    which the daemon itself asked nothing (stopped, or its loop stalled): those are not the engine's silence."""
    return StallDetector(config.kv_path.engine_stall_timeout_s,
                         blind_s=max(10.0, 3 * config.readiness.heartbeat_interval_s + 5.0))


class EngineDaemon(ChildDaemon):
    role: KVRole
    child_pid_key = "engine_pid"
    child_metrics_prefixes = ("vllm:",)
    child_metrics_renames = {"vllm:": "vllm_"}

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)  # type: ignore[arg-type]
        self.worker: WorkerConfig = config.worker(self.kind, self.id.instance)
        self.engine_url = engine_url(self.worker)
        self.child = engine_child(self.deployment, self.worker, self.role, name=self.name)
        self.child_startup_timeout_s = self.worker.engine_startup_timeout_s
        self.child_metrics_url = f"{self.engine_url}/metrics"
        self.stall = engine_stall_detector(config)
        self.last_load: EngineLoad | None = None  # what the engine's /metrics said at the last heartbeat
        self.engine_problem = ""  # why the engine is not fit to serve now ("" when it is)
        # The planned stops of the last process of this daemon, kept: a planned restart stops the engine and exits,
        # and the next process rewrites the state file at once (a second on a fast host), before lmcache-server may
        # have read the mark; without it, lmcache-server takes the stop for a loss and restarts LMCache.
        earlier = self.previous_record.details.get("engines_stopped") if self.previous_record else None
        if isinstance(earlier, list):
            self.details["engines_stopped"] = [p for p in earlier if isinstance(p, int)][-4:]

    @property
    def api_host(self) -> str:
        """Where the worker's API listens (a prefill-worker in a cluster: its host's private address)."""
        return self.worker.host

    @property
    def endpoint(self) -> str:
        return f"{self.api_host}:{self.worker.port}"

    @property
    def metrics_address(self) -> tuple[str, int]:
        return self.worker.metrics_host, self.worker.metrics_port

    async def child_healthy(self, timeout: float = 2.0) -> bool:
        try:
            return (await self.http.get(f"{self.engine_url}/health", timeout=timeout)).status_code == 200
        except httpx.HTTPError:
            return False

    async def start_serving(self, app: object, api_name: str) -> bool:
        """Wait for lmcache-server, load the engine, open ``app`` on the worker's port.

        False when asked to stop before that was done."""
        if await self.wait_for(LMCACHE) is None:
            return False
        if not await self.wait_kv_store(self.started_at, lambda why: self.set_state(State.WAITING, why)):
            return False
        if not await self.start_child(f"loading {self.config.model.name} on {self.worker.device}"):
            return False
        self.details["engine_serving"] = True
        sock = await asyncio.to_thread(inherited_socket, self.name, self.api_host, self.worker.port)
        await self.serve_http(EmbeddedServer(app, self.api_host, self.worker.port, name=api_name,
                                             drain_s=self.config.readiness.drain_timeout_s, sock=sock))
        return True

    # -- the KV store an engine connects to ----------------------------------------------------------------
    def kv_store_settled(self, view: PeerView, since: float) -> str:
        """Why an engine may not start yet ("" when it may): lmcache-server ready and, where it restarts LMCache
        after an engine's loss (``lmcache.restart_on_engine_loss``), it looked at the engines after ``since``
        (wall clock: this daemon's start or its engine's loss), so a restart it owes them comes first."""
        if not view.ready:
            return f"lmcache-server {view.state}: {view.reason}"
        if self.deployment.lmcache_restarts_on_engine_loss:
            checked = view.record.details.get("engines_checked_at") if view.record is not None else None
            if not isinstance(checked, (int, float)) or checked <= since:
                return "lmcache-server has not looked at the engines since this worker's engine was lost"
        return ""

    async def wait_kv_store(self, since: float, announce: Callable[[str], object]) -> bool:
        """Wait until an engine may start (:meth:`kv_store_settled`), saying why not through ``announce``; False if
        asked to stop first. lmcache-server ready but silent about the engines for 3 heartbeat timeouts (an
        older version, a clock step): start anyway, logged. TimeoutError past ``readiness.dependency_timeout_s``."""
        t0 = time.monotonic()
        while not self.stopping:
            view = await self.peers.view(LMCACHE)
            why = self.kv_store_settled(view, since)
            waited = time.monotonic() - t0
            if not why:
                return True
            if view.ready and waited > 3 * self.config.readiness.heartbeat_timeout_s:
                log.warning("starting the engine although %s (%.0fs)", why, waited)
                return True
            if waited > self.config.readiness.dependency_timeout_s:
                raise TimeoutError(f"{self.child.name} not started: {why} after {waited:.0f}s")
            announce(f"waiting to start the engine: {why}")
            self.notifier.extend_timeout(10)
            await self.sleep_unless_stopped(0.5)
        return False

    async def stop_engine(self, grace_s: float) -> None:
        """Stop the engine on purpose, saying so in the state file first (``engines_stopped``): lmcache-server does
        not take a planned stop for a loss (:mod:`daemons.lmcache_server`). A dead engine is not marked."""
        pid = self.child.main_pid
        if pid is not None and pid_alive(pid) and self.child.alive():
            stopped = self.details.get("engines_stopped")
            earlier = [p for p in stopped if isinstance(p, int)][-4:] if isinstance(stopped, list) else []
            self.details["engines_stopped"] = [*earlier, pid]
            self.status.publish()
        await self.child.stop(grace_s)

    async def shut_down(self) -> None:
        await self.stop_engine(self.config.readiness.drain_timeout_s)

    async def engine_load(self) -> EngineLoad | None:
        """Requests in the engine and tokens it computed; None when it does not answer."""
        try:
            resp = await self.http.get(self.child_metrics_url, timeout=5.0)
            resp.raise_for_status()
        except httpx.HTTPError:
            return None
        return engine_load(resp.text)

    async def engine_ok(self) -> bool:
        """Heartbeat check of the engine: fail when it died or is wedged, False while it does not answer.

        An engine silent for ``ENGINE_SILENT_S`` makes ``engine_problem`` say so (the
        worker leaves ``ready``); silent or stuck for ``kv_path.engine_stall_timeout_s``,
        the daemon exits non-zero: systemd (Restart=on-failure) or supervisord
        (autorestart=unexpected) starts it again with a fresh engine."""
        if not self.child_started() or not self.state.serving:
            return True
        now = time.monotonic()
        load = await self.engine_load()
        wedged = self.stall.observe(now, load)
        if wedged:
            raise DaemonFailed(f"{self.child.name} is wedged: {wedged}; exiting to be restarted")
        if load is None:
            silent = self.stall.silent_for(now)
            log.warning("engine does not answer /metrics (%.0fs)", silent)
            if silent >= ENGINE_SILENT_S:
                self.engine_problem = f"engine has not answered for {silent:.0f}s"
            self.details["engine_serving"] = not self.engine_problem
            return False
        self.engine_problem = ""
        self.last_load = load
        # The engine's own view of its room, for the box's routing (daemons.routing.prefill_router._sibling_loads).
        self.details["engine_queued"] = int(load.queued)
        self.details["kv_cache_usage"] = None if load.kv_usage is None else round(load.kv_usage, 3)
        healthy = await self.child_healthy(timeout=5.0)
        # Can this engine serve a whole request? Apart from the KV path: a prefill engine takes failover while
        # LMCache is down or stuck (the front door's router reads it: PeerView.serves_whole).
        self.details["engine_serving"] = healthy
        return healthy
