"""lmcache-server: runs LMCache's own multi-process server, bounded in memory.

It is ready when LMCache's /healthcheck answers and its port accepts
connections. /metrics re-exposes LMCache's ``lmcache_*`` metrics next to ours.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx

from .child import ChildProcess
from .child_daemon import ChildDaemon
from .cli import run_daemon
from .config import Config
from .engine import engine_env
from .statefile import endpoint_accepts
from .states import State


def lmcache_argv(config: Config) -> list[str]:
    lm = config.lmcache
    return [
        sys.executable, "-m", "lmcache.cli.main", "server",
        "--host", lm.host,
        "--port", str(lm.port),
        # LMCache's HTTP API (cache clearing, reconfiguration; no auth) defaults to 0.0.0.0.
        "--http-host", lm.host,
        "--http-port", str(lm.http_port),
        "--chunk-size", str(lm.chunk_size),
        "--l1-size-gb", str(lm.l1_size_gb),
        "--eviction-policy", lm.eviction_policy,
    ] + (["--supported-transfer-mode", lm.transfer_mode] if lm.transfer_mode else [])


class LMCacheServer(ChildDaemon):
    """Run LMCache's KV cache server for the prefill and decode engines."""

    kind = "lmcache-server"
    child_metrics_prefixes = ("lmcache_",)

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)  # type: ignore[arg-type]
        env = engine_env(config.decode_worker)
        # The server maps the engines' GPU memory over CUDA IPC by device UUID: it
        # must see every GPU, not just one worker's.
        env.pop("CUDA_VISIBLE_DEVICES", None)
        self.child = ChildProcess(
            "lmcache", lmcache_argv(config), log_path=Path(config.log_dir) / "lmcache-server.log", env=env
        )
        self.child_startup_timeout_s = config.lmcache.startup_timeout_s
        self.http_url = f"http://{config.lmcache.host}:{config.lmcache.http_port}"
        self.child_metrics_url = f"{self.http_url}/metrics"

    @property
    def endpoint(self) -> str:
        return f"{self.config.lmcache.host}:{self.config.lmcache.port}"

    @property
    def metrics_address(self) -> tuple[str, int]:
        return self.config.lmcache_server.metrics_host, self.config.lmcache_server.metrics_port

    async def child_healthy(self) -> bool:
        try:
            resp = await self.http.get(f"{self.http_url}/healthcheck", timeout=2.0)
        except httpx.HTTPError:
            return False
        # Older LMCache servers have no /healthcheck: their HTTP server answering will do.
        return resp.status_code in (200, 404) and await asyncio.to_thread(endpoint_accepts, self.endpoint)

    async def start_up(self) -> None:
        if await self.start_child(f"starting LMCache server ({self.config.lmcache.l1_size_gb} GB L1, LRU)"):
            self.set_state(State.READY)

    async def check(self) -> bool:
        if not self.child_started() or not self.state.serving:
            return True
        healthy = await self.child_healthy()
        if not healthy and self.state is State.READY:
            self.set_state(State.DEGRADED, "LMCache /healthcheck does not answer")
        elif healthy and self.state is State.DEGRADED:
            self.set_state(State.READY)
        return healthy


def main(argv: list[str] | None = None) -> int:
    return run_daemon(LMCacheServer, argv)


if __name__ == "__main__":
    sys.exit(main())
