"""sd_notify against a real datagram socket, as systemd listens for it."""

import os
import socket
import uuid

import pytest

from daemons.runtime.sdnotify import SystemdNotifier, watchdog_interval_s


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def test_messages_arrive(notify_socket):
    path, sock = notify_socket
    n = SystemdNotifier(path)
    assert n.enabled
    assert n.status("waiting for lmcache-server")
    assert sock.recv(4096) == b"STATUS=waiting for lmcache-server"
    assert n.ready("ready")
    assert sock.recv(4096) == b"READY=1\nSTATUS=ready"
    assert n.watchdog() and sock.recv(4096) == b"WATCHDOG=1"
    assert n.extend_timeout(2.5) and sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000"
    assert n.stopping() and sock.recv(4096) == b"STOPPING=1"


def test_reads_notify_socket_from_environment(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert SystemdNotifier().ready()
    assert sock.recv(4096) == b"READY=1"


def test_abstract_namespace_socket():
    name = f"disagg-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    with sock:
        assert SystemdNotifier("@" + name).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_without_notify_socket_it_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SystemdNotifier()
    assert not n.enabled and n.ready() is False


def test_dead_socket_does_not_raise(tmp_path):
    assert SystemdNotifier(str(tmp_path / "nobody-listens")).ready() is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval_s() is None


def test_a_notify_socket_nobody_reads_drops_messages_and_never_blocks(tmp_path):
    """A full queue (systemd not reading: a hung PID 1, a test harness) must not block the daemon's event loop."""
    import socket
    import time

    from daemons.runtime.sdnotify import SystemdNotifier

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = SystemdNotifier(str(path))
        t0 = time.monotonic()
        sent = [notifier.watchdog() for _ in range(5000)]  # far past the queue's length (net.unix.max_dgram_qlen)
        assert time.monotonic() - t0 < 10
        assert sent[0] and not sent[-1]
