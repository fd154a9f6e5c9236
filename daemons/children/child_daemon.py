"""What lmcache-server and the two workers share: one child process the daemon
owns (LMCache's server, a vLLM engine). It starts the child, waits until the
child's probe says healthy, fails the daemon when the child exits, stops the
child's whole process tree on the way out, and appends the child's own
metrics to the daemon's /metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from daemons.children.child import ChildExited, ChildProcess, PortHeld
from daemons.runtime.digest import installed_versions
from daemons.runtime.exposition import scrape
from daemons.runtime.lifecycle import Daemon, DaemonFailed
from daemons.runtime.states import State

log = logging.getLogger(__name__)

# While a stranger holds the child's port: look again this often, and say so in the log this often.
PORT_HELD_RETRY_S = 2.0
PORT_HELD_LOG_S = 60.0


class CodeChanged(DaemonFailed):
    """vLLM or LMCache were installed over the ones this daemon started with: it exits, never retries a child."""


class ChildDaemon(Daemon):
    child: ChildProcess
    child_pid_key = "child_pid"  # where the state file's details name the child's pid
    child_startup_timeout_s: float
    child_metrics_url = ""  # the child's Prometheus page ("" for none)
    child_metrics_prefixes: tuple[str, ...] = ()
    child_metrics_renames: dict[str, str] = {}

    async def child_healthy(self) -> bool:
        """The child's own health probe."""
        raise NotImplementedError

    async def start_child(self, what: str) -> bool:
        """``loading`` (``what``), start the child, wait until healthy; False if asked to stop meanwhile.

        Raises :class:`DaemonFailed` when the child exits, TimeoutError when it is not healthy in time, and when
        vLLM or LMCache were upgraded in place since this daemon started: a child started now would run other code
        than the daemon reports (its digest, its version checks), so the daemon exits to start again on the new
        code (its supervisor restarts it; a rolling ``disaggctl restart`` is the planned way)."""
        now = await asyncio.to_thread(installed_versions)
        ours = self.digest_parts.get("versions")
        if ours is not None and now != ours:
            raise CodeChanged(f"vLLM/LMCache were upgraded since this daemon started ({ours} -> {now}): exiting to "
                               "start again on them, not to run a child of other code")
        if not await self._start_when_port_free(what):
            return False
        self.details["keeper_pid"] = self.child.pid
        try:
            ok = await self.child.wait_healthy(
                self._own_child_healthy, self.child_startup_timeout_s, should_stop=lambda: self.stopping,
                on_tick=lambda _: self.on_child_tick(),
            )
        except ChildExited as exc:
            raise DaemonFailed(str(exc)) from None
        self.details[self.child_pid_key] = self.child.main_pid
        return ok

    def child_problem(self, reason: str) -> None:
        """Say why the child is not serving: ``waiting`` before the daemon first served, ``degraded`` after."""
        self.set_state(State.DEGRADED if self.state.serving else State.WAITING, reason)

    async def _start_when_port_free(self, what: str) -> bool:
        """Start the child (``loading``); while a stranger holds its port, wait (named in the state), never
        start a child that cannot bind. False if asked to stop meanwhile."""
        logged_at = -PORT_HELD_LOG_S
        while True:
            if self.stopping:  # draining: no new child (and no LOADING/WAITING from DRAINING)
                return False
            try:
                await self.child.astart()
            except PortHeld as exc:
                now = time.monotonic()
                if now - logged_at >= PORT_HELD_LOG_S:
                    log.error("%s; retrying every %.0fs", exc, PORT_HELD_RETRY_S)
                    logged_at = now
                self.child_problem(str(exc))
                self.notifier.extend_timeout(PORT_HELD_RETRY_S * 3)
                if await self.sleep_unless_stopped(PORT_HELD_RETRY_S):
                    return False
                continue
            if self.state.serving:
                self.child_problem(what)
            else:
                self.set_state(State.LOADING, what)
            return True

    async def _own_child_healthy(self) -> bool:
        """Healthy, and the process answering on the child's port is the child's own (not a stranger that
        answers there)."""
        if not await self.child_healthy():
            return False
        stranger = await self.child.port_stranger_now()
        if stranger is not None:
            log.error("%s: its port is answered by %s, not by this daemon's child: not taken for it",
                      self.child.name, stranger)
            return False
        return True

    def on_child_tick(self) -> None:
        """Once a second while the child starts: tell systemd the start is still making progress."""
        if self.child.main_pid is not None:
            self.details[self.child_pid_key] = self.child.main_pid
        self.notifier.extend_timeout(10)

    def child_started(self) -> bool:
        """True once the child runs; raises :class:`DaemonFailed` when it has exited since."""
        if self.child.pid is None:
            return False
        if not self.child.alive():
            raise DaemonFailed(self.child.exit_reason())
        return True

    async def shut_down(self) -> None:
        await self.child.stop(self.config.readiness.drain_timeout_s)

    async def scrape_extra(self) -> str:
        if not self.child_metrics_url or not self.child.alive():
            return ""
        return await scrape(self.http, self.child_metrics_url, self.child_metrics_prefixes,
                            self.child_metrics_renames)
