"""lmcache-server: runs LMCache's own multi-process server, bounded in memory.

It is ready when LMCache's /healthcheck answers and its port accepts
connections. /metrics re-exposes LMCache's ``lmcache_*`` metrics next to ours.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from .child import ChildExited, ChildProcess
from .config import Config
from .lifecycle import Daemon, DaemonFailed, run_daemon
from .metrics import scrape
from .statefile import State, endpoint_accepts


def lmcache_argv(config: Config) -> list[str]:
    lm = config.lmcache
    return [
        sys.executable, "-m", "lmcache.cli.main", "server",
        "--host", lm.host,
        "--port", str(lm.port),
        "--http-port", str(lm.http_port),
        "--chunk-size", str(lm.chunk_size),
        "--l1-size-gb", str(lm.l1_size_gb),
        "--eviction-policy", lm.eviction_policy,
    ] + (["--supported-transfer-mode", lm.transfer_mode] if lm.transfer_mode else [])


class LMCacheServer(Daemon):
    """Run LMCache's KV cache server for the prefill and decode engines."""

    kind = "lmcache-server"

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)  # type: ignore[arg-type]
        from .engine import engine_env

        env = engine_env(config.decode_worker)
        # The server maps the engines' GPU memory over CUDA IPC by device UUID: it
        # must see every GPU, not just one worker's.
        env.pop("CUDA_VISIBLE_DEVICES", None)
        self.child = ChildProcess(
            "lmcache", lmcache_argv(config), log_path=Path(config.log_dir) / "lmcache-server.log", env=env
        )
        self.http_url = f"http://{config.lmcache.host}:{config.lmcache.http_port}"

    @property
    def endpoint(self) -> str:
        return f"{self.config.lmcache.host}:{self.config.lmcache.port}"

    @property
    def metrics_address(self) -> tuple[str, int]:
        return self.config.lmcache_server.metrics_host, self.config.lmcache_server.metrics_port

    async def _healthy(self) -> bool:
        try:
            resp = await self.http.get(f"{self.http_url}/healthcheck", timeout=2.0)
        except httpx.HTTPError:
            return False
        # Older LMCache servers have no /healthcheck: their HTTP server answering will do.
        return resp.status_code in (200, 404) and endpoint_accepts(self.endpoint)

    async def start_up(self) -> None:
        self.set_state(State.LOADING, f"starting LMCache server ({self.config.lmcache.l1_size_gb} GB L1, LRU)")
        self.child.start()
        self.details["child_pid"] = self.child.pid
        try:
            ok = await self.child.wait_healthy(
                self._healthy, self.config.lmcache.startup_timeout_s, should_stop=lambda: self.stopping,
                on_tick=lambda _: self.notifier.extend_timeout(10),
            )
        except ChildExited as exc:
            raise DaemonFailed(str(exc)) from None
        if ok:
            self.set_state(State.READY)

    async def check(self) -> bool:
        if self.child.pid is None:
            return True  # not started yet
        if not self.child.alive():
            raise DaemonFailed(self.child.exit_reason())
        if self.state.serving:
            healthy = await self._healthy()
            if not healthy and self.state is State.READY:
                self.set_state(State.DEGRADED, "LMCache /healthcheck does not answer")
            elif healthy and self.state is State.DEGRADED:
                self.set_state(State.READY)
            return healthy
        return True

    async def shut_down(self) -> None:
        await self.child.stop(self.config.readiness.drain_timeout_s)

    async def scrape_extra(self) -> str:
        if not self.child.alive():
            return ""
        return await scrape(self.http, f"{self.http_url}/metrics", ("lmcache_",))


def main(argv: list[str] | None = None) -> int:
    return run_daemon(LMCacheServer, argv)


if __name__ == "__main__":
    sys.exit(main())
