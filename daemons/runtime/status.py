"""How a daemon tells the world its state: the state file, systemd, metrics.

The state file is rewritten (atomically, with fsync) on every change and every
heartbeat, by a writer thread: the event loop that serves requests only hands
over a snapshot and never waits on the disk. Writes coalesce: a burst of
changes costs one write of the newest state. ``close()`` writes the last state
synchronously, so a daemon's final word (``stopped``, ``failed``) is on disk
before it exits. systemd hears ``READY=1`` once (the first time the daemon
serves) and ``STATUS=`` on every change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from daemons.runtime.exposition import DaemonMetrics
from daemons.runtime.sdnotify import SystemdNotifier
from daemons.runtime.statefile import StateRecord, write_state
from daemons.runtime.states import State

log = logging.getLogger(__name__)


class StatusReporter:
    def __init__(self, runtime_dir: Path, snapshot: Callable[[], StateRecord], *,
                 notifier: SystemdNotifier, metrics: DaemonMetrics, started_at: float) -> None:
        self.runtime_dir = Path(runtime_dir)
        self.snapshot = snapshot
        self.notifier = notifier
        self.metrics = metrics
        self.started_at = started_at
        self.ready_notified = False
        self.writes = 0
        self._pending: StateRecord | None = None
        self.last: tuple[StateRecord, float] | None = None  # last record published, and when (time.monotonic())
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()  # the writer thread and close() never write at once

    def changed(self, state: State, reason: str, new_state: bool) -> None:
        """A transition happened (``new_state`` False: only the reason changed)."""
        self.metrics.set_state(state)
        status = f"{state.value}: {reason}" if reason else state.value
        if state.serving and not self.ready_notified:
            self.ready_notified = True
            self.metrics.readiness_seconds.set(time.time() - self.started_at)
            self.notifier.ready(status)
        else:
            self.notifier.status(status)
        self.publish()

    def publish(self) -> None:
        """Have the state file say what the daemon is now (the heartbeat calls this too)."""
        record = self.snapshot()
        self.last = (record, time.monotonic())
        with self._cond:
            if self._closed:
                return
            self._pending = record
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer, name="state-file", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        """Stop the writer and write the final state now."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._write(self.snapshot())

    def _writer(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                record, self._pending = self._pending, None
            if record is not None:
                self._write(record)

    def _write(self, record: StateRecord) -> None:
        with self._write_lock:
            try:
                write_state(self.runtime_dir, record)
                self.writes += 1
            except OSError as exc:
                log.error("cannot write state file in %s: %s", self.runtime_dir, exc)
