"""Each daemon started exactly as its systemd unit's ExecStart= says, with
NOTIFY_SOCKET on a real datagram socket: READY=1 only after the dependency is
ready, WATCHDOG=1 at half of WatchdogSec, STOPPING=1 then exit 0 on SIGTERM."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import REPO, write_config

UNITS = REPO / "deploy" / "systemd"
BIN = str(Path(sys.executable).parent)
OFFSET = 10000  # ports of their own, beside the session's stack


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def first(self, prefix: str) -> float | None:
        return next((t for t, m in self.messages if m.startswith(prefix)), None)

    def wait_for(self, prefix: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.first(prefix)
            if t is not None:
                return t
            time.sleep(0.2)
        pytest.fail(f"no {prefix!r} on {self.path.name} within {timeout}s; got {[m for _, m in self.messages]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def exec_start(unit: str, config: Path) -> list[str]:
    """The unit's ExecStart= with this checkout's venv and the test config."""
    text = (UNITS / unit).read_text()
    line = re.search(r"^ExecStart=(.+)$", text, re.M).group(1)
    line = line.replace("/opt/disagg/.venv/bin", BIN).replace("${DISAGG_CONFIG}", str(config))
    return shlex.split(line)


def unit_watchdog_usec(unit: str) -> int:
    seconds = int(re.search(r"^WatchdogSec=(\d+)$", (UNITS / unit).read_text(), re.M).group(1))
    return seconds * 1_000_000


@pytest.fixture
def notify_config(tmp_path, model_dir) -> Path:
    def shift(section: dict) -> dict:
        return {k: v + OFFSET for k, v in section.items()}

    from .conftest import PORTS

    return write_config(tmp_path, **{name: shift(ports) for name, ports in PORTS.items()},
                        readiness={"heartbeat_interval_s": 5, "heartbeat_timeout_s": 15})


def start(unit: str, config: Path, listener: NotifyListener, watchdog_usec: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)
    with log.open("wb") as out:
        return subprocess.Popen(exec_start(unit, config), env=env, stdout=out, stderr=subprocess.STDOUT)


def test_sd_notify_protocol_as_systemd_runs_the_units(notify_config, tmp_path):
    # The shipped WatchdogSec is 60 s; a test cannot wait minutes for pings, so it
    # asks for 2 s here, as systemd would pass it through WATCHDOG_USEC.
    assert unit_watchdog_usec("disagg-prefill-worker.service") == 60_000_000
    watchdog_usec = 2_000_000
    lm_listener = NotifyListener(tmp_path / "lm.sock")
    pf_listener = NotifyListener(tmp_path / "pf.sock")
    procs: list[subprocess.Popen] = []
    try:
        # prefill-worker first: it must wait for lmcache-server and say so.
        pf = start("disagg-prefill-worker.service", notify_config, pf_listener, watchdog_usec, tmp_path / "pf.log")
        procs.append(pf)
        waiting = pf_listener.wait_for("STATUS=waiting: waiting for lmcache-server", 30)
        time.sleep(2)
        assert pf_listener.first("READY=1") is None
        lm = start("disagg-lmcache-server.service", notify_config, lm_listener, watchdog_usec, tmp_path / "lm.log")
        procs.append(lm)
        lm_ready = lm_listener.wait_for("READY=1", 120)
        pf_ready = pf_listener.wait_for("READY=1", 900)
        assert waiting < lm_ready < pf_ready
        assert pf_listener.first("STATUS=loading") is not None
        assert pf_listener.first("EXTEND_TIMEOUT_USEC=") is not None
        # Watchdog pings at WatchdogSec/2 while healthy.
        time.sleep(6)
        pings = [t for t, m in pf_listener.messages if m == "WATCHDOG=1" and t > pf_ready]
        assert len(pings) >= 4
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert 0.7 < statistics.median(gaps) < 1.5, gaps
        # SIGTERM: STOPPING=1, then a clean exit; the engine child goes with it.
        for proc, listener in ((pf, pf_listener), (lm, lm_listener)):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 0, (tmp_path / "pf.log").read_text()[-2000:]
            assert listener.first("STOPPING=1") is not None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lm_listener.close()
        pf_listener.close()
    engine_log = (Path(notify_config).parent / "log" / "prefill-worker-engine.log").read_text()
    assert "kv_producer" in engine_log
