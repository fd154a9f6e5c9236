"""A child's output on a real server: rotated by size, routine access lines left out, the journal as a stream
of its own, a full disk that loses lines but never the child, and no secret in the child's environment."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daemons.children import keeper
from daemons.children.child import ChildProcess
from daemons.config_sections import LogsConfig

from .fakes import wait_until

# Writes `n` lines of 1 KiB (a chatty engine), says so, then stays up.
CHATTY = ("import sys, time\n"
          "n = int(sys.argv[1])\n"
          "for i in range(n): print(f'line {i:06d} ' + 'x' * 1000, flush=True)\n"
          "print('INFO:     127.0.0.1:5 - \"GET /healthcheck HTTP/1.1\" 200 OK', flush=True)\n"
          "print('INFO:     127.0.0.1:5 - \"GET /healthcheck HTTP/1.1\" 503 Service Unavailable', flush=True)\n"
          "print('ERROR done writing', flush=True)\n"
          "time.sleep(300)\n")


def text_of(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # the keeper has not opened it yet
        return ""


def chatty(tmp_path: Path, lines: int, logs: LogsConfig, log: Path | None = None) -> ChildProcess:
    child = ChildProcess("engine", [sys.executable, "-c", CHATTY, str(lines)], log_path=log or tmp_path / "e.log",
                         logs=logs)
    child.start()
    return child


def test_the_log_is_rotated_by_size_keeping_the_configured_count(tmp_path: Path) -> None:
    logs = LogsConfig(children="file", max_bytes=1 << 16, backups=2)
    child = chatty(tmp_path, 400, logs)  # ~400 KiB: six rotations of 64 KiB
    try:
        wait_until(lambda: child.tail(1) == "ERROR done writing", "the child's last line is in its log")
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["e.log", "e.log.1", "e.log.2"], files
        for name in files:
            assert (tmp_path / name).stat().st_size < (1 << 16) + 70000, name  # at most one read past the limit
        # The newest lines are in e.log, or in e.log.1 when the write that carried them filled the file and
        # rotated it (e.log is then new and empty); the oldest were rotated away for good.
        newest = (tmp_path / "e.log.1").read_text() + (tmp_path / "e.log").read_text()
        assert "line 000399" in newest and newest.rstrip().endswith("ERROR done writing")
        assert "line 000000 " not in newest
    finally:
        asyncio.run(child.stop(grace_s=0.5))


def test_routine_access_lines_are_left_out_unless_asked(tmp_path: Path) -> None:
    for access_log, kept in ((False, False), (True, True)):
        log = tmp_path / f"access-{access_log}.log"
        child = chatty(tmp_path, 1, LogsConfig(children="file", access_log=access_log), log)
        try:
            wait_until(lambda log=log: "\nERROR done writing" in text_of(log), "the child's last line is in its log")
            text = log.read_text().split("\n", 2)[2]  # after this start's header (which quotes the code)
            assert ('"GET /healthcheck HTTP/1.1" 200' in text) is kept
            assert '"GET /healthcheck HTTP/1.1" 503' in text  # a failing check is always kept
        finally:
            asyncio.run(child.stop(grace_s=0.5))


def test_the_journal_gets_a_stream_named_after_the_child(tmp_path: Path) -> None:
    """The keeper speaks journald's stream protocol (what `systemd-cat -t` sends) to the socket it is given."""
    path = tmp_path / "journal.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got: list[bytes] = []

    def accept() -> None:
        conn, _ = server.accept()
        while chunk := conn.recv(65536):
            got.append(chunk)

    reader = threading.Thread(target=accept, daemon=True)
    reader.start()
    proc = subprocess.run([sys.executable, "-S", keeper.__file__, "--log", str(tmp_path / "c.log"),
                           "--journal", "decode-worker-engine", "--journal-socket", str(path), "--",
                           sys.executable, "-c", "print('hello from the engine')"], timeout=30)
    assert proc.returncode == 0
    reader.join(10)
    stream = b"".join(got)
    assert stream.startswith(b"decode-worker-engine\n\n6\n0\n0\n0\n0\n"), stream[:80]
    assert b"hello from the engine\n" in stream
    assert "hello from the engine" in (tmp_path / "c.log").read_text()  # and the file, for the exit reason


def test_a_full_disk_loses_lines_never_the_child(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last block
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        ticks = tmp_path / "ticks"  # the child counts its lines here, off the full disk
        ticker = ("import itertools, sys, time\n"
                  "for i in itertools.count():\n"
                  "    print(f'tick {i} ' + 'x' * 2000, flush=True)\n"
                  f"    open({str(ticks)!r}, 'w').write(str(i))\n"
                  "    time.sleep(0.02)\n")
        child = ChildProcess("engine", [sys.executable, "-c", ticker], log_path=disk / "engine.log",
                             logs=LogsConfig(children="file"))
        child.start()  # the header cannot be written: the start goes on
        try:
            wait_until(lambda: int(text_of(ticks) or 0) > 200, "the child writes on (400 KiB, more than the disk)")
            assert child.alive(), child.exit_reason()
            filler.unlink()  # room again: the next lines say what was lost
            wait_until(lambda: "bytes of output lost (No space left on device)" in text_of(disk / "engine.log"),
                       "the loss noted once there is room")
            assert child.alive()
        finally:
            asyncio.run(child.stop(grace_s=0.5))
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_the_api_keys_and_systemd_handles_stay_with_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"DISAGG_API_KEYS": "sk-secret", "NOTIFY_SOCKET": "/run/x", "LISTEN_FDS": "1",
                       "CREDENTIALS_DIRECTORY": "/run/credentials/x"}.items():
        monkeypatch.setenv(key, value)
    child = ChildProcess("engine", [sys.executable, "-c", "import time; time.sleep(60)"],
                         log_path=tmp_path / "e.log")
    child.start()
    try:
        wait_until(lambda: child.main_pid is not None, "the child runs")
        for pid in (child.pid, child.main_pid):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            names = {e.split(b"=", 1)[0].decode() for e in environ if e}
            assert not names & {"DISAGG_API_KEYS", "NOTIFY_SOCKET", "LISTEN_FDS", "CREDENTIALS_DIRECTORY"}, names
            assert b"sk-secret" not in b"\0".join(environ)
    finally:
        asyncio.run(child.stop(grace_s=0.5))
