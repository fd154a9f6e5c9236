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

from daemons.child import ChildProcess, descendants

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
from daemons.child import ChildProcess, descendants
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
