"""The status reporter writes the state file off the event loop and ends with the final word;
Peers says which peers are new processes and which became usable again."""

from __future__ import annotations

import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from daemons.runtime.exposition import DaemonMetrics
from daemons.runtime.peers import Peers
from daemons.runtime.sdnotify import SystemdNotifier
from daemons.runtime.statefile import PeerView, StateRecord, read_state
from daemons.runtime.states import State
from daemons.runtime.status import StatusReporter


def reporter(tmp_path: Path, holder: dict[str, object]) -> StatusReporter:
    def snapshot() -> StateRecord:
        return StateRecord("lmcache-server", 1, holder["state"], "x:1", "x:2", "d", "0", 0.0,  # type: ignore[arg-type]
                           reason=str(holder.get("reason", "")))
    return StatusReporter(tmp_path, snapshot, notifier=SystemdNotifier(),
                          metrics=DaemonMetrics("lmcache-server", CollectorRegistry(), version="0", digest="d"),
                          started_at=0.0)


def test_writes_happen_on_the_writer_thread_and_close_writes_the_final_state(tmp_path: Path) -> None:
    holder: dict[str, object] = {"state": State.LOADING}
    r = reporter(tmp_path, holder)
    written: list[str] = []
    real_write = r._write
    r._write = lambda record: (written.append(threading.current_thread().name), real_write(record))  # type: ignore
    for state in (State.LOADING, State.READY, State.DEGRADED):
        holder["state"] = state
        r.changed(state, "", True)
    holder["state"], holder["reason"] = State.FAILED, "engine died"
    r.close()
    record = read_state(tmp_path, "lmcache-server")
    assert record is not None and (record.state, record.reason) == (State.FAILED, "engine died")
    assert written[-1] == threading.current_thread().name  # close() writes itself, after the thread ended
    assert set(written[:-1]) <= {"state-file"}  # the rest: never the caller's (event loop's) thread
    r.publish()  # after close: nothing more is written
    assert len(written) == r.writes


def view(name: str, pid: int, usable: bool = True) -> PeerView:
    record = StateRecord(name, pid, State.READY, "x:1", "", "d", "0", started_at=float(pid))
    return PeerView(name, "ready" if usable else "stale", usable, "", record)


def test_peers_tell_new_processes_from_ones_that_came_back(tmp_path: Path) -> None:
    peers = Peers(tmp_path, 5, expect_digest=None, names=["lmcache-server"])
    first = peers.update([view("lmcache-server", 10)])
    assert first.renewed == [] and first.usable_again == ["lmcache-server"]
    assert peers.ready("lmcache-server")
    stale = peers.update([view("lmcache-server", 10, usable=False)])  # SIGSTOPped: heartbeat too old
    assert stale.renewed == [] and not peers.ready("lmcache-server")
    back = peers.update([view("lmcache-server", 10)])  # the same process, awake again
    assert back.renewed == [] and back.usable_again == ["lmcache-server"]
    assert peers.update([view("lmcache-server", 10)]).usable_again == []
    peers.update([view("lmcache-server", 10, usable=False)])
    restarted = peers.update([view("lmcache-server", 11)])
    assert restarted.renewed == ["lmcache-server"] and restarted.usable_again == ["lmcache-server"]
