"""What prefill-worker and decode-worker share: a vLLM engine child they own,
start, watch and stop, and whose ``vllm:*`` metrics they re-expose as ``vllm_*``."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from daemons.children.child_daemon import ChildDaemon
from daemons.children.engine import KVRole, engine_child, engine_url
from daemons.children.stall import EngineLoad, StallDetector, engine_load
from daemons.config import Config, WorkerConfig
from daemons.runtime.httpserver import EmbeddedServer
from daemons.runtime.lifecycle import DaemonFailed
from daemons.runtime.listen import inherited_socket

log = logging.getLogger(__name__)

# An engine that has not answered /metrics for this long takes its worker out of ``ready``.
ENGINE_SILENT_S = 30.0


class EngineDaemon(ChildDaemon):
    role: KVRole
    child_pid_key = "engine_pid"
    child_metrics_prefixes = ("vllm:",)
    child_metrics_renames = {"vllm:": "vllm_"}

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)  # type: ignore[arg-type]
        self.worker: WorkerConfig = config.worker(self.kind, self.id.instance)
        self.engine_url = engine_url(self.worker)
        self.child = engine_child(config, self.worker, self.role, name=self.name)
        self.child_startup_timeout_s = self.worker.engine_startup_timeout_s
        self.child_metrics_url = f"{self.engine_url}/metrics"
        self.stall = StallDetector(config.kv_path.engine_stall_timeout_s)
        self.engine_problem = ""  # why the engine is not fit to serve now ("" when it is)

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
        if await self.wait_for("lmcache-server") is None:
            return False
        if not await self.start_child(f"loading {self.config.model.name} on {self.worker.device}"):
            return False
        sock = await asyncio.to_thread(inherited_socket, self.name, self.api_host, self.worker.port)
        await self.serve_http(EmbeddedServer(app, self.api_host, self.worker.port, name=api_name,
                                             drain_s=self.config.readiness.drain_timeout_s, sock=sock))
        return True

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
            return False
        self.engine_problem = ""
        return await self.child_healthy(timeout=5.0)
