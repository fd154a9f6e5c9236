"""The daemons' command line: ``disagg-lmcache-server``, ``disagg-prefill-worker``,
``disagg-decode-worker``, ``disagg-lmcache-coordinator`` [``--config``] [``--instance``] [``--host-id``].

Loads the config (exit 78, EX_CONFIG, when it is bad: a supervisor must not
restart-loop on it), sets up logging and runs the daemon to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from daemons import __version__
from daemons.config import EX_CONFIG, ConfigError, config_path, load_config
from daemons.deployment import Deployment
from daemons.names import WORKER_KINDS, DaemonId
from daemons.runtime.instance_lock import EX_ALREADY_RUNNING, AlreadyRunning, hold_instance_lock
from daemons.runtime.lifecycle import Daemon
from daemons.runtime.statefile import check_runtime_dir

log = logging.getLogger(__name__)


def setup_logging(name: str) -> None:
    level = os.environ.get("DISAGG_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per HTTP call (heartbeats, health probes) would drown the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def run_daemon(cls: type[Daemon], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"disagg-{cls.kind}", description=cls.__doc__)
    parser.add_argument("--config", help="config file (default: $DISAGG_CONFIG or etc/disagg.yaml)")
    if cls.kind in WORKER_KINDS:
        parser.add_argument("--instance", help="which of the config's instances of this worker to run")
    parser.add_argument("--host-id", help="which host of the config's cluster.hosts this is (default: "
                        "$DISAGG_HOST_ID, else the host whose address this machine has)")
    args = parser.parse_args(argv)
    daemon_id = DaemonId(cls.kind, getattr(args, "instance", None))
    setup_logging(str(daemon_id))
    path = config_path(args.config)
    try:
        deployment = Deployment.on_host(load_config(path), args.host_id)
        config, host = deployment.config, deployment.host
        if host is not None and str(daemon_id) not in host.daemons:
            raise ConfigError(f"{path}: cluster.hosts.{deployment.host_id}.daemons: {daemon_id} does not run on this "
                              f"host (it runs {', '.join(host.daemons)})")
        if cls.kind in WORKER_KINDS:
            config.worker(cls.kind, daemon_id.instance)
        try:
            check_runtime_dir(config.runtime_dir)
        except OSError as exc:
            raise ConfigError(f"runtime_dir: {exc}") from None
        # Before anything reads a state file, binds a port or looks for an earlier start's processes.
        lock = hold_instance_lock(config.runtime_dir, str(daemon_id))
        try:
            daemon = cls(config, instance=daemon_id.instance, host_id=deployment.host_id)
        except BaseException:
            os.close(lock)
            raise
    except ConfigError as exc:
        for line in str(exc).splitlines():
            log.error("bad config: %s", line)
        log.error("exiting with status %d (EX_CONFIG): fix the config, then start again", EX_CONFIG)
        return EX_CONFIG
    except AlreadyRunning as exc:
        log.error("%s; exiting with status %d, nothing touched", exc, EX_ALREADY_RUNNING)
        return EX_ALREADY_RUNNING
    log.info("%s %s starting (config %s)", daemon_id, __version__, path)
    try:
        return asyncio.run(daemon.run())
    finally:
        os.close(lock)
