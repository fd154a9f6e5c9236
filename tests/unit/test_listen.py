"""Listening sockets that outlive a daemon: systemd's socket activation (LISTEN_FDS) and the socket holder
(SCM_RIGHTS over a unix socket), with real sockets; a socket bound elsewhere than the config says is refused."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from daemons.names import SHARED_FRONT_DOOR
from daemons.runtime import listen


def bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_socket_activated_fd_is_taken_by_name_and_the_variables_are_dropped(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    held = bound()
    port = held.getsockname()[1]
    fd = os.dup(held.fileno())
    monkeypatch.setattr(listen, "SD_LISTEN_FDS_START", fd)  # systemd's first fd is 3; here: a free one
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "decode-worker"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sock = listen.inherited_socket("decode-worker", "127.0.0.1", port)
    assert sock is not None and sock.getsockname()[1] == port
    assert "LISTEN_FDS" not in os.environ and not os.get_inheritable(fd)
    sock.close()
    held.close()


def test_activation_meant_for_another_process_is_ignored() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen.inherited_socket("decode-worker", "127.0.0.1", 8000, env) is None


def test_the_holder_hands_each_daemon_its_socket_and_a_restart_refuses_nothing(tmp_path: Path) -> None:
    from daemons.config import parse_config
    from daemons.deployment import Deployment
    from daemons.ops.socket_holder import SocketHolder, sockets_path

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ports = [bound() for _ in range(2)]
    nums = [s.getsockname()[1] for s in ports]
    for s in ports:
        s.close()
    doc = {"runtime_dir": str(tmp_path / "run"), "log_dir": str(tmp_path / "log"), "model": {"path": str(model)},
           "prefill_worker": {"kv_cache_memory_bytes": 1 << 28, "port": nums[0]},
           "decode_worker": {"kv_cache_memory_bytes": 1 << 28, "port": nums[1]}}
    (tmp_path / "run").mkdir()
    config = parse_config(doc, tmp_path / "disagg.yaml")
    holder = SocketHolder(Deployment(config))
    thread = threading.Thread(target=holder.serve, daemon=True)
    thread.start()
    try:
        env = {listen.HOLDER_ENV: str(sockets_path(config))}
        first = listen.inherited_socket("decode-worker", "127.0.0.1", nums[1], env)
        assert first is not None and first.getsockname()[1] == nums[1]
        first.close()  # the daemon is gone: the port still accepts, into the held socket's backlog
        client = socket.create_connection(("127.0.0.1", nums[1]), timeout=5)
        again = listen.inherited_socket("decode-worker", "127.0.0.1", nums[1], env)  # the next process
        assert again is not None
        conn, _ = again.accept()  # the connection made while no daemon was there
        client.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        conn.close(), client.close(), again.close()
        assert listen.inherited_socket("lmcache-server", "127.0.0.1", 5555, env | {}) is None  # none held for it
        wrong = listen.inherited_socket("prefill-worker", "127.0.0.1", nums[1], env)  # not where the config says
        assert wrong is None
    finally:
        holder.stop()
        thread.join(5)
        for sock in holder.sockets.values():
            sock.close()


def test_a_wildcard_socket_is_refused_for_a_config_that_says_loopback(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """(issue 30.7) The shipped .socket said 0.0.0.0:8000 and the daemon took any wildcard socket: a loopback,
    key-less config listened on every interface."""
    held = socket.socket()
    held.bind(("0.0.0.0", 0))
    held.listen()
    port = held.getsockname()[1]
    fd = os.dup(held.fileno())
    monkeypatch.setattr(listen, "SD_LISTEN_FDS_START", fd)
    for key, value in {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "decode-worker"}.items():
        monkeypatch.setenv(key, value)
    assert listen.inherited_socket("decode-worker", "127.0.0.1", port) is None
    held.close()


def test_addresses_match_exactly_a_wildcard_only_a_wildcard() -> None:
    assert listen.same_address("0.0.0.0", "0.0.0.0") and listen.same_address("::", "0.0.0.0")
    assert not listen.same_address("0.0.0.0", "127.0.0.1") and not listen.same_address("127.0.0.1", "0.0.0.0")
    assert listen.same_address("127.0.0.1", "localhost") and listen.same_address("127.0.0.1", "127.0.0.1")
    assert not listen.same_address("127.0.0.1", "10.0.0.1")


def test_the_box_s_endpoint_is_one_socket_every_decode_worker_accepts_on(tmp_path: Path) -> None:
    """decode_worker.shared_port: the holder binds it once and hands the same socket to each decode-worker that
    asks (one backlog: a connection made while one of them is gone is accepted by another); without a holder, each
    binds it with SO_REUSEPORT beside the others."""
    from daemons.config import parse_config
    from daemons.deployment import Deployment
    from daemons.ops.socket_holder import SocketHolder, sockets_path

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    probes = [bound() for _ in range(4)]
    nums = [s.getsockname()[1] for s in probes]
    for s in probes:
        s.close()
    doc = {"runtime_dir": str(tmp_path / "run"), "log_dir": str(tmp_path / "log"), "model": {"path": str(model)},
           "decode_worker": {"kv_cache_memory_bytes": 1 << 28, "shared_port": nums[0], "instances": {
               "a": {"port": nums[1], "engine_port": 18901, "metrics_port": 18902},
               "b": {"port": nums[2], "engine_port": 18911, "metrics_port": 18912}}},
           "prefill_worker": {"kv_cache_memory_bytes": 1 << 28, "port": nums[3]}}
    (tmp_path / "run").mkdir()
    config = parse_config(doc, tmp_path / "disagg.yaml")
    assert Deployment(config).held_sockets()[SHARED_FRONT_DOOR] == ("127.0.0.1", nums[0])
    holder = SocketHolder(Deployment(config))
    thread = threading.Thread(target=holder.serve, daemon=True)
    thread.start()
    try:
        env = {listen.HOLDER_ENV: str(sockets_path(config))}
        a = listen.inherited_socket(SHARED_FRONT_DOOR, "127.0.0.1", nums[0], env)
        b = listen.inherited_socket(SHARED_FRONT_DOOR, "127.0.0.1", nums[0], env)
        assert a is not None and b is not None
        a.close()  # decode-worker@a is gone: its siblings accept what comes in
        client = socket.create_connection(("127.0.0.1", nums[0]), timeout=5)
        b.settimeout(5)
        conn, _ = b.accept()
        client.sendall(b"one endpoint")
        assert conn.recv(12) == b"one endpoint"
        conn.close(), client.close(), b.close()
    finally:
        holder.stop()
        thread.join(5)
        for sock in holder.sockets.values():
            sock.close()
    # No holder, no systemd: each decode-worker binds the shared port itself, side by side.
    first = listen.bind_listening("127.0.0.1", nums[0], reuse_port=True)
    second = listen.bind_listening("127.0.0.1", nums[0], reuse_port=True)
    first.close(), second.close()
