"""Listening sockets that outlive the daemon process: the kernel keeps queueing connections while a daemon
restarts, and the next process serves them; none is refused.

Where a daemon's listening socket comes from, first match wins:

1. **systemd socket activation**: the unit has a ``.socket`` (``disaggctl install`` writes one per
   listening daemon); systemd owns the socket and hands it over as fd 3+ (``LISTEN_FDS``,
   ``LISTEN_PID``, ``LISTEN_FDNAMES``: the name is the daemon's).
2. **the socket holder** (supervisord has no socket that survives a program's restart): the program
   ``disagg-sockets`` (:mod:`daemons.ops.socket_holder`) binds the daemons' ports once and hands each
   daemon a copy of its socket over a unix socket (``SCM_RIGHTS``) at every start; ``$DISAGG_SOCKETS``
   names it.
3. neither: the daemon binds the port itself (and connections are refused while it is down).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
HOLDER_ENV = "DISAGG_SOCKETS"
_ACTIVATION_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _activated(name: str, env: dict[str, str]) -> socket.socket | None:
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for i in range(count):
        if names and i < len(names) and names[i] not in (name, "unknown", ""):
            continue
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)  # the engine and LMCache children must not hold it
        return socket.socket(fileno=fd)
    return None


def from_holder(path: Path, name: str, wait_s: float = 10.0) -> socket.socket | None:
    """Ask the socket holder at ``path`` for ``name``'s listening socket (it may still be starting: ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(5.0)
                conn.connect(str(path))
                conn.sendall(name.encode() + b"\n")
                msg, fds, _flags, _addr = socket.recv_fds(conn, 1024, 1)
        except OSError as exc:
            if time.monotonic() > deadline:
                log.warning("the socket holder at %s did not answer (%s): binding the port here", path, exc)
                return None
            time.sleep(0.2)
            continue
        if not fds:
            log.warning("the socket holder has no socket for %s (%s): binding the port here", name,
                        msg.decode(errors="replace").strip())
            return None
        return socket.socket(fileno=fds[0])


def inherited_socket(name: str, host: str, port: int, env: dict[str, str] | None = None) -> socket.socket | None:
    """``name``'s listening socket from systemd or the socket holder; None: bind it yourself.

    The socket must be bound where the config says (else it is not used, and the log says why); the
    activation variables are removed from the environment so that no child sees them."""
    env = dict(os.environ) if env is None else env
    sock = _activated(name, env)
    how = "systemd socket activation"
    if sock is None and env.get(HOLDER_ENV):
        sock, how = from_holder(Path(env[HOLDER_ENV]), name), f"the socket holder ({env[HOLDER_ENV]})"
    for key in _ACTIVATION_ENV:
        os.environ.pop(key, None)
    if sock is None:
        return None
    bound = sock.getsockname()[:2]
    if bound[1] != port or not same_address(str(bound[0]), host, sock.family):
        # Exactly where the config says, a wildcard included: a socket on every interface for a config that keeps
        # the front door on loopback (and so needs no API keys) would make it public.
        log.error("%s handed %s a socket bound to %s:%d, not %s:%d as the config says: not used (the daemon binds "
                  "the config's address itself, or fails if the socket's owner holds the port)", how, name,
                  bound[0], bound[1], host, port)
        sock.close()
        return None
    log.info("%s: listening socket %s:%d from %s (connections wait in its backlog across restarts)", name,
             bound[0], bound[1], how)
    return sock


BACKLOG = 1024


def bind_listening(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket at ``host``:``port``; ``reuse_port``: several processes may bind the same port (each
    decode-worker binding the box's shared port itself, with neither systemd nor the socket holder to share one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


WILDCARDS = ("0.0.0.0", "::", "")


def loopback_if_wildcard(host: str) -> str:
    """The address a process on this machine connects to for a server bound to ``host``."""
    return "127.0.0.1" if host in WILDCARDS else host


def url_host(host: str) -> str:
    """``host`` as a URL's authority wants it (an IPv6 literal in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def same_address(bound: str, host: str, family: int = socket.AF_INET) -> bool:
    """Is a socket bound to ``bound`` listening where ``host`` says? A wildcard only for a wildcard host (IPv4's and
    IPv6's stand for each other); a name by what it resolves to in the socket's family."""
    if bound in WILDCARDS or host in WILDCARDS:
        return bound in WILDCARDS and host in WILDCARDS
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)}
    except OSError:
        return False
    return bound in resolved

