"""Processes of a child that outlived it, and strangers on a child's port.

Every process a child starts carries the child's *tag* in its environment (``DISAGG_CHILD``, inherited
by vLLM's EngineCore and workers too), so whatever is left of an earlier incarnation — after a
``kill -9`` of its keeper, say, or of the daemon before the keeper could act — is found by its tag,
wherever it was re-parented, and killed before the child starts again. A process that listens on the
child's port without the tag is a stranger: the daemon names it (pid and command) instead of starting
an engine that cannot bind, and never takes it for its own engine.

Linux only: it reads ``/proc``. Processes of other users cannot be read and are never touched.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)

TAG_ENV = "DISAGG_CHILD"
_LISTEN = "0A"


def _net_namespace(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def tagged(tag: str, *, exclude: set[int] | None = None) -> list[int]:
    """Live processes of this network namespace whose environment carries ``DISAGG_CHILD=tag``.

    Only this network namespace: hosts simulated on one machine (one namespace each, the same paths
    bind-mounted) see each other's processes in /proc, and must never take them for their own."""
    needle = f"{TAG_ENV}={tag}".encode()
    exclude = exclude or set()
    here = _net_namespace("self")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        if _net_namespace(entry) != here:
            continue
        if needle in env.split(b"\0") and alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def describe(pid: int) -> str:
    """``pid 123 (python -m vllm.entrypoints...)``: what an operator needs to find the process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"pid {pid} ({cmd[:160]})"


def kill(pids: list[int], timeout_s: float = 5.0) -> None:
    """SIGKILL ``pids`` and wait (bounded) until they are gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def port_holder(port: int) -> int | None:
    """The pid of a process listening on TCP ``port`` (any address), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == _LISTEN and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    return int(entry)
            except OSError:
                continue
    return -1  # listening, but its owner cannot be read (another user's process)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
