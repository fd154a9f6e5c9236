"""One daemon of a name per runtime directory: the lock, held by a real process, refused to a second, gone with its
holder however it ends."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemons.runtime.instance_lock import AlreadyRunning, hold_instance_lock, lock_path

HOLDER = ("import sys, time; from daemons.runtime.instance_lock import hold_instance_lock; "
          "hold_instance_lock(sys.argv[1], 'prefill-worker'); print('held', flush=True); time.sleep(60)")


def holder(runtime: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(runtime)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_with_the_pid_that_runs_and_the_lock_dies_with_it(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(AlreadyRunning, match=f"pid {proc.pid} holds"):
            hold_instance_lock(tmp_path, "prefill-worker")
        hold_instance_lock(tmp_path, "decode-worker")  # another name: its own lock
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while True:  # the kernel drops a dead holder's lock: no stale lock to clean up
        try:
            hold_instance_lock(tmp_path, "prefill-worker")
            break
        except AlreadyRunning:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert lock_path(tmp_path, "prefill-worker").read_text().strip() != str(proc.pid)
