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
  environment: :mod:`daemons.children.strays`);
- CMD's output (stdout and stderr) goes through the keeper (:class:`Output`): to a
  log file rotated by size (``--log``, ``--max-bytes``, ``--backups``) and, under
  systemd, also to the journal as a stream of its own (``--journal IDENTIFIER``);
  lines matching ``--drop`` (a regex: health-check access lines) are left out. A
  write that fails (a full disk) drops that output and never blocks CMD: logging
  degrades, serving does not.

Usage: ``keeper.py [--log PATH] [--max-bytes N] [--backups K] [--journal ID] [--drop RE]... -- CMD [ARG...]``
(without ``--``, everything is CMD and its output is the keeper's own).

It imports nothing beyond the standard library and costs one small process.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_F_SETPIPE_SZ = 1031


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


JOURNAL_SOCKET = "/run/systemd/journal/stdout"


def journal_stream(identifier: str, path: str = JOURNAL_SOCKET) -> socket.socket | None:
    """A stream into systemd's journal under ``identifier`` (what ``systemd-cat -t`` opens); None if absent."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.shutdown(socket.SHUT_RD)
        # identifier, unit id, priority (6 info), level prefix, forward to syslog, kmsg, console
        sock.sendall(f"{identifier}\n\n6\n0\n0\n0\n0\n".encode())
        return sock
    except OSError:
        return None


class Output:
    """Where CMD's output goes: a size-rotated file and/or the journal; never blocks, never raises."""

    def __init__(self, path: str | None, *, max_bytes: int = 100 << 20, backups: int = 5,
                 journal: socket.socket | None = None, drop: list[str] | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.journal = journal
        self.drop = re.compile("|".join(f"(?:{d})" for d in drop).encode()) if drop else None
        self.dropped = 0  # bytes lost to failed writes since the last that worked
        self.failure = ""
        self.fh: object = None
        self.lock = threading.Lock()  # the pump thread and the keeper's own notes both write
        self._open()

    def _open(self) -> None:
        if self.path is None:
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.fh = open(self.path, "ab", buffering=0)
        except OSError as exc:
            self.fh, self.failure = None, str(exc)

    def _rotate(self) -> None:
        assert self.path is not None
        try:
            if self.fh is not None:
                self.fh.close()  # type: ignore[attr-defined]
            if self.backups > 0:
                for i in range(self.backups - 1, 0, -1):
                    if os.path.exists(f"{self.path}.{i}"):
                        os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
                os.replace(self.path, f"{self.path}.1")
            else:
                os.truncate(self.path, 0)
        except OSError:
            pass
        self._open()

    def write(self, data: bytes, *, filtered: bool = True) -> None:
        with self.lock:
            self._write(data, filtered)

    def _write(self, data: bytes, filtered: bool) -> None:
        if self.drop is not None and filtered:
            data = b"".join(line for line in data.splitlines(keepends=True) if not self.drop.search(line))
            if not data:
                return
        if self.journal is not None:
            try:
                self.journal.sendall(data)
            except OSError:
                self.journal = None  # journald restarted: the file (if any) goes on
        if self.path is None:
            return
        if self.fh is None:
            self._open()  # the disk may have room again, the directory may be back
        if self.fh is None:
            self.dropped += len(data)
            return
        try:
            if self.dropped:
                self.fh.write(f"keeper: {self.dropped} bytes of output lost ({self.failure})\n".encode())  # type: ignore[attr-defined]
                self.dropped = 0
            self.fh.write(data)  # type: ignore[attr-defined]
            if self.fh.tell() >= self.max_bytes:  # type: ignore[attr-defined]
                self._rotate()
        except OSError as exc:
            self.dropped += len(data)
            self.failure = exc.strerror or str(exc)

    def pump(self, fd: int) -> None:
        """Copy everything from ``fd`` until it closes (CMD and all its tree have exited or closed it)."""
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                if pending:
                    self.write(pending)
                return
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:  # whole lines only (the drop filter and the journal are per line)
                self.write(pending[:cut])
                pending = pending[cut:]
            elif len(pending) > 65536:
                self.write(pending)
                pending = b""


def parse_args(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``[--opt VALUE]... -- CMD...`` -> options, CMD; without ``--`` everything is CMD."""
    if "--" not in argv:
        return {}, argv
    cut = argv.index("--")
    opts: dict[str, list[str]] = {}
    words = argv[:cut]
    for i in range(0, len(words) - 1, 2):
        opts.setdefault(words[i].lstrip("-"), []).append(words[i + 1])
    return opts, argv[cut + 1:]


def main(argv: list[str]) -> int:
    opts, argv = parse_args(argv)
    if not argv:
        sys.stderr.write("usage: python -m daemons.children.keeper [--log PATH ...] -- CMD [ARG...]\n")
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
    output = None
    if "log" in opts or "journal" in opts:
        where = opts.get("journal-socket", [JOURNAL_SOCKET])[0]
        journal = journal_stream(opts["journal"][0], where) if "journal" in opts else None
        output = Output(opts["log"][0] if "log" in opts else None, journal=journal,
                        max_bytes=int(opts.get("max-bytes", [str(100 << 20)])[0]),
                        backups=int(opts.get("backups", ["5"])[0]), drop=opts.get("drop"))
        header = opts.get("header", [""])[0]
        if header:
            command = " ".join(argv).replace("\n", "\\n")  # one line: the header is how a start is found
            output.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {header} (keeper {os.getpid()}): "
                         f"{command}\n".encode(), filtered=False)
    read_end, write_end = os.pipe() if output is not None else (-1, -1)
    pump = None
    if output is not None:
        try:  # room for a burst of output while the pump is descheduled (CMD never waits on logging)
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        pump = threading.Thread(target=output.pump, args=(read_end,), daemon=True)
        pump.start()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=write_end if output is not None else None,
                            stderr=subprocess.STDOUT if output is not None else None,
                            preexec_fn=lambda: _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL))
    procs.append(proc)
    if output is not None:
        os.close(write_end)
        sys.stderr = _Notes(output)  # the keeper's own notes go where CMD's output goes  # type: ignore[assignment]
    code = proc.wait()
    left = below(os.getpid())
    if left:
        sys.stderr.write(f"keeper: pid {proc.pid} exited ({code}) leaving {len(left)} process(es): killing them\n")
    kill_tree()
    if pump is not None:
        pump.join(2.0)  # the last lines CMD wrote (the reason it exited) before the keeper exits
    if code < 0:
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP keep their default action anyway
        os.kill(os.getpid(), -code)
        time.sleep(1)  # the signal is delivered on return to user space; SIGSTOP-like ones never end us
    return code if code >= 0 else 128 - code


class _Notes:
    """The keeper's own stderr once CMD's output goes through :class:`Output`."""

    def __init__(self, output: Output) -> None:
        self.output = output

    def write(self, text: str) -> int:
        self.output.write(text.encode())
        return len(text)

    def flush(self) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
