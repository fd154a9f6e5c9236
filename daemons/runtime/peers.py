"""What a daemon knows of the daemons it depends on, judged from their state files
(or, for a daemon on another host, from the record it serves: :mod:`daemons.runtime.remote_state`).

Judging a peer reads its state file and opens a TCP connection to its endpoint
(:func:`daemons.statefile.assess`): both run in a thread, never on the event
loop that serves requests. :meth:`Peers.refresh` judges all of them at once
and keeps the verdicts; :meth:`Peers.ready` answers from those, at no cost,
as often as the request path likes. A peer that comes back as a new process
(another pid or start time) is a new *generation*: :meth:`Peers.refresh`
says which peers are new processes and which became usable again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from daemons.runtime.remote_state import assess_remote
from daemons.runtime.statefile import PeerView, assess

log = logging.getLogger(__name__)


@dataclass
class Changes:
    renewed: list[str] = field(default_factory=list)  # a new process since the last usable verdict
    usable_again: list[str] = field(default_factory=list)  # usable now, not at the last verdict (or new)


def generation(view: PeerView) -> tuple[int, float] | None:
    """Which process a usable peer is (pid, start time); None when it is not usable."""
    return (view.record.pid, view.record.started_at) if view.record is not None and view.usable else None


class Peers:
    def __init__(self, runtime_dir: Path, heartbeat_timeout_s: float, *, expect_digest: str | None,
                 names: Iterable[str] = (), expect_parts: Mapping[str, str] | None = None) -> None:
        self.runtime_dir = Path(runtime_dir)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.expect_digest = expect_digest
        self.expect_parts = expect_parts  # what the digest covers: a mismatch names the part
        self.names = list(names)
        self.remote: dict[str, str] = {}  # peers on other hosts: name -> their /disagg/state URL
        self.remote_headers: dict[str, str] = {}  # what asking them carries (the cluster's secret)
        self.views: dict[str, PeerView] = {}
        self.generations: dict[str, tuple[int, float] | None] = {}

    def assess(self, name: str) -> PeerView:
        """Judge one peer now (blocking: file read and TCP connect, or an HTTP call to another host)."""
        if name in self.remote:
            return assess_remote(self.remote[name], name, self.heartbeat_timeout_s, expect_digest=self.expect_digest,
                                 expect_parts=self.expect_parts, headers=self.remote_headers)
        return assess(self.runtime_dir, name, self.heartbeat_timeout_s, expect_digest=self.expect_digest,
                      expect_parts=self.expect_parts)

    async def view(self, name: str) -> PeerView:
        """Judge one peer now, off the event loop, and remember the verdict."""
        self.views[name] = await asyncio.to_thread(self.assess, name)
        return self.views[name]

    async def refresh(self) -> Changes:
        """Judge every peer off the event loop, all at once (k unreachable hosts cost one timeout, not k); which came
        back as new processes or became usable."""
        views = await asyncio.gather(*(asyncio.to_thread(self.assess, n) for n in self.names))
        return self.update(views)

    def update(self, views: Iterable[PeerView]) -> Changes:
        """Take new verdicts and say what changed since the last ones."""
        changes = Changes()
        for view in views:
            before = self.views.get(view.daemon)
            self.views[view.daemon] = view
            gen = generation(view)
            if gen is None:
                continue
            last = self.generations.get(view.daemon)
            if last is not None and gen != last:
                changes.renewed.append(view.daemon)
            if before is None or not before.usable or gen != last:
                changes.usable_again.append(view.daemon)
            self.generations[view.daemon] = gen
        return changes

    async def wait_ready(self, names: list[str], timeout_s: float, stop: asyncio.Event,
                         waiting: Callable[[str], None]) -> PeerView | None:
        """Poll until one of ``names`` is ready (its view), ``stop`` is set (None) or ``timeout_s`` passes
        (TimeoutError). ``waiting(reason)`` hears why not, at every poll."""
        t0 = time.monotonic()
        while not stop.is_set():
            views = [await self.view(name) for name in names]
            ready = [v for v in views if v.ready]
            if ready:
                log.info("%s is ready (waited %.1fs)", ready[0].daemon, time.monotonic() - t0)
                return ready[0]
            waiting("waiting for " + "; ".join(f"{v.daemon}: {v.state}, {v.reason}" for v in views))
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{', '.join(names)} not ready after {timeout_s:.0f}s "
                                   f"({views[0].state}: {views[0].reason})")
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except TimeoutError:
                pass
        return None

    def ready(self, name: str) -> bool:
        """From the last verdict: usable and ``ready``."""
        view = self.views.get(name)
        return view is not None and view.ready

    def describe(self, name: str) -> str:
        view = self.views.get(name)
        return f"{name} {view.state}: {view.reason}" if view is not None else f"{name} unknown"
