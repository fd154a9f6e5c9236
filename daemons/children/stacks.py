"""A stuck Python child's threads' stacks, for the log, before the child is killed.

The child must have :mod:`faulthandler` registered on SIGUSR1 (LMCache's server does:
:mod:`daemons.children.lmcache_main`): its signal handler writes every thread's stack to the child's stderr
without taking the GIL, so it answers even while a thread holds the GIL in a C call. ``py-spy dump`` adds the
native frames where py-spy is installed. A stopped (SIGSTOP) process runs no handler: that is said instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

# faulthandler's lines: "Thread 0x... (most recent call first):", "Current thread 0x...", '  File "...", line N in f'.
_DUMP_LINE = ("Thread 0x", "Current thread 0x", '  File "', "Stack (most recent call first)")


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (R, S, D, T, Z...); "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            if _size(path) < offset:  # rotated meanwhile: the dump is at the start of the new file
                offset = 0
            fh.seek(offset)
            return fh.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""


async def thread_stacks(pid: int, log_path: Path, *, wait_s: float = 1.0, py_spy_timeout_s: float = 20.0) -> str:
    """Every thread's stack of the process ``pid`` whose stderr goes to ``log_path`` (faulthandler on SIGUSR1), and
    ``py-spy dump --native`` of it where py-spy is on PATH; a sentence when there is none to take."""
    state = process_state(pid)
    if not state:
        return f"pid {pid} is gone: no stack to take"
    if state in ("T", "t"):
        return f"pid {pid} is stopped (SIGSTOP or a debugger): no stack to take"
    offset = _size(log_path)
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return f"pid {pid} is gone: no stack to take"
    await asyncio.sleep(wait_s)
    lines = [line for line in _read_from(log_path, offset).splitlines() if line.startswith(_DUMP_LINE)]
    out = "\n".join(lines) if lines else f"(no faulthandler dump in {log_path} within {wait_s:.0f}s)"
    spy = shutil.which("py-spy")
    if spy is not None:
        out += "\n" + await _py_spy(spy, pid, py_spy_timeout_s)
    return out


async def _py_spy(spy: str, pid: int, timeout_s: float) -> str:
    proc = await asyncio.create_subprocess_exec(spy, "dump", "--native", "--pid", str(pid),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        return f"py-spy dump: no answer within {timeout_s:.0f}s"
    finally:
        if proc.returncode is None:  # timed out or cancelled: never leave py-spy attached to the process
            proc.kill()
            await proc.wait()
    return "py-spy dump --native:\n" + out.decode(errors="replace").strip()
