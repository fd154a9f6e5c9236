"""``python -m daemons.children.keeper CMD...``: run CMD so that its whole process tree
dies with it and with the daemon that started it.

A vLLM engine is a process tree (API server -> EngineCore -> workers). A
parent-death signal reaches only a direct child, and when the API server dies
its EngineCore is re-parented to init and keeps the memory (and the GPU). The
keeper sits between the daemon and CMD:

- it is a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): whatever CMD leaves
  behind is re-parented to the keeper, not to init, so it can be found;
- when CMD exits, the keeper SIGKILLs everything still below it and exits with
  CMD's status (dying by the same signal when CMD died by one);
- its parent-death signal is SIGTERM: when the daemon dies, even by
  ``kill -9``, the keeper SIGKILLs the whole tree at once (the restarted daemon
  needs the ports and the memory);
- SIGTERM, SIGINT and SIGCONT from the daemon are passed on to CMD, which shuts
  down as it would without the keeper; SIGHUP (the daemon's reload) is ignored by
  the keeper and by CMD's whole tree;
- CMD's own parent-death signal is SIGKILL: a ``kill -9`` of the keeper itself
  takes CMD with it (what CMD started is then found by the tag in its
  environment: :mod:`daemons.children.strays`).

It imports nothing beyond the standard library and costs one small process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have this process receive ``sig`` when its parent dies (a one-process child needs no keeper)."""
    try:
        _prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def below(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree() -> None:
    """SIGKILL everything below the keeper until nothing is left (orphans keep arriving here)."""
    me = os.getpid()
    for _ in range(50):
        pids = below(me)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap()
        time.sleep(0.02)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: python -m daemons.children.keeper CMD [ARG...]\n")
        return 2
    parent = os.getppid()
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    procs: list[subprocess.Popen[bytes]] = []

    def on_signal(sig: int, _frame: object) -> None:
        if os.getppid() != parent or (not procs and sig != signal.SIGCONT):
            # The daemon is gone (nobody will wait for a graceful stop), or CMD is not started yet.
            sys.stderr.write(f"keeper: parent {parent} died or stop before start: killing everything below\n")
            kill_tree()
            os._exit(1)
        for proc in procs:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCONT):
        signal.signal(sig, on_signal)
    # SIGHUP asks the daemon to re-read its config; it never stops a child. `systemctl kill -s HUP` and a
    # process-group signal reach the keeper and the child too: both ignore it (an ignored signal stays
    # ignored across exec, so vLLM's processes and LMCache's server inherit that).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.getppid() != parent:  # the daemon died before the death signal was armed
        return 1
    # CMD dies with the keeper too (SIGKILL), even when the keeper is killed with -9 and cannot act:
    # an engine API server that outlived it kept the port and the GPU, and the restarted daemon took
    # that stranger for its own engine. What CMD starts is re-parented here, or found by its tag.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=lambda: _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL))
    procs.append(proc)
    code = proc.wait()
    left = below(os.getpid())
    if left:
        sys.stderr.write(f"keeper: pid {proc.pid} exited ({code}) leaving {len(left)} process(es): killing them\n")
    kill_tree()
    if code < 0:
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP keep their default action anyway
        os.kill(os.getpid(), -code)
        time.sleep(1)  # the signal is delivered on return to user space; SIGSTOP-like ones never end us
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
