"""What prefill-worker and decode-worker share: a vLLM engine child they own,
start, watch and stop, and whose ``vllm:*`` metrics they re-expose as ``vllm_*``."""

from __future__ import annotations

import logging
import time

import httpx
from starlette.responses import JSONResponse

from .child import ChildExited
from .config import Config, WorkerConfig
from .engine import Engine, KVRole
from .httpserver import EmbeddedServer
from .lifecycle import Daemon, DaemonFailed
from .metrics import scrape
from .stall import EngineLoad, StallDetector, engine_load
from .statefile import State

log = logging.getLogger(__name__)


def openai_error(
    status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


class EngineDaemon(Daemon):
    role: KVRole

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)  # type: ignore[arg-type]
        self.worker: WorkerConfig = config.worker(self.kind, self.instance)
        self.engine = Engine(config, self.worker, self.role, name=self.name, log_dir=config.log_dir)
        self.stall = StallDetector(config.kv_path.engine_stall_timeout_s)

    @property
    def endpoint(self) -> str:
        return f"{self.worker.host}:{self.worker.port}"

    @property
    def metrics_address(self) -> tuple[str, int]:
        return self.worker.metrics_host, self.worker.metrics_port

    async def start_engine(self) -> bool:
        """Start the engine and wait for /health; False if asked to stop meanwhile."""
        self.set_state(State.LOADING, f"loading {self.config.model.name} on {self.worker.device}")
        self.engine.child.start()
        self.details["engine_pid"] = self.engine.child.pid
        try:
            return await self.engine.child.wait_healthy(
                lambda: self.engine.healthy(self.http),
                self.engine.startup_timeout_s,
                should_stop=lambda: self.stopping,
                on_tick=lambda _: self.notifier.extend_timeout(10),
            )
        except ChildExited as exc:
            raise DaemonFailed(str(exc)) from None

    async def start_serving(self, app: object, api_name: str) -> bool:
        """Wait for lmcache-server, load the engine, open ``app`` on the worker's port.

        False when asked to stop before that was done."""
        if await self.wait_for("lmcache-server") is None:
            return False
        if not await self.start_engine():
            return False
        await self.serve_http(EmbeddedServer(app, self.worker.host, self.worker.port, name=api_name,
                                             drain_s=self.config.readiness.drain_timeout_s))
        return True

    async def engine_load(self) -> EngineLoad | None:
        """Requests in the engine and tokens it computed; None when it does not answer."""
        try:
            resp = await self.http.get(f"{self.engine.base_url}/metrics", timeout=5.0)
            resp.raise_for_status()
        except httpx.HTTPError:
            return None
        return engine_load(resp.text)

    async def engine_ok(self) -> bool:
        """Heartbeat check of the engine: fail when it died or is wedged, False while it does not answer.

        Failing makes the daemon exit non-zero: systemd (Restart=on-failure) or
        supervisord (autorestart=unexpected) starts it again with a fresh engine,
        and the supervisor's process-group kill reaps whatever the engine left."""
        if self.engine.child.pid is None:
            return True  # not started yet
        if not self.engine.child.alive():
            raise DaemonFailed(self.engine.child.exit_reason())
        if not self.state.serving:
            return True
        load = await self.engine_load()
        wedged = self.stall.observe(time.monotonic(), load)
        if wedged:
            raise DaemonFailed(f"{self.engine.child.name} is wedged: {wedged}; exiting to be restarted")
        if load is None:
            log.warning("engine does not answer /metrics")
            return False
        return await self.engine.healthy(self.http, timeout=5.0)

    async def shut_down(self) -> None:
        await self.engine.child.stop(self.config.readiness.drain_timeout_s)

    async def scrape_extra(self) -> str:
        if not self.engine.child.alive():
            return ""
        return await scrape(self.http, f"{self.engine.base_url}/metrics", ("vllm:",), {"vllm:": "vllm_"})
