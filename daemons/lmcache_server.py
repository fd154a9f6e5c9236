"""lmcache-server: runs LMCache's own multi-process server, bounded in memory.

It is ready when LMCache's /healthcheck answers and its port accepts
connections. /metrics re-exposes LMCache's ``lmcache_*`` metrics next to ours.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx

from daemons.children.child import ChildProcess
from daemons.children.child_daemon import ChildDaemon
from daemons.children.engine import engine_env
from daemons.config import Config
from daemons.runtime.cli import run_daemon
from daemons.runtime.statefile import endpoint_accepts
from daemons.runtime.states import State


def lmcache_argv(config: Config, instance_id: str = "") -> list[str]:
    """LMCache's server command line; on several hosts, with its P2P layer (``instance_id``: its name there)."""
    lm = config.lmcache
    address = config.lmcache_address  # loopback; in a cluster, this host's private address (peers look up here)
    argv = [
        sys.executable, "-m", "lmcache.cli.main", "server",
        "--host", address,
        "--port", str(lm.port),
        # LMCache's HTTP API (cache clearing, reconfiguration; no auth) defaults to 0.0.0.0.
        "--http-host", lm.host,
        "--http-port", str(lm.http_port),
        "--chunk-size", str(lm.chunk_size),
        "--l1-size-gb", str(lm.l1_size_gb),
        "--eviction-policy", lm.eviction_policy,
    ] + (["--supported-transfer-mode", lm.transfer_mode] if lm.transfer_mode else [])
    cluster = config.cluster
    if cluster is not None:
        argv += [
            "--instance-id", instance_id or str(config.host_id),
            "--coordinator-url", cluster.coordinator_url,
            "--coordinator-advertise-ip", address,
            "--coordinator-heartbeat-interval", str(cluster.heartbeat_interval_s),
            "--p2p-advertise-url", f"{address}:{cluster.p2p_port}",
            "--p2p-transfer-engine", cluster.p2p_transfer_engine,
            "--p2p-lookup-timeout", str(cluster.p2p_lookup_timeout_s),
            "--p2p-load-timeout", str(cluster.p2p_load_timeout_s),
        ]
    return argv


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
        # On several hosts, each start is a new P2P instance ("<host>.<start time>"): a peer that knew the
        # last process (and its transfer engine's port) connects afresh instead of keeping a stale link.
        self.instance_id = f"{config.host_id}.{int(time.time() * 1000):x}" if config.cluster is not None else ""
        self.child = ChildProcess(
            "lmcache", lmcache_argv(config, self.instance_id), log_path=Path(config.log_dir) / "lmcache-server.log",
            env=env, port=config.lmcache.port, logs=config.logs,
        )
        self.child_startup_timeout_s = config.lmcache.startup_timeout_s
        self.http_url = f"http://{config.lmcache.host}:{config.lmcache.http_port}"
        self.child_metrics_url = f"{self.http_url}/metrics"

    @property
    def endpoint(self) -> str:
        return f"{self.config.lmcache_address}:{self.config.lmcache.port}"

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
        elif healthy and self.config.cluster is not None:
            self.set_state(State.READY, await self.p2p_status())
        elif healthy and self.state is State.DEGRADED:
            self.set_state(State.READY)
        return healthy

    async def p2p_status(self) -> str:
        """On several hosts: LMCache's own view of its P2P layer (registered? which peers?), for the reason."""
        try:
            status = (await self.http.get(f"{self.http_url}/status", timeout=2.0)).json()
            p2p = {"state": str(status.get("p2p_state", "?")), "peers": list(status.get("p2p_peers", []))}
        except (httpx.HTTPError, ValueError, AttributeError):
            return "P2P status unknown (LMCache /status does not answer)"
        self.details["p2p"] = p2p
        peers = ", ".join(p2p["peers"]) or "none"
        return f"P2P {p2p['state']} with the coordinator; peers: {peers}"


def main(argv: list[str] | None = None) -> int:
    return run_daemon(LMCacheServer, argv)


if __name__ == "__main__":
    sys.exit(main())
