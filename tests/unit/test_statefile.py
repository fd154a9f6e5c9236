"""The readiness protocol's state files: atomic writes, stale pids, heartbeats."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from daemons.runtime.statefile import State, StateRecord, assess, check_runtime_dir, read_state, state_path, write_state


def record(daemon: str = "prefill-worker", **kw) -> StateRecord:
    fields = dict(
        daemon=daemon, pid=os.getpid(), state=State.READY, endpoint="127.0.0.1:1", metrics="127.0.0.1:2",
        config_digest="abc", version="0", started_at=time.time(),
    )
    fields.update(kw)
    return StateRecord(**fields)


@pytest.fixture
def listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_round_trip_and_no_temporary_files_left(tmp_path):
    rec = record(reason="why", details={"starts": 3})
    path = write_state(tmp_path, rec)
    assert path == state_path(tmp_path, "prefill-worker")
    back = read_state(tmp_path, "prefill-worker")
    assert back == rec
    assert [p.name for p in tmp_path.iterdir()] == ["prefill-worker.json"]
    assert json.loads(path.read_text())["state"] == "ready"


def test_readers_never_see_a_partial_file(tmp_path):
    stop = threading.Event()
    seen_bad = []

    def reader():
        while not stop.is_set():
            try:
                text = state_path(tmp_path, "decode-worker").read_text()
            except FileNotFoundError:
                continue
            try:
                json.loads(text)
            except ValueError:
                seen_bad.append(text)

    write_state(tmp_path, record("decode-worker"))
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            write_state(tmp_path, record("decode-worker", reason="x" * (i * 37 % 5000)))
    finally:
        stop.set()
        t.join()
    assert seen_bad == []


def test_absent_file(tmp_path):
    view = assess(tmp_path, "lmcache-server", 15)
    assert (view.state, view.usable) == ("absent", False)


def test_garbage_file_counts_as_absent(tmp_path):
    state_path(tmp_path, "lmcache-server").write_text("{not json")
    assert assess(tmp_path, "lmcache-server", 15).state == "absent"


def test_ready_alive_fresh_and_reachable_is_usable(tmp_path, listening):
    write_state(tmp_path, record(endpoint=listening))
    view = assess(tmp_path, "prefill-worker", 15)
    assert view.usable and view.state == "ready"


def test_dead_pid_is_stale(tmp_path, listening):
    write_state(tmp_path, record(endpoint=listening, pid=dead_pid()))
    view = assess(tmp_path, "prefill-worker", 15)
    assert view.state == "stale" and not view.usable and "not running" in view.reason


def test_old_heartbeat_is_stale(tmp_path, listening):
    write_state(tmp_path, record(endpoint=listening, heartbeat=time.time() - 60,
                                 heartbeat_monotonic=time.monotonic() - 60))
    view = assess(tmp_path, "prefill-worker", 15)
    assert view.state == "stale" and "heartbeat is 60s old" in view.reason


def test_endpoint_refusing_connections_is_not_usable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        write_state(tmp_path, record(endpoint=f"127.0.0.1:{port}"))
        view = assess(tmp_path, "prefill-worker", 15)
    assert view.state == "ready" and not view.usable and "refuses" in view.reason


def test_digest_mismatch_is_not_usable(tmp_path, listening):
    write_state(tmp_path, record(endpoint=listening, config_digest="other"))
    view = assess(tmp_path, "prefill-worker", 15, expect_digest="abc")
    assert not view.usable and "config digest" in view.reason


@pytest.mark.parametrize("state", [State.LOADING, State.WAITING, State.STOPPED, State.FAILED])
def test_not_serving_states_are_not_usable(tmp_path, listening, state):
    write_state(tmp_path, record(endpoint=listening, state=state, reason="because"))
    view = assess(tmp_path, "prefill-worker", 15)
    assert view.state == state.value and not view.usable and view.reason == "because"


def test_degraded_is_usable_but_says_so(tmp_path, listening):
    write_state(tmp_path, record(endpoint=listening, state=State.DEGRADED))
    view = assess(tmp_path, "prefill-worker", 15)
    assert view.usable and view.state == "degraded"


def test_write_fails_cleanly_on_unwritable_dir(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(OSError):
        write_state(target, record())


@pytest.mark.parametrize("text", [
    '{"daemon": "lmcache-server", "pid": "1", "state": "ready", "endpoint": "x:1", "metrics": "x:2", '
    '"config_digest": "d", "version": "0", "started_at": 0}',  # pid of the wrong type
    '{"daemon": "lmcache-server", "pid": 1, "state": "kaput", "endpoint": "x:1", "metrics": "x:2", '
    '"config_digest": "d", "version": "0", "started_at": 0}',  # no such state
    '{"daemon": "lmcache-server", "pid": 1, "state": "ready"}',  # fields missing
    '[1, 2, 3]', '"ready"', "[" * 100_000, '{"pid": true}',
])
def test_a_hostile_record_is_ignored_with_a_warning(tmp_path, text, caplog):
    state_path(tmp_path, "lmcache-server").write_text(text)
    assert read_state(tmp_path, "lmcache-server") is None
    assert assess(tmp_path, "lmcache-server", 10).state == "absent"
    assert "not a valid state record" in caplog.text


def test_a_runtime_dir_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "run"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by group or others"):
        check_runtime_dir(shared)
    shared.chmod(0o755)
    check_runtime_dir(shared)
    check_runtime_dir(tmp_path / "new" / "run")  # created


def test_a_start_retires_the_previous_runs_records_of_dead_processes(tmp_path):
    """`disaggctl up` then `wait-ready --fail-fast` read the last run's `failed` record (a dead pid) before the
    new daemon rewrote it; now that record is moved aside first and the new run is judged alone."""
    from daemons.runtime.statefile import retire_dead_records

    write_state(tmp_path, record("prefill-worker", state=State.FAILED, pid=dead_pid(), reason="engine died"))
    write_state(tmp_path, record("decode-worker"))  # this process: alive, kept
    assert assess(tmp_path, "prefill-worker", 15).state == "failed"
    assert retire_dead_records(tmp_path, ["prefill-worker", "decode-worker", "lmcache-server"]) == ["prefill-worker"]
    assert assess(tmp_path, "prefill-worker", 15).state == "absent"  # waiting for the new process, not failed
    assert "engine died" in (tmp_path / "prefill-worker.json.last").read_text()  # kept for the post-mortem
    assert read_state(tmp_path, "decode-worker") is not None


def test_a_wall_clock_step_makes_no_peer_stale(tmp_path, listening):
    """Heartbeats are aged by the monotonic clock on the writer's boot: an hour's step of the wall clock
    (NTP, `date -s`) between two heartbeats changes nothing; a heartbeat that really is old is stale."""
    write_state(tmp_path, record(endpoint=listening, heartbeat=time.time() - 3600))  # written "an hour ago"
    assert assess(tmp_path, "prefill-worker", 15).usable
    write_state(tmp_path, record(endpoint=listening, heartbeat=time.time(), heartbeat_monotonic=time.monotonic() - 60))
    view = assess(tmp_path, "prefill-worker", 15)
    assert not view.usable and view.state == "stale" and "60s old" in view.reason
    # Another boot's record (another host's file, an older writer): wall clocks, as before.
    write_state(tmp_path, record(endpoint=listening, heartbeat=time.time() - 60, boot_id="another-boot"))
    assert assess(tmp_path, "prefill-worker", 15).state == "stale"
