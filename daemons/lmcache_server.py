"""lmcache-server: runs LMCache's own multi-process server, bounded in memory.

It is ready when LMCache's /healthcheck answers and its port accepts
connections. /metrics re-exposes LMCache's ``lmcache_*`` metrics next to ours.

On several hosts each start of LMCache is a new P2P instance (``<host>.<start time>``). LMCache keeps
one transfer-channel client per peer *address* (``mooncake_te_impl``: ``get_transfer_channel_client``
returns the cached one): when a peer host's LMCache restarts at the same address, the adapter for the new
instance gets the old, dead client, and removing the old instance's adapter then closes it. Loads from
that host fail until this LMCache process restarts (seen: a prefill host's daemons killed and restarted,
the decode host's loads failing for good; restarting the decode engine did not help). So when a peer host
comes back as a new instance, this daemon restarts its own LMCache server in place (the engines reconnect
by themselves; a few requests fall back meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import httpx

from daemons.children.child import ChildProcess
from daemons.children.child_daemon import ChildDaemon
from daemons.children.engine import engine_env
from daemons.config import Config
from daemons.runtime.cli import run_daemon
from daemons.runtime.lifecycle import DaemonFailed
from daemons.runtime.statefile import endpoint_accepts
from daemons.runtime.states import State

log = logging.getLogger(__name__)


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
        self.instance_id = new_instance_id(config)
        self.peer_instances: dict[str, str] = {}  # peer host -> the newest LMCache instance seen there
        self._restart: asyncio.Task[None] | None = None
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
        if self._restart is not None:
            if not self._restart.done():
                return True  # restarting in place: the restart says how it went
            failure, self._restart = self._restart.exception(), None
            if isinstance(failure, DaemonFailed):
                raise failure
            if failure is not None:
                raise DaemonFailed(f"restarting LMCache failed: {type(failure).__name__}: {failure}")
        if not self.child_started() or not self.state.serving:
            return True
        healthy = await self.child_healthy()
        if not healthy and self.state is State.READY:
            self.set_state(State.DEGRADED, "LMCache /healthcheck does not answer")
        elif healthy and self.config.cluster is not None:
            reason = await self.p2p_status()
            p2p = self.details.get("p2p")
            replaced = self.replaced_peers(list(p2p.get("peers", [])) if isinstance(p2p, dict) else [])
            if replaced:
                self.restart_lmcache(f"peer {replaced} came back as a new LMCache instance, and LMCache keeps "
                                     "its dead transfer channel to that address")
            else:
                self.set_state(State.READY, reason)
        elif healthy and self.state is State.DEGRADED:
            self.set_state(State.READY)
        return healthy

    def replaced_peers(self, peers: list[str]) -> str:
        """The peer hosts this host reads KV from whose LMCache came back as a newer instance since the last
        look ("" for none). Only a host that reads (runs a decode-worker) restarts, and only for a host that
        serves KV and reads none (runs prefill-workers, no decode-worker): the restart it causes there is no
        news to that host, so two hosts never restart one another in turn."""
        listed: dict[str, list[str]] = {}
        for peer in peers:
            listed.setdefault(str(peer).partition(".")[0], []).append(str(peer))
        replaced = []
        for host, instances in listed.items():
            if len(instances) > 1:
                # The old instance is still listed: LMCache would give the new one's adapter the channel that
                # dropping the old one closes. Wait until the coordinator has forgotten the old one.
                continue
            peer, known = instances[0], self.peer_instances.get(host)
            if known is None or newer(peer.partition(".")[2], known.partition(".")[2]):
                if known is not None and self.reads_from(host):
                    replaced.append(f"{host} ({known} -> {peer})")
                self.peer_instances[host] = peer
        return ", ".join(replaced)

    def reads_from(self, host: str) -> bool:
        """Does this host load KV from ``host`` (this host decodes, that one only prefills)?"""
        cluster = self.config.cluster
        if cluster is None or host not in cluster.hosts or self.config.host_id not in cluster.hosts:
            return False

        def runs(name: str, kind: str) -> bool:
            return any(d.split("@", 1)[0] == kind for d in cluster.hosts[name].daemons)

        return (runs(str(self.config.host_id), "decode-worker") and runs(host, "prefill-worker")
                and not runs(host, "decode-worker"))

    def restart_lmcache(self, why: str) -> None:
        """Restart this host's LMCache server in the background (once at a time), as a new P2P instance."""
        if self._restart is not None or self.stopping:
            return
        log.warning("restarting this host's LMCache server: %s", why)
        self._restart = asyncio.create_task(self._restart_lmcache(why), name="lmcache-restart")

    async def _restart_lmcache(self, why: str) -> None:
        self.set_state(State.DEGRADED, f"restarting LMCache: {why}")
        await self.child.stop(self.config.readiness.drain_timeout_s)
        self.instance_id = new_instance_id(self.config)
        self.child.argv = lmcache_argv(self.config, self.instance_id)
        if await self.start_child(f"restarting LMCache server as {self.instance_id} ({why})"):
            self.set_state(State.READY, await self.p2p_status())

    async def shut_down(self) -> None:
        if self._restart is not None:
            self._restart.cancel()
            await asyncio.gather(self._restart, return_exceptions=True)
        await super().shut_down()

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


def new_instance_id(config: Config) -> str:
    """This start's name among LMCache's P2P peers: ``<host>.<start time in ms, hex>`` ("" on one host)."""
    return f"{config.host_id}.{int(time.time() * 1000):x}" if config.cluster is not None else ""


def newer(started: str, than: str) -> bool:
    """Is the instance started at ``started`` (hex ms) newer than the one at ``than``?"""
    try:
        return int(started, 16) > int(than, 16)
    except ValueError:
        return started != than


def main(argv: list[str] | None = None) -> int:
    return run_daemon(LMCacheServer, argv)


if __name__ == "__main__":
    sys.exit(main())
