"""One daemon of a name per runtime directory: a second one, started by hand beside the service, refuses at once.

Each daemon holds an exclusive ``flock`` on ``<runtime_dir>/<daemon>.lock`` for its whole life (the file names the
holder's pid). The kernel drops the lock with its holder, however it ends (``kill -9`` included): no stale lock is
ever left to clean up. A second process of the same name finds the lock held and exits before it reads a state
file, binds a port or looks for an earlier start's processes (which would be the running daemon's engine).
The lock's file descriptor is close-on-exec: a child never holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

# Exit status of a second instance: EX_TEMPFAIL (the other one may be gone by the next try; systemd's
# Restart=on-failure tries again, bounded by its start limit).
EX_ALREADY_RUNNING = 75


class AlreadyRunning(RuntimeError):
    """Another process holds this daemon's lock in this runtime directory."""


def lock_path(runtime_dir: Path, daemon: str) -> Path:
    return Path(runtime_dir) / f"{daemon}.lock"


def hold_instance_lock(runtime_dir: Path, daemon: str) -> int:
    """Take ``daemon``'s lock for the life of this process (the open descriptor: keep it); AlreadyRunning names the
    holder when another process has it."""
    path = lock_path(runtime_dir, daemon)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise AlreadyRunning(f"{daemon} already runs with runtime_dir {Path(runtime_dir)} (pid {holder} holds {path}): "
                             "stop it first (systemctl stop / disaggctl down), or give this one another "
                             "runtime_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
