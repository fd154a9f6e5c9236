"""lmcache-coordinator: LMCache's own coordinator, for a deployment on several hosts.

Each host's lmcache-server registers with it, heartbeats it and reads from it
the list of its peers (``GET /instances``); the servers then look KV up in
each other and move it over LMCache's P2P transfer channel. The coordinator
keeps membership only, never KV: losing it stops new peers from being found
(known ones keep working until they are forgotten), not requests. One host
runs it (``cluster.hosts.<host>.daemons``); it is ready when ``/healthz``
answers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from daemons.children.child import ChildProcess
from daemons.children.child_daemon import ChildDaemon
from daemons.children.engine import engine_env
from daemons.config import Config, ConfigError
from daemons.deployment import Deployment
from daemons.runtime.cli import run_daemon
from daemons.runtime.states import State


def coordinator_argv(deployment: Deployment) -> list[str]:
    """LMCache's coordinator command line, listening on this host's private address."""
    config, host = deployment.config, deployment.host
    cluster = config.cluster
    assert cluster is not None and host is not None
    return [
        sys.executable, "-m", "lmcache.cli.main", "coordinator",
        "--host", host.address,
        "--port", str(cluster.coordinator_port),
        # A server silent this long is dropped: its peers stop asking it (and re-handshake when it is back).
        "--instance-timeout", str(cluster.instance_timeout_s),
        "--health-check-interval", str(max(1.0, cluster.instance_timeout_s / 4)),
        "--eviction-check-interval", "0",  # no L2 quota to police
        "--chunk-size", str(config.lmcache.chunk_size),
    ]


class LMCacheCoordinator(ChildDaemon):
    """Run LMCache's coordinator: membership of the hosts' lmcache-servers (no KV)."""

    kind = "lmcache-coordinator"

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)  # type: ignore[arg-type]
        here = self.deployment.host_id
        if config.cluster is None or here is None or here != config.cluster.coordinator_host:
            raise ConfigError(f"{config.source}: cluster.hosts: lmcache-coordinator does not run on this host "
                              f"({here or 'no cluster section'})")
        env = engine_env(config.decode_worker)
        self.child = ChildProcess("coordinator", coordinator_argv(self.deployment),
                                  log_path=Path(config.log_dir) / "lmcache-coordinator.log", env=env,
                                  logs=config.logs)
        self.child_startup_timeout_s = config.lmcache.startup_timeout_s
        self.url = config.cluster.coordinator_url

    @property
    def endpoint(self) -> str:
        return self.url.removeprefix("http://")

    @property
    def metrics_address(self) -> tuple[str, int]:
        return self.config.lmcache_coordinator.metrics_host, self.config.lmcache_coordinator.metrics_port

    async def child_healthy(self) -> bool:
        try:
            return (await self.http.get(f"{self.url}/healthz", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def start_up(self) -> None:
        if await self.start_child("starting LMCache's coordinator"):
            self.set_state(State.READY)

    async def check(self) -> bool:
        if not self.child_started() or not self.state.serving:
            return True
        try:
            resp = await self.http.get(f"{self.url}/instances", timeout=2.0)
            members = sorted(i.get("instance_id", "?") for i in resp.json().get("instances", []))
        except (httpx.HTTPError, ValueError, AttributeError):
            if self.state is State.READY:
                self.set_state(State.DEGRADED, "the coordinator does not answer")
            return False
        self.details["members"] = members
        self.set_state(State.READY, f"{len(members)} lmcache-server(s) registered: {', '.join(members) or 'none'}")
        return True


def main(argv: list[str] | None = None) -> int:
    return run_daemon(LMCacheCoordinator, argv)


if __name__ == "__main__":
    sys.exit(main())
