"""lmcache-server: runs LMCache's own multi-process server, bounded in memory, and keeps it answering.

It is ready when LMCache's /healthcheck answers, its port accepts connections and a lookup on its request queue
(what the engines send, asked through LMCache's own client: :mod:`daemons.kv.kv_lookup`) is answered. /metrics
re-exposes LMCache's ``lmcache_*`` metrics next to ours.

The KV store is supervised like an engine (docs/faults.md, "The KV store heals"):

- LMCache that fails either probe (the HTTP thread can starve behind a thread holding the GIL, and the reverse)
  throughout ``lmcache.unresponsive_restart_s`` is restarted in place, its threads' stacks logged first
  (:mod:`daemons.children.stacks`); the threshold doubles after each such restart within the window.
- When an engine on this host dies without a planned stop, LMCache is restarted before the engine's replacement
  connects (``lmcache.restart_on_engine_loss``, on for GPU engines): LMCache 0.5.x's server waits on the engine's
  CUDA event for a transfer in flight; the dead engine never records it, and LMCache's next device
  synchronisation (the replacement's registration, or reaping the dead one) never returns, holding the GIL.
  Workers wait for this daemon to have looked at the engines after their loss before starting a new engine.
- More than ``lmcache.restart_limit`` restarts in place within ``lmcache.restart_window_s``: the daemon exits
  non-zero, for its supervisor to restart it (and back off).

The engines' connectors reconnect to a restarted LMCache by themselves.

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
from collections import deque
from pathlib import Path

import httpx

from daemons.children.child import ChildProcess
from daemons.children.child_daemon import ChildDaemon
from daemons.children.engine import engine_env
from daemons.children.stacks import thread_stacks
from daemons.config import Config
from daemons.deployment import Deployment
from daemons.kv.kv_lookup import KVLookup
from daemons.metrics import LMCacheServerMetrics
from daemons.runtime.cli import run_daemon
from daemons.runtime.lifecycle import DaemonFailed
from daemons.runtime.statefile import StateRecord, endpoint_accepts, pid_alive, read_state
from daemons.runtime.states import State

log = logging.getLogger(__name__)

# A restart in place of an LMCache that does not answer (or lost an engine): SIGTERM, then SIGKILL after this long
# (a wedged LMCache acts on no signal; its shutdown would wait on the same stuck device).
WEDGED_STOP_GRACE_S = 5.0
# The unresponsive threshold doubles after each restart for it within the window, up to this many times.
BACKOFF_DOUBLINGS = 3


def lmcache_argv(deployment: Deployment, instance_id: str = "") -> list[str]:
    """LMCache's server command line; on several hosts, with its P2P layer (``instance_id``: its name there)."""
    config = deployment.config
    lm = config.lmcache
    address = deployment.lmcache_address  # loopback; in a cluster, this host's private address (peers look up here)
    gpu_workers, cpu_workers = deployment.lmcache_workers()
    argv = [
        # LMCache's own CLI, with faulthandler on SIGUSR1: a stuck server can say where (daemons.children.stacks).
        # -P: the package this daemon runs (its release), never one in the working directory.
        sys.executable, "-P", "-m", "daemons.children.lmcache_main", "server",
        "--host", address,
        "--port", str(lm.port),
        # LMCache's HTTP API (cache clearing, reconfiguration; no auth) defaults to 0.0.0.0.
        "--http-host", lm.host,
        "--http-port", str(lm.http_port),
        "--chunk-size", str(lm.chunk_size),
        "--l1-size-gb", str(lm.l1_size_gb),
        "--eviction-policy", lm.eviction_policy,
        # One thread per engine rank for stores and loads (LMCache's default, 1, serializes every engine's).
        "--max-gpu-workers", str(gpu_workers),
        "--max-cpu-workers", str(cpu_workers),
    ] + (["--supported-transfer-mode", lm.transfer_mode] if lm.transfer_mode else [])
    cluster = config.cluster
    if cluster is not None:
        argv += [
            "--instance-id", instance_id or str(deployment.host_id),
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
    """Run LMCache's KV cache server for the prefill and decode engines, and keep it answering."""

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
        self.instance_id = new_instance_id(self.deployment)
        self.peer_instances: dict[str, str] = {}  # peer host -> the newest LMCache instance seen there
        self._restart: asyncio.Task[None] | None = None
        log_dir = Path(config.log_dir)
        self.child = ChildProcess(
            "lmcache", lmcache_argv(self.deployment, self.instance_id), log_path=log_dir / "lmcache-server.log",
            env=env, port=config.lmcache.port, logs=config.logs,
        )
        self.child_startup_timeout_s = config.lmcache.startup_timeout_s
        self.http_url = f"http://{config.lmcache.host}:{config.lmcache.http_port}"
        self.child_metrics_url = f"{self.http_url}/metrics"
        self.lm_metrics = LMCacheServerMetrics(self.registry)
        # The probe: a lookup on LMCache's request queue through LMCache's own client, as an engine's scheduler asks.
        self.probe = KVLookup(
            server_url=f"tcp://{self.deployment.lmcache_address}:{config.lmcache.port}", model=str(config.model.path),
            mq_timeout_s=config.lmcache.mq_timeout_s, heartbeat_interval_s=config.lmcache.heartbeat_interval_s,
            log_path=log_dir / "lmcache-server-probe.log", logs=config.logs,
        )
        self.probe_tokens = [0] * config.lmcache.chunk_size
        self.unanswered_since: float | None = None  # monotonic: since when LMCache has not answered
        self._unanswered_wall = ""  # the same, as a time of day for the reason
        self.restarts: deque[tuple[float, str]] = deque()  # restarts in place: (monotonic time, reason)
        self.engines: dict[int, str] = {}  # engine pid -> its worker, from the local workers' state files
        self.planned: set[int] = set()  # engine pids their workers said they stop on purpose
        self.lm_metrics.unanswered.set_function(self._unanswered_for)

    def _unanswered_for(self) -> float:
        return 0.0 if self.unanswered_since is None else time.monotonic() - self.unanswered_since

    @property
    def endpoint(self) -> str:
        return f"{self.deployment.lmcache_address}:{self.config.lmcache.port}"

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

    async def queue_answers(self) -> str | None:
        """Does LMCache answer a lookup on its request queue? None when it does, else what went wrong; "" while the
        probe's client is not running (unknown: not held against LMCache)."""
        if not self.probe.alive:
            self.probe.ensure_started()
            return ""
        t0 = time.monotonic()
        try:
            await self.probe.hit_tokens(self.probe_tokens, self.config.lmcache.mq_timeout_s + 1.0)
        except (RuntimeError, TimeoutError) as exc:
            self.lm_metrics.probe.labels(result="failed").observe(time.monotonic() - t0)
            return str(exc) or f"no answer in {self.config.lmcache.mq_timeout_s + 1.0:.0f}s"
        if not self.probe.healthy:  # the client gave up on the server after a timeout: it asks again next time
            self.lm_metrics.probe.labels(result="failed").observe(time.monotonic() - t0)
            return "LMCache's client marked the server unhealthy"
        self.lm_metrics.probe.labels(result="ok").observe(time.monotonic() - t0)
        return None

    async def start_up(self) -> None:
        if await self.start_child(f"starting LMCache server ({self.config.lmcache.l1_size_gb} GB L1, LRU)"):
            self.details["lmcache_started_at"] = time.time()
            self.probe.ensure_started()
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
        if await self.watch_engines():
            return True  # restarting LMCache: an engine died without a planned stop
        http_ok, queue_problem = await asyncio.gather(self.child_healthy(), self.queue_answers())
        if not http_ok or queue_problem:
            self.unanswered(http_ok, queue_problem)
            return False
        if self.unanswered_since is not None:
            log.info("LMCache answers again after %.0fs", self._unanswered_for())
            self.unanswered_since = None
        if self.config.cluster is not None:
            reason = await self.p2p_status()
            p2p = self.details.get("p2p")
            replaced = self.replaced_peers(list(p2p.get("peers", [])) if isinstance(p2p, dict) else [])
            if replaced:
                self.restart_lmcache(f"peer {replaced} came back as a new LMCache instance, and LMCache keeps "
                                     "its dead transfer channel to that address", "peer_replaced",
                                     grace_s=self.config.readiness.drain_timeout_s)
            else:
                self.set_state(State.READY, reason)
        elif self.state is State.DEGRADED:
            self.set_state(State.READY)
        return True

    # -- LMCache that stopped answering -------------------------------------------------------------------
    def unresponsive_limit_s(self) -> float:
        """How long LMCache may go unanswered before it is restarted: doubled per restart for it in the window."""
        now, window = time.monotonic(), self.config.lmcache.restart_window_s
        recent = sum(1 for at, reason in self.restarts if reason == "unresponsive" and now - at <= window)
        return self.config.lmcache.unresponsive_restart_s * 2 ** min(recent, BACKOFF_DOUBLINGS)

    def unanswered(self, http_ok: bool, queue_problem: str | None) -> None:
        """LMCache did not answer: degraded at once (the front door skips prefill), restarted past the limit."""
        now = time.monotonic()
        if self.unanswered_since is None:
            self.unanswered_since = now
            self._unanswered_wall = time.strftime("%H:%M:%S")
        silent, limit = now - self.unanswered_since, self.unresponsive_limit_s()
        what = [] if http_ok else ["/healthcheck"]
        if queue_problem:
            what.append("a lookup on its request queue")
        said = " nor ".join(what)
        # A reason that stays the same while it lasts (the log says a state change once, not every heartbeat); how
        # long is in disagg_lmcache_unanswered_seconds.
        self.set_state(State.DEGRADED, f"LMCache has not answered {said} since {self._unanswered_wall} (restarted in "
                                       f"place after {limit:.0f}s)")
        if queue_problem and silent < self.config.readiness.heartbeat_interval_s + 1:
            log.warning("LMCache's request queue: %s", queue_problem)
        if silent >= limit:
            self.restart_lmcache(f"it has not answered {said} for {silent:.0f}s", "unresponsive",
                                 grace_s=WEDGED_STOP_GRACE_S, stacks=True)

    # -- engines that died without a planned stop ------------------------------------------------------------
    def _worker_records(self) -> dict[str, StateRecord]:
        records = {}
        for name in self.deployment.local_workers:
            record = read_state(self.config.runtime_dir, name)
            if record is not None:
                records[name] = record
        return records

    async def watch_engines(self) -> bool:
        """Restart LMCache when a local engine that used it died without a planned stop (``lmcache.
        restart_on_engine_loss``); True when a restart began. Publishes when it looked (``engines_checked_at``):
        a worker starts a new engine only once this daemon has looked after its old one was lost."""
        if not self.deployment.lmcache_restarts_on_engine_loss:
            return False
        checked_at = time.time()
        # Which known engines are gone, judged before the records are read: a worker marks a planned stop before it
        # stops the engine, so a pid gone by now had its mark written by now.
        gone = {pid for pid in self.engines if not pid_alive(pid)}
        records = await asyncio.to_thread(self._worker_records)
        for name, record in records.items():
            pid = record.details.get("engine_pid")
            if isinstance(pid, int) and pid_alive(pid):
                self.engines.setdefault(pid, name)
            stopped = record.details.get("engines_stopped")
            if isinstance(stopped, list):  # remembered: a worker restarted since writes a record without them
                self.planned |= {p for p in stopped if isinstance(p, int)}
        lost = {pid: self.engines.pop(pid) for pid in gone}
        unplanned = {pid: name for pid, name in lost.items() if pid not in self.planned}
        self.planned = {p for p in self.planned if p in self.engines or (p not in lost and pid_alive(p))}
        self.details["engines_checked_at"] = checked_at
        if not unplanned:
            return False
        which = ", ".join(f"{name}'s (pid {pid})" for pid, name in unplanned.items())
        self.restart_lmcache(f"the engine {which} died without a planned stop: LMCache may wait forever on its "
                             "CUDA work for a transfer in flight", "engine_lost", grace_s=WEDGED_STOP_GRACE_S)
        return True

    # -- restarts in place -----------------------------------------------------------------------------------
    def restart_lmcache(self, why: str, reason: str, *, grace_s: float, stacks: bool = False) -> None:
        """Restart this host's LMCache server in the background (once at a time; on several hosts as a new P2P
        instance). Past ``lmcache.restart_limit`` restarts within ``lmcache.restart_window_s``: DaemonFailed."""
        if self._restart is not None or self.stopping:
            return
        now = time.monotonic()
        window = self.config.lmcache.restart_window_s
        while self.restarts and now - self.restarts[0][0] > window:
            self.restarts.popleft()
        if len(self.restarts) >= self.config.lmcache.restart_limit:
            raise DaemonFailed(f"LMCache restarted {len(self.restarts)} times within {window:.0f}s "
                               f"(lmcache.restart_limit), now because {why}; exiting to be restarted")
        self.restarts.append((now, reason))
        self.lm_metrics.restarts.labels(reason=reason).inc()
        log.warning("restarting this host's LMCache server (%s): %s", reason, why)
        self.set_state(State.DEGRADED, f"restarting LMCache: {why}")
        self.status.publish()  # the workers and the front door see it now, not at the next heartbeat
        self._restart = asyncio.create_task(self._restart_lmcache(why, grace_s, stacks), name="lmcache-restart")

    async def _restart_lmcache(self, why: str, grace_s: float, stacks: bool) -> None:
        pid = self.child.main_pid
        if stacks and pid is not None:
            log.error("LMCache (pid %d) is restarted because %s; its threads' stacks:\n%s", pid, why,
                      await thread_stacks(pid, self.child.log_path))
        await self.child.stop(grace_s)
        if self.stopping:  # asked to stop meanwhile: no new LMCache (and no READY from DRAINING)
            return
        self.unanswered_since = None
        self.engines.clear()  # the engines that connect to the new server are learned anew
        self.instance_id = new_instance_id(self.deployment)
        self.child.argv = lmcache_argv(self.deployment, self.instance_id)
        what = f"restarting LMCache server as {self.instance_id} ({why})" if self.instance_id else \
            f"restarting LMCache server ({why})"
        if await self.start_child(what):
            self.details["lmcache_started_at"] = time.time()
            self.set_state(State.READY, await self.p2p_status() if self.config.cluster is not None else "")

    async def shut_down(self) -> None:
        if self._restart is not None:
            self._restart.cancel()
            await asyncio.gather(self._restart, return_exceptions=True)
        await self.probe.stop()
        await super().shut_down()

    # -- several hosts -----------------------------------------------------------------------------------------
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
        here = self.deployment.host_id
        if cluster is None or host not in cluster.hosts or here is None:
            return False

        def runs(name: str, kind: str) -> bool:
            return any(d.split("@", 1)[0] == kind for d in cluster.hosts[name].daemons)

        return (runs(here, "decode-worker") and runs(host, "prefill-worker")
                and not runs(host, "decode-worker"))

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


def new_instance_id(deployment: Deployment) -> str:
    """This start's name among LMCache's P2P peers: ``<host>.<start time in ms, hex>`` ("" on one host)."""
    return f"{deployment.host_id}.{int(time.time() * 1000):x}" if deployment.host_id is not None else ""


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
