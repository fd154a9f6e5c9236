"""A child's stop reaps everything below it: an engine's grandchildren (vLLM's
EngineCore) must not outlive it, even when the child ignores SIGTERM or is stopped."""

from __future__ import annotations

import asyncio
import os
import signal
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
