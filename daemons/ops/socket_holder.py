"""``disaggctl hold-sockets``: the listening sockets of this host's daemons, held across their restarts.

Under supervisord (which passes no socket that survives a program's restart) this small program runs
first (``[program:disagg-sockets]``): it binds every listening port of this host's workers — the front
doors, the prefill APIs and the box's one endpoint (``decode_worker.shared_port``, one socket handed to every
decode-worker) — once, and hands a copy of a socket to each daemon that asks at its start,
over the unix socket ``<runtime_dir>/sockets.sock`` (``SCM_RIGHTS``; only this user can connect). While a
daemon is down, the kernel goes on accepting connections into the socket's backlog, and the next
process of that daemon serves them: a restart refuses nothing. systemd does the same with the
``.socket`` units ``disaggctl install`` writes (:mod:`daemons.runtime.listen`).

A change of a worker's host or port needs a restart of this program too (``supervisorctl restart
disagg-sockets``, or ``disaggctl down`` / ``up``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from daemons.config import Config
from daemons.deployment import Deployment
from daemons.runtime.listen import bind_listening

log = logging.getLogger(__name__)

SOCKETS_FILE = "sockets.sock"


def sockets_path(config: Config) -> Path:
    return config.runtime_dir / SOCKETS_FILE


def bind(host: str, port: int) -> socket.socket:
    return bind_listening(host, port)


class SocketHolder:
    def __init__(self, deployment: Deployment) -> None:
        self.path = sockets_path(deployment.config)
        self.sockets: dict[str, socket.socket] = {}
        try:
            for name, (host, port) in deployment.held_sockets().items():
                self.sockets[name] = bind(host, port)
        except OSError:
            for sock in self.sockets.values():
                sock.close()
            raise
        self._stop = threading.Event()

    def serve(self) -> None:
        """Answer each request (a daemon's name, one line) with that daemon's socket, until stopped."""
        self.path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            old = os.umask(0o177)
            try:
                server.bind(str(self.path))
            finally:
                os.umask(old)
            server.listen(64)
            server.settimeout(0.5)
            log.info("holding %s; handing them out at %s", ", ".join(
                f"{n} {s.getsockname()[0]}:{s.getsockname()[1]}" for n, s in self.sockets.items()), self.path)
            while not self._stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    self._answer(conn)
        self.path.unlink(missing_ok=True)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        try:
            name = conn.recv(256).decode(errors="replace").strip()
            sock = self.sockets.get(name)
            if sock is None:
                conn.sendall(f"no socket for {name!r} (held: {', '.join(self.sockets) or 'none'})".encode())
                return
            socket.send_fds(conn, [b"ok"], [sock.fileno()])
            log.info("handed %s its socket", name)
        except OSError as exc:
            log.warning("a request for a socket failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()


def hold(deployment: Deployment) -> int:
    """Run the holder until SIGTERM/SIGINT; 1 when a port cannot be bound (it is in use)."""
    try:
        holder = SocketHolder(deployment)
    except OSError as exc:
        log.error("cannot bind the daemons' ports: %s", exc)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: holder.stop())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    holder.serve()
    for sock in holder.sockets.values():
        sock.close()
    return 0


if __name__ == "__main__":
    from daemons.config import config_path, load_config

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(hold(Deployment.on_host(load_config(config_path(sys.argv[1] if len(sys.argv) > 1 else None)))))
