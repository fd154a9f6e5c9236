"""A supervised child process (a vLLM engine or LMCache's server) and its whole tree.

The child's output goes through its keeper to a log file rotated by size (and, under
systemd, to the journal: :class:`daemons.config_sections.LogsConfig`); when it dies, the last
lines of that file explain why. A full disk never stops a child from starting.
It runs under :mod:`daemons.children.keeper`, which dies with the
daemon (even a ``kill -9`` of it), is the subreaper of everything the child
starts, and kills that whole tree when the child exits, so no vLLM EngineCore
outlives its API server or its daemon. Everything stays in the daemon's
process group and cgroup, so supervisord's ``killasgroup`` and systemd's
``KillMode=mixed`` SIGKILL reach it too at the end of a stop; the stop's SIGTERM goes to the daemon alone,
which drains with its child still serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from daemons.children import keeper, strays
from daemons.children.keeper import below as descendants
from daemons.config_sections import LogsConfig

log = logging.getLogger(__name__)

__all__ = ["ChildExited", "ChildProcess", "PortHeld", "child_env", "descendants", "kill_all"]

# What only the daemon may hold: systemd's notify/watchdog/socket handles and the API keys (a child's environment
# is readable in /proc by its user and lands in its core dumps).
DAEMON_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                   "DISAGG_SOCKETS", "DISAGG_API_KEYS", "CREDENTIALS_DIRECTORY")
# Access lines of successful health checks and scrapes (uvicorn's format): one per heartbeat, per scrape.
ROUTINE_ACCESS = r'"GET /(healthcheck|health|metrics|ping|status)[^"]*" 200'


def child_env(base: dict[str, str] | None = None, logs: LogsConfig | None = None) -> dict[str, str]:
    """A child's environment: ``base`` (default ours) without what only the daemon may hold."""
    env = dict(os.environ if base is None else base)
    for key in DAEMON_ONLY_ENV:
        env.pop(key, None)
    env["LMCACHE_LOG_LEVEL"] = (logs or LogsConfig()).lmcache_level.upper()
    return env


def journal_wanted(logs: LogsConfig) -> bool:
    if logs.children == "auto":
        return bool(os.environ.get("JOURNAL_STREAM")) and os.path.exists(keeper.JOURNAL_SOCKET)
    return logs.children == "journal"


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# The most of a child's new output one look for fatal lines reads (a burst larger than this is read from its end).
SCAN_LIMIT = 1 << 20


class ChildExited(RuntimeError):
    """The child process exited while we waited for it."""


class PortHeld(RuntimeError):
    """The child's port is held by a process that is not the child's (a stranger): it would not bind."""


class ChildProcess:
    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None,
                 tag: str | None = None, port: int | None = None, logs: LogsConfig | None = None,
                 fatal_lines: Sequence[str] = ()) -> None:
        self.name = name
        # Text in the child's output after which this start never becomes healthy, even if its process lingers:
        # a vLLM engine whose core failed to start can hang on its way out (seen: its worker caught SystemExit in
        # a zmq destructor and never exited), and waiting for its health would take engine_startup_timeout_s.
        self.fatal_lines = tuple(fatal_lines)
        self._scan_from = 0  # where this start's output not yet scanned for fatal_lines begins in log_path
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = env
        self.logs = logs or LogsConfig()
        # Every process of the child's tree carries the tag (strays.TAG_ENV): what an earlier start left
        # behind is found by it and killed before this one starts. The port is where the child listens:
        # held by a process without the tag, the child is not started (PortHeld names the holder).
        self.tag = tag or f"{name}@{self.log_path.resolve()}"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None  # the keeper
        self.started_at = 0.0
        self._main_pid: int | None = None

    def reap_strays(self) -> list[str]:
        """Kill every live process of an earlier start of this child (outside today's tree); what was killed."""
        mine = set(self.tree())
        left = strays.tagged(self.tag, exclude=mine)
        if not left:
            return []
        found = [strays.describe(pid) for pid in left]
        log.warning("%s: killing %d process(es) left by an earlier start: %s", self.name, len(left), "; ".join(found))
        strays.kill(left)
        return found

    def tree(self) -> list[int]:
        """The keeper and every live process below it (empty when not running)."""
        if not self.alive():
            return []
        assert self.proc is not None
        return [self.proc.pid, *descendants(self.proc.pid)]

    def port_stranger(self) -> str | None:
        """Who holds the child's port if not the child itself ("pid N (cmd)"), else None."""
        if self.port is None:
            return None
        holder = strays.port_holder(self.port)
        if holder is None or holder in self.tree():
            return None
        if holder == -1:
            return "a process this user cannot see"
        return strays.describe(holder)

    def start(self) -> None:
        """Start the child under its keeper, after killing what an earlier start left; PortHeld when its port is
        held by a stranger (nothing is started then)."""
        self.reap_strays()
        stranger = self.port_stranger()
        if stranger is not None:
            raise PortHeld(f"{self.name}: port {self.port} is held by {stranger}, not by a process of this daemon; "
                           "stop it (or give this daemon another port)")
        env = child_env(self.env, self.logs)
        env[strays.TAG_ENV] = self.tag
        try:
            self._scan_from = self.log_path.stat().st_size
        except OSError:
            self._scan_from = 0
        # -S: the keeper needs only the standard library; it runs by path, needing no install. It writes the
        # child's output itself (rotated; a full disk loses lines, never the start).
        self.proc = subprocess.Popen(
            [sys.executable, "-S", keeper.__file__, *self.keeper_options(), "--", *self.argv],
            stdin=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self.started_at = time.monotonic()
        self._main_pid = None
        where = f"{self.log_path} and the journal ({self.log_id})" if journal_wanted(self.logs) else str(self.log_path)
        log.info("%s started (keeper pid %d), output in %s", self.name, self.proc.pid, where)

    @property
    def log_id(self) -> str:
        """The child's name in the journal (SYSLOG_IDENTIFIER): its log file's name."""
        return self.log_path.name.removesuffix(".log")

    def keeper_options(self) -> list[str]:
        opts = ["--log", str(self.log_path), "--max-bytes", str(self.logs.max_bytes),
                "--backups", str(self.logs.backups), "--header", "starting"]
        if journal_wanted(self.logs):
            opts += ["--journal", self.log_id]
        if not self.logs.access_log:
            opts += ["--drop", ROUTINE_ACCESS]
        return opts

    @property
    def pid(self) -> int | None:
        """The keeper's pid: alive exactly as long as the child is."""
        return self.proc.pid if self.proc else None

    @property
    def main_pid(self) -> int | None:
        """The child's own pid (the keeper's child), once it runs."""
        if self._main_pid is None and self.alive():
            assert self.proc is not None
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as fh:
                    pids = fh.read().split()
            except OSError:
                pids = []
            self._main_pid = int(pids[0]) if pids else None
        return self._main_pid

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        """The last lines this start of the child wrote (never an earlier start's): the end of its log file,
        and of the rotated one before it when the file was just rotated, after this start's header."""
        text = b""
        for path in (self.log_path, Path(f"{self.log_path}.1")):
            try:
                with path.open("rb") as fh:
                    fh.seek(0, os.SEEK_END)
                    fh.seek(max(0, fh.tell() - 16384))
                    text = fh.read() + text
            except OSError:
                continue
            if len(text) >= 16384:
                break
        if self.proc is None:
            return ""
        ours = f"(keeper {self.proc.pid}):".encode()
        mine = text.rfind(ours)
        if mine >= 0:
            text = text[text.find(b"\n", mine) + 1:]
        elif b"(keeper " in text:  # an earlier start's header and none of ours yet: nothing is this start's
            text = b""
        return "\n".join(text.decode(errors="replace").strip().splitlines()[-lines:])

    def fatal_line(self) -> str | None:
        """The first line of ``fatal_lines`` this start wrote since the last look, if any (reads only the new
        output, at most :data:`SCAN_LIMIT` bytes of it; a log rotated meanwhile is read from its start)."""
        if not self.fatal_lines:
            return None
        try:
            with self.log_path.open("rb") as fh:
                end = fh.seek(0, os.SEEK_END)
                if end < self._scan_from:  # rotated: the new file is all this start's
                    self._scan_from = 0
                fh.seek(max(self._scan_from, end - SCAN_LIMIT))
                chunk = fh.read()
        except OSError:
            return None
        whole = chunk.rfind(b"\n") + 1  # a line still being written is read whole next time
        self._scan_from = max(self._scan_from, end - SCAN_LIMIT) + whole
        for line in chunk[:whole].decode(errors="replace").splitlines():
            if any(marker in line for marker in self.fatal_lines):
                return line.strip()
        return None

    def exit_reason(self) -> str:
        code = self.returncode()
        if code is None:
            how = "is running" if self.proc else "was never started"
        elif code >= 0:
            how = f"exited with status {code}"
        else:
            how = f"killed by signal {-code}"
        last = [line for line in self.tail(40).splitlines() if "Error" in line or "error" in line]
        hint = f": {last[-1].strip()[:300]}" if last else ""
        return f"{self.name} {how}{hint} (see {self.log_path})"

    async def wait_healthy(
        self,
        probe: Callable[[], Awaitable[bool]],
        timeout_s: float,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_tick: Callable[[float], None] | None = None,
    ) -> bool:
        """Poll ``probe`` until it says yes; False if stopped; raises on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise ChildExited(self.exit_reason())
            fatal = self.fatal_line()
            if fatal is not None:
                raise ChildExited(f"{self.name} failed to start and did not exit: {fatal[:300]} (see {self.log_path})")
            if should_stop():
                return False
            if await probe():
                log.info("%s healthy after %.1fs", self.name, time.monotonic() - self.started_at)
                return True
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not healthy after {timeout_s:.0f}s (see {self.log_path})")
            if on_tick:
                on_tick(time.monotonic() - self.started_at)
            await asyncio.sleep(1.0)

    async def astart(self) -> None:
        """:meth:`start` off the event loop: finding an earlier start's processes reads every process's environment
        and the port's holder every process's file descriptors (a front door serving failover must not wait).
        Cancelled meanwhile (the daemon stops), it waits for the thread's start and stops what it started: no child
        is left running after the daemon's stop."""
        started = asyncio.ensure_future(asyncio.to_thread(self.start))
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await started
            await self.stop(5.0)
            raise

    async def port_stranger_now(self) -> str | None:
        """:meth:`port_stranger` off the event loop."""
        return await asyncio.to_thread(self.port_stranger)

    async def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; then SIGKILL whatever it left below it.

        vLLM's EngineCore and workers are the engine's children: a stopped or killed
        API server would leave them holding memory (and GPUs) without this. What outlived an
        earlier death of the keeper is found by its tag and killed too. Every walk of /proc and every wait runs off
        the event loop."""
        if not self.alive():
            if self.proc is not None:
                await asyncio.to_thread(self.reap_strays)
            return
        assert self.proc is not None
        below = await asyncio.to_thread(descendants, self.proc.pid)
        log.info("stopping %s (pid %d)", self.name, self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs
        deadline = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.proc.poll() is None:
            log.warning("%s did not exit in %.0fs; killing it", self.name, grace_s)
            below = sorted(set(below) | set(await asyncio.to_thread(descendants, self.proc.pid)))
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        left = [pid for pid in below if strays.alive(pid)]
        if left:
            log.warning("%s left %d process(es) behind (%s): killing them", self.name, len(left),
                        " ".join(map(str, left)))
            kill_all(left)
            deadline = time.monotonic() + 5.0  # SIGKILL lands asynchronously; an exit means they are gone
            while any(strays.alive(pid) for pid in left) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        await asyncio.to_thread(self.reap_strays)
        log.info("%s exited (%s)", self.name, self.proc.returncode)

