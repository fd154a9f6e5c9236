"""What lmcache-server and the two workers share: one child process the daemon
owns (LMCache's server, a vLLM engine). It starts the child, waits until the
child's probe says healthy, fails the daemon when the child exits, stops the
child's whole process tree on the way out, and appends the child's own
metrics to the daemon's /metrics."""

from __future__ import annotations

import logging

from .child import ChildExited, ChildProcess
from .lifecycle import Daemon, DaemonFailed
from .metrics import scrape
from .states import State

log = logging.getLogger(__name__)


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

        Raises :class:`DaemonFailed` when the child exits, TimeoutError when it is not healthy in time."""
        self.set_state(State.LOADING, what)
        self.child.start()
        self.details["keeper_pid"] = self.child.pid
        try:
            ok = await self.child.wait_healthy(
                self.child_healthy, self.child_startup_timeout_s, should_stop=lambda: self.stopping,
                on_tick=lambda _: self.on_child_tick(),
            )
        except ChildExited as exc:
            raise DaemonFailed(str(exc)) from None
        self.details[self.child_pid_key] = self.child.main_pid
        return ok

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
