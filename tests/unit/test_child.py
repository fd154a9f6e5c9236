"""A child's stop reaps everything below it: an engine's grandchildren (vLLM's
EngineCore) must not outlive it, even when the child ignores SIGTERM or is stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemons.children.child import ChildProcess, descendants

from .fakes import wait_until

# A child that starts a grandchild and ignores SIGTERM, like a wedged engine.
STUBBORN = ("import subprocess, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen(['sleep', '300']); time.sleep(300)")


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(tmp_path: Path) -> tuple[ChildProcess, list[int]]:
    child = ChildProcess("stubborn", [sys.executable, "-c", STUBBORN], log_path=tmp_path / "child.log")
    child.start()
    deadline = time.monotonic() + 10
    while not (below := descendants(child.pid or 0)):
        assert time.monotonic() < deadline, "the grandchild never started"
        time.sleep(0.05)
    return child, below


def test_stop_kills_a_child_that_ignores_sigterm_and_its_grandchildren(tmp_path: Path) -> None:
    child, below = start(tmp_path)
    asyncio.run(child.stop(grace_s=0.5))
    assert not child.alive()
    assert not [pid for pid in below if running(pid)]


def test_stop_reaches_a_sigstopped_child(tmp_path: Path) -> None:
    child, below = start(tmp_path)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGSTOP)
    asyncio.run(child.stop(grace_s=0.5))
    assert not child.alive()
    assert not [pid for pid in below if running(pid)]


# A stand-in daemon: starts a ChildProcess whose child starts a grandchild, says their pids, then waits.
DAEMON = """
import asyncio, sys, time
from pathlib import Path
from daemons.children.child import ChildProcess, descendants
child = ChildProcess("engine", [sys.executable, "-c", {grandparent!r}], log_path=Path({log!r}))
child.start()
while len(descendants(child.pid)) < 3:
    time.sleep(0.05)
print(" ".join(map(str, [child.pid, *descendants(child.pid)])), flush=True)
time.sleep(300)
"""
# The engine: an API server that starts an EngineCore-like grandchild (which starts its own worker).
ENGINE = "import subprocess, time; subprocess.Popen(['sh', '-c', 'sleep 300 & sleep 300']); time.sleep(300)"


def wait_gone(pids: list[int], deadline_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + deadline_s
    while (left := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_no_grandchild_survives_a_kill_9_of_the_daemon(tmp_path: Path) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON.format(grandparent=ENGINE, log=str(tmp_path / "engine.log"))],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        line = daemon.stdout.readline() if daemon.stdout else ""
        tree = [int(p) for p in line.split()]
        assert len(tree) >= 4, f"the engine tree never started: {line!r}"  # keeper, engine, grandchildren
        assert all(running(p) for p in tree)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        assert wait_gone(tree) == [], "processes of the engine tree outlived their daemon"
    finally:
        daemon.kill()


def test_when_the_engine_dies_its_orphans_die_with_it(tmp_path: Path) -> None:
    child = ChildProcess("engine", [sys.executable, "-c", ENGINE], log_path=tmp_path / "engine.log")
    child.start()
    deadline = time.monotonic() + 10
    while len(below := descendants(child.pid or 0)) < 3:
        assert time.monotonic() < deadline, "the engine tree never started"
        time.sleep(0.05)
    engine = child.main_pid
    assert engine is not None and engine in below
    os.kill(engine, signal.SIGKILL)  # the API server dies; its EngineCore would be orphaned
    assert wait_gone(below) == []
    deadline = time.monotonic() + 10
    while child.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not child.alive() and "killed by signal 9" in child.exit_reason()



def test_a_killed_keeper_takes_the_child_along_and_what_it_left_is_killed_before_the_next_start(
        tmp_path: Path) -> None:
    from daemons.children.strays import tagged

    child, _ = start(tmp_path)
    wait_until(lambda: len(descendants(child.pid or 0)) >= 2, "the child started its grandchild")
    below = descendants(child.pid or 0)
    main = child.main_pid
    assert main is not None
    os.kill(child.pid or 0, signal.SIGKILL)  # the keeper, as `kill -9` of it
    wait_until(lambda: not running(main), "the child died with its keeper (parent-death signal)")
    grandchild = [pid for pid in below if pid != main]
    assert grandchild and tagged(child.tag) == [p for p in grandchild if running(p)]  # found by its tag
    assert child.reap_strays() and not [p for p in grandchild if running(p)]
    child.start()  # a new start finds nothing left
    try:
        assert all(p in child.tree() for p in tagged(child.tag))
    finally:
        asyncio.run(child.stop(grace_s=0.5))
    assert tagged(child.tag) == []


def test_a_stranger_on_the_childs_port_is_named_and_nothing_is_started(tmp_path: Path) -> None:
    import socket

    from daemons.children.child import PortHeld

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        child = ChildProcess("engine", [sys.executable, "-c", "pass"], log_path=tmp_path / "e.log", port=port)
        try:
            child.start()
        except PortHeld as exc:
            assert f"port {port} is held by pid {os.getpid()}" in str(exc)
        else:
            raise AssertionError("started against a stranger's port")
        assert child.proc is None


def test_sighup_stops_neither_the_keeper_nor_the_child(tmp_path: Path) -> None:
    child, _ = start(tmp_path)
    try:
        main = child.main_pid
        assert main is not None
        os.kill(child.pid or 0, signal.SIGHUP)
        os.kill(main, signal.SIGHUP)
        time.sleep(0.5)
        assert child.alive() and running(main)
    finally:
        asyncio.run(child.stop(grace_s=0.5))


def test_a_failure_reason_quotes_only_this_starts_lines(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_text("(APIServer pid=2057) ERROR EngineDeadError from an earlier process\n")
    child = ChildProcess("engine", [sys.executable, "-c", "import sys; sys.exit(3)"], log_path=log)
    child.start()
    wait_until(lambda: not child.alive(), "the child exited")
    reason = child.exit_reason()
    assert "exited with status 3" in reason and "2057" not in reason


def test_a_tagged_process_of_another_network_namespace_is_never_taken_for_ours(tmp_path: Path) -> None:
    """Hosts simulated on one machine (tests/e2e/test_hosts.py) see each other's processes, with the same
    paths bind-mounted: a child's tag alone would make one host's lmcache-server kill the other's."""
    import pytest

    from daemons.children.strays import TAG_ENV, tagged

    tag = f"test-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, TAG_ENV: tag}
    other = subprocess.Popen(["unshare", "--net", "sleep", "30"], env=env)
    try:
        deadline = time.monotonic() + 5
        while not below_any(other.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if other.poll() is not None:
            pytest.skip("unshare --net is not allowed here")
        here = subprocess.Popen(["sleep", "30"], env=env)
        try:
            wait_until(lambda: tagged(tag) == [here.pid], "only the process of this namespace is ours")
        finally:
            here.kill()
            here.wait()
    finally:
        other.kill()
        other.wait()


def below_any(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def test_cpu_engines_are_not_pinned_to_the_shared_cores_unless_the_operator_says_so(monkeypatch) -> None:
    """Two vLLM CPU engines pinned to the same cores starved one another's start (a decode-worker restart under
    failover traffic sat in sched_setaffinity): on CPU the engines' threads float, an operator's binding wins,
    and a GPU engine is left as vLLM sets it."""
    from daemons.children.engine import engine_env
    from daemons.config_sections import PrefillWorkerConfig

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert engine_env(PrefillWorkerConfig(device="cpu", kv_cache_memory_bytes=1 << 28))["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    gpu = engine_env(PrefillWorkerConfig(device="cuda:0"))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in gpu and gpu["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert engine_env(PrefillWorkerConfig(device="cpu", kv_cache_memory_bytes=1 << 28))["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_starting_and_stopping_a_child_never_walks_proc_on_the_event_loop(tmp_path: Path, monkeypatch) -> None:
    """(issue 30.4) Finding an earlier start's processes reads every process's environment, the port's holder every
    process's file descriptors, and a stop polls and waits: on the loop that serves failover, every request waited
    for them. Each must run in a worker thread."""
    import threading

    from daemons.children import child as child_module
    from daemons.children import strays
    from daemons.children.child_daemon import ChildDaemon

    on_loop: list[str] = []

    def off_loop(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            if threading.current_thread() is threading.main_thread():
                on_loop.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(strays, "tagged", off_loop("tagged", strays.tagged))
    monkeypatch.setattr(strays, "port_holder", off_loop("port_holder", strays.port_holder))
    monkeypatch.setattr(child_module, "descendants", off_loop("descendants", child_module.descendants))

    class OneChild(ChildDaemon):
        def __init__(self) -> None:  # only what start_child and shut_down use
            self.child = ChildProcess("stubborn", [sys.executable, "-c", STUBBORN], log_path=tmp_path / "child.log",
                                      port=free_port())
            self.child_startup_timeout_s = 30
            self.details = {}
            self.stopping_now = False
            self.digest_parts = {}

        @property
        def stopping(self) -> bool:  # type: ignore[override]
            return False

        def set_state(self, *_: object) -> bool:  # type: ignore[override]
            return True

        @property
        def state(self):  # type: ignore[no-untyped-def, override]
            from daemons.runtime.states import State
            return State.LOADING

        @property
        def notifier(self):  # type: ignore[no-untyped-def]
            from daemons.runtime.sdnotify import SystemdNotifier
            return SystemdNotifier("")

        async def child_healthy(self) -> bool:
            return True

    async def scenario() -> None:
        d = OneChild()
        assert await d.start_child("starting")
        await d.child.stop(1.0)
        # (issue 33) vLLM/LMCache upgraded in place since the daemon started: no child of other code is started.
        from daemons.runtime.lifecycle import DaemonFailed

        d.digest_parts = {"versions": "vllm 0.0.1, lmcache 0.0.1"}
        try:
            await d.start_child("starting again")
        except DaemonFailed as exc:
            assert "upgraded since this daemon started (vllm 0.0.1, lmcache 0.0.1 -> vllm " in str(exc), exc
        else:
            raise AssertionError("a child of other code was started")
        assert not d.child.alive()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert on_loop == [], f"ran on the event loop: {sorted(set(on_loop))}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A vLLM engine whose core failed to start, as seen on the CPU (the compound fault row): the failure logged, then
# a worker process caught SystemExit in a zmq destructor and never exited, and the API server waited for it.
LINGERING = ("import sys, time; print('earlier output', flush=True); "
             "print('(EngineCore pid=1) ERROR [core.py:1510] EngineCore failed to start.', flush=True); "
             "print('Traceback ... ConnectionError: Cannot reach the LMCache MP server', flush=True); time.sleep(300)")


def test_a_child_that_logged_a_failed_start_and_lingers_is_failed_at_once_not_at_the_startup_timeout(
        tmp_path: Path) -> None:
    import pytest

    from daemons.children.child import ChildExited
    from daemons.children.engine import VLLM_FAILED_START

    log = tmp_path / "engine.log"
    log.write_text("=== an earlier start\n(EngineCore pid=0) ERROR EngineCore failed to start.\n")  # not this start's
    child = ChildProcess("engine", [sys.executable, "-c", LINGERING], log_path=log, fatal_lines=VLLM_FAILED_START)
    child.start()
    try:
        async def never_healthy() -> bool:
            return False

        t0 = time.monotonic()
        with pytest.raises(ChildExited, match="failed to start and did not exit: .*EngineCore failed to start"):
            asyncio.run(child.wait_healthy(never_healthy, timeout_s=120))
        assert time.monotonic() - t0 < 60  # the deadline was 120 s: it is the line that failed it
        assert child.alive()  # still lingering: the worker stops it (test_stop_* above show how)
    finally:
        asyncio.run(child.stop(5))


def test_an_earlier_starts_failure_in_the_log_does_not_fail_this_start(tmp_path: Path) -> None:
    from daemons.children.engine import VLLM_FAILED_START

    log = tmp_path / "engine.log"
    log.write_text("(EngineCore pid=0) ERROR EngineCore failed to start.\n")
    child = ChildProcess("engine", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(300)"],
                         log_path=log, fatal_lines=VLLM_FAILED_START)
    child.start()
    try:
        calls = 0

        async def healthy_on_the_third_look() -> bool:
            nonlocal calls
            calls += 1
            return calls >= 3

        assert asyncio.run(child.wait_healthy(healthy_on_the_third_look, timeout_s=60))
    finally:
        asyncio.run(child.stop(5))
