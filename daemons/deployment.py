"""The deployment a config describes, resolved as one host runs it: which daemons run here, where each listens, which
sockets are held for them, how many engine ranks connect to this host's LMCache.

:class:`daemons.config.Config` is what the file says (its keys, checked); a :class:`Deployment` is what follows
from it on one machine. The daemons read their places from it, and the process managers' files are rendered from it:
systemd's units and socket units (``ops/install.py``), supervisord's programs (``ops/ctl.py``) and the sockets the
holder keeps across restarts (``ops/socket_holder.py``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cached_property

from daemons.config import Config, ConfigError
from daemons.config_sections import HostConfig, WorkerConfig
from daemons.names import COORDINATOR, SHARED_FRONT_DOOR, WORKER_KINDS, DaemonId

HOST_ID_ENV = "DISAGG_HOST_ID"


def local_addresses(candidates: list[str]) -> list[str]:
    """Those of ``candidates`` that are addresses of this machine (a socket can bind them)."""
    found = []
    for address in candidates:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((address, 0))
            except OSError:
                continue
        found.append(address)
    return found


def cluster_daemon_names(config: Config) -> list[str]:
    """Every daemon the config describes, on every host, dependencies first."""
    names = ["lmcache-server", *config.workers("prefill-worker"), *config.workers("decode-worker")]
    return [COORDINATOR, *names] if config.cluster is not None else names


@dataclass(frozen=True)
class Deployment:
    """A config as one host runs it (``host_id``: which of ``cluster.hosts``; None on one box). ``every_host``: a
    cluster's config with no host chosen, every host's daemons counted as here (``disaggctl install`` renders units
    for all of them where it cannot tell which host it runs on; nothing runs so)."""

    config: Config
    host_id: str | None = None
    every_host: bool = False

    @classmethod
    def on_host(cls, config: Config, host_id: str | None = None) -> Deployment:
        """``config`` as one host of its cluster runs it: ``host_id``, else $DISAGG_HOST_ID, else the host whose
        address this machine has. The one box without a cluster. ConfigError when it cannot tell which host."""
        if config.cluster is None:
            return cls(config)
        hosts = config.cluster.hosts
        host_id = host_id or os.environ.get(HOST_ID_ENV) or None
        if host_id is None:
            mine = local_addresses([h.address for h in hosts.values()])
            matches = [h for h, c in hosts.items() if c.address in mine]
            if len(matches) != 1:
                raise ConfigError(
                    f"{config.source}: cluster.hosts: cannot tell which host this is ({len(matches)} of the hosts' "
                    f"addresses are this machine's): pass --host-id NAME or set ${HOST_ID_ENV}")
            host_id = matches[0]
        if host_id not in hosts:
            raise ConfigError(f"{config.source}: cluster.hosts: no host {host_id!r} (defined: {', '.join(hosts)})")
        return cls(config, host_id)

    def __post_init__(self) -> None:
        cluster = self.config.cluster
        if self.host_id is not None and (cluster is None or self.host_id not in cluster.hosts):
            raise ValueError(f"no host {self.host_id!r} in this config (Deployment.on_host finds this machine's)")
        if cluster is not None and self.host_id is None and not self.every_host:
            raise ValueError("a cluster's config runs as one of its hosts: Deployment.on_host(config, host_id)")

    # -- which host, which daemons ---------------------------------------------------------
    @property
    def host(self) -> HostConfig | None:
        """This host's entry in the cluster (None: one box)."""
        cluster = self.config.cluster
        return None if cluster is None or self.host_id is None else cluster.hosts[self.host_id]

    def daemon_names(self) -> list[str]:
        """The daemons this machine runs, dependencies first (in a cluster: this host's)."""
        host = self.host
        names = cluster_daemon_names(self.config)
        return names if host is None else [n for n in names if n in host.daemons]

    def is_local(self, daemon: str) -> bool:
        """Does ``daemon`` run on this machine (its state file is here)?"""
        host = self.host
        return host is None or daemon in host.daemons

    @cached_property
    def local_workers(self) -> dict[str, WorkerConfig]:
        """Daemon name -> resolved settings of every worker this machine runs, prefill-workers first (resolved once:
        lmcache-server asks at every heartbeat)."""
        return {name: w for kind in WORKER_KINDS for name, w in self.config.workers(kind).items()
                if self.is_local(name)}

    # -- where each listens -----------------------------------------------------------------
    @property
    def lmcache_address(self) -> str:
        """Where this host's LMCache server takes requests (engines, lookups and, in a cluster, its peers)."""
        host = self.host
        return host.address if host is not None else self.config.lmcache.host

    def address_of(self, daemon: str) -> str:
        """The address a worker's API is reached at: its host's on the private network, else the config's."""
        cluster = self.config.cluster
        if cluster is not None:
            host_id = cluster.host_of(daemon)
            if host_id is not None and daemon != "lmcache-server":
                return cluster.hosts[host_id].address
        return self.config.workers(DaemonId.parse(daemon).kind)[daemon].host

    def listen_address(self, daemon: str) -> str:
        """Where a worker's API listens: a prefill-worker on its host's private address in a cluster (for the
        decode hosts), a decode-worker's front door where its ``host`` says."""
        kind = DaemonId.parse(daemon).kind
        return self.address_of(daemon) if kind == "prefill-worker" else self.config.workers(kind)[daemon].host

    def shared_front_door(self) -> tuple[str, int] | None:
        """(host, port) of the box's one endpoint (``decode_worker.shared_port``), None when there is none."""
        for w in self.config.decode_workers().values():
            if w.shared_port is not None:
                return w.host, w.shared_port
        return None

    def held_sockets(self) -> dict[str, tuple[str, int]]:
        """The listening sockets held for this host's daemons across their restarts (by the socket holder under
        supervisord, by socket units under systemd): each worker's API, by daemon name, and the box's one endpoint
        (:data:`SHARED_FRONT_DOOR`, one socket every decode-worker of the host accepts on) where the config has one."""
        sockets = {name: (self.listen_address(name), worker.port) for name, worker in self.local_workers.items()}
        shared = self.shared_front_door()
        if shared is not None and any(DaemonId.parse(name).kind == "decode-worker" for name in sockets):
            sockets[SHARED_FRONT_DOOR] = shared
        return sockets

    # -- this host's LMCache ----------------------------------------------------------------
    def local_engine_ranks(self) -> int:
        """The engine ranks that connect to this host's LMCache server (every local worker's engine)."""
        return sum(w.tensor_parallel_size for w in self.local_workers.values())

    def lmcache_workers(self) -> tuple[int, int]:
        """LMCache's (--max-gpu-workers, --max-cpu-workers): the config's, else derived from the engine ranks."""
        ranks = max(1, self.local_engine_ranks())
        lm = self.config.lmcache
        return (lm.max_gpu_workers or 2 * ranks, lm.max_cpu_workers or ranks + 2)

    @property
    def lmcache_restarts_on_engine_loss(self) -> bool:
        """Does lmcache-server restart LMCache when a local engine dies without a planned stop?"""
        policy = self.config.lmcache.restart_on_engine_loss
        if policy != "auto":
            return policy == "always"
        return any(w.device.startswith("cuda") for w in self.local_workers.values())
