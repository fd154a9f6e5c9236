"""Ask LMCache how much of a prompt it holds: LMCache's own lookup, in a child process.

prefill-worker answers a prefill call only once the prompt's full chunks are in
LMCache (on GPUs the engine's store lands just *after* it answers; a decode
engine that looked too early recomputed the whole prompt). The question "how
many leading tokens of these token ids does the server hold?" is LMCache's
LOOKUP, asked with LMCache's own client (the scheduler adapter the vLLM
connector uses), which hashes nothing itself: the server resolves token ids to
its keys. A lookup takes read locks on the matched chunks; they are released at
once (``free_lookup_locks``, ``end_session``).

LMCache's client imports torch, which the daemons never do, so it runs in a
child process (``python -m daemons.kv.kv_lookup``) that speaks JSON lines on
stdin/stdout:

  -> {"id": 7, "tokens": [1, 2, ...]}
  <- {"id": 7, "hit": 512, "healthy": true}

:class:`KVLookup` is the daemon's side: it owns the child, matches answers to
questions, and restarts the child if it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

from daemons.children.child import child_env
from daemons.config_sections import LogsConfig

log = logging.getLogger(__name__)

# The child's first line says it is up; LMCache's import (torch) takes seconds.
STARTUP_TIMEOUT_S = 120.0
# Lines are token id lists: a 128k-token prompt is ~1 MB of JSON.
LINE_LIMIT = 16 * 1024 * 1024


class KVLookup:
    """The daemon's handle on the lookup child. Every call has a deadline."""

    def __init__(self, *, server_url: str, model: str, mq_timeout_s: float, heartbeat_interval_s: float,
                 log_path: Path, logs: LogsConfig | None = None, world_size: int = 1) -> None:
        self.argv = [
            # -P: the package this daemon runs (its release), never one in the working directory.
            sys.executable, "-P", "-m", "daemons.kv.kv_lookup", "--server-url", server_url, "--model", model,
            "--mq-timeout", str(mq_timeout_s), "--heartbeat-interval", str(heartbeat_interval_s),
            "--world-size", str(world_size),  # LMCache keys KV by the engine's world size: the engine's TP size
        ]
        self.log_path = Path(log_path)
        self.logs = logs or LogsConfig()
        self.proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, object]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._starting: asyncio.Lock | None = None
        self._start_task: asyncio.Task[None] | None = None
        self.healthy = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def _open_log(self) -> int:
        """The client's stderr (warnings only, at LMCache's default level here): its file, rotated once past
        ``logs.max_bytes`` at a start; /dev/null when it cannot be opened (a full or read-only disk)."""
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if self.log_path.exists() and self.log_path.stat().st_size > self.logs.max_bytes:
                os.replace(self.log_path, f"{self.log_path}.1")
            return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as exc:
            log.warning("LMCache lookup client: no log file (%s); its stderr is dropped", exc)
            return subprocess.DEVNULL

    async def start(self) -> None:
        """Start the child and wait for its first line; raises RuntimeError if it cannot start."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.alive:
                return
            env = child_env(dict(os.environ, CUDA_VISIBLE_DEVICES="", LMCACHE_DISABLE_BANNER="1"), self.logs)
            err = self._open_log()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                    env=env, limit=LINE_LIMIT, preexec_fn=_die_with_parent,
                )
            finally:
                if err is not subprocess.DEVNULL:
                    os.close(err)
            assert self.proc.stdout is not None
            try:
                first = await asyncio.wait_for(self.proc.stdout.readline(), STARTUP_TIMEOUT_S)
            except TimeoutError:
                await self._end_process()
                raise RuntimeError(f"LMCache lookup client silent for {STARTUP_TIMEOUT_S:.0f}s "
                                   f"(see {self.log_path})") from None
            if not first:
                await self._end_process()
                raise RuntimeError(f"LMCache lookup client exited at start (see {self.log_path})")
            log.info("LMCache lookup client up (pid %d)", self.proc.pid)
            self._reader = asyncio.create_task(self._read_answers(), name="kv-lookup-reader")

    async def _read_answers(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    answer = json.loads(line)
                except ValueError:
                    log.warning("LMCache lookup client wrote a line that is not JSON: %r", line[:200])
                    continue
                fut = self._waiting.pop(int(answer.get("id", -1)), None)
                if fut is not None and not fut.done():
                    fut.set_result(answer)
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(RuntimeError("LMCache lookup client exited"))
            self._waiting.clear()
            self.healthy = False

    def ensure_started(self) -> None:
        """Start the child in the background if it is not running (no caller waits for it)."""
        if self.alive or (self._start_task is not None and not self._start_task.done()):
            return
        log.warning("LMCache lookup client is not running: starting it")
        self._start_task = asyncio.create_task(self._start_logged(), name="kv-lookup-start")

    async def _start_logged(self) -> None:
        try:
            await self.start()
        except RuntimeError as exc:
            log.error("%s", exc)

    async def hit_tokens(self, tokens: list[int], timeout_s: float) -> int:
        """Leading tokens of ``tokens`` that LMCache holds (whole chunks); raises on failure or timeout."""
        if not self.alive:
            self.ensure_started()
            raise RuntimeError("LMCache lookup client is not running (starting it)")
        assert self.proc is not None and self.proc.stdin is not None
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            self.proc.stdin.write(json.dumps({"id": rid, "tokens": tokens}, separators=(",", ":")).encode() + b"\n")
            await self.proc.stdin.drain()
            answer = await asyncio.wait_for(fut, timeout_s)
        except (ConnectionError, BrokenPipeError) as exc:
            raise RuntimeError(f"LMCache lookup client gone: {exc!r}") from None
        finally:
            self._waiting.pop(rid, None)
        if "error" in answer:
            raise RuntimeError(f"LMCache lookup failed: {answer['error']}")
        self.healthy = bool(answer.get("healthy", True))
        return int(answer["hit"])  # type: ignore[call-overload]

    async def wait_stored(self, tokens: list[int], want: int, timeout_s: float) -> int:
        """Poll until LMCache holds ``want`` leading tokens or ``timeout_s`` passes; the last hit count."""
        deadline = time.monotonic() + timeout_s
        pause = 0.002
        hit = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return hit
            hit = await self.hit_tokens(tokens, left)
            if hit >= want or not self.healthy:
                return hit
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.05)

    async def stop(self) -> None:
        if self._start_task is not None and self._start_task is not asyncio.current_task():
            self._start_task.cancel()
            await asyncio.gather(self._start_task, return_exceptions=True)
        await self._end_process()

    async def _end_process(self) -> None:
        """End the child (SIGTERM, then SIGKILL after 5 s) and its answer reader."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


def _die_with_parent() -> None:
    from daemons.children.keeper import die_with_parent

    die_with_parent()


# -- the child ---------------------------------------------------------------------------
def _serve(out: typing.TextIO, server_url: str, model: str, mq_timeout: float, heartbeat_interval: float,
           world_size: int = 1) -> int:
    import threading

    import zmq
    from lmcache.integration.vllm.vllm_multi_process_adapter import LMCacheMPSchedulerAdapter

    # A zmq context per connection, ended with it. With one context shared by every reconnect, the client never
    # reached a restarted server again (tests/e2e/test_lmcache_probe.py; likely cause: LMCache's client monitors
    # each socket on an inproc address of the context named after the socket's fd, which a new socket reuses).
    contexts: dict[int, zmq.Context[typing.Any]] = {}

    def connect() -> typing.Any:
        context: zmq.Context[typing.Any] = zmq.Context()
        context.setsockopt(zmq.LINGER, 0)  # nothing a closed connection still queues is worth waiting for
        # Legacy positional form, accepted by LMCache 0.5.3 and 0.5.6 alike:
        # (urls, context, model, kv world size, kv worker id, vLLM block size).
        try:
            adapter = LMCacheMPSchedulerAdapter(
                [server_url], context, model, world_size, 0, 16, mq_timeout=mq_timeout,
                heartbeat_interval=heartbeat_interval,
            )
        except BaseException:
            end_context(context)
            raise
        contexts[id(adapter)] = context
        return adapter

    def end_context(context: zmq.Context[typing.Any]) -> None:
        # term() returns once the connection's sockets are closed (its heartbeat thread closes its own last): in
        # a thread of its own, so that no question waits on it, and the context's I/O thread ends with it.
        threading.Thread(target=context.term, name="zmq-context-term", daemon=True).start()

    def disconnect(adapter: typing.Any) -> None:
        try:
            adapter.shutdown()
        except Exception:  # noqa: BLE001 - a broken client is replaced either way
            pass
        context = contexts.pop(id(adapter), None)
        if context is not None:
            end_context(context)

    # Connected at the first question, not before: a server that is down (or stopped) now answers each question
    # with an error instead of ending the client (LMCache's adapter raises ConnectionError when the server does
    # not answer its first request within mq_timeout).
    adapter: typing.Any = None
    rebuilt_at = -heartbeat_interval
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for n, line in enumerate(sys.stdin):
        try:
            ask = json.loads(line)
            rid, tokens = int(ask["id"]), [int(t) for t in ask["tokens"]]
        except (ValueError, KeyError, TypeError) as exc:
            out.write(json.dumps({"id": -1, "error": f"bad question: {exc!r}"}) + "\n")
            out.flush()
            continue
        # LMCache 0.5.3's scheduler adapter never starts its heartbeat, so once a
        # lookup times out (server restarted) it stays "unhealthy" for good and
        # answers 0 without asking. A fresh adapter asks again.
        if (adapter is None or not adapter.is_healthy) and time.monotonic() - rebuilt_at >= heartbeat_interval:
            if adapter is not None:
                logging.warning("LMCache client unhealthy: connecting again")
                disconnect(adapter)
            rebuilt_at = time.monotonic()
            try:
                adapter = connect()
            except Exception as exc:  # noqa: BLE001 - the answer carries it; the next question connects again
                adapter = None
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                out.write(json.dumps({"id": rid, "error": f"cannot reach LMCache: {first}"[:500]}) + "\n")
                out.flush()
                continue
        if adapter is None:
            out.write(json.dumps({"id": rid, "error": "cannot reach LMCache (connecting again shortly)"}) + "\n")
            out.flush()
            continue
        try:
            hit = _lookup(adapter, f"disagg-lookup-{os.getpid()}-{n}", tokens, mq_timeout)
            answer: dict[str, object] = {"id": rid, "hit": hit, "healthy": adapter.is_healthy}
        except Exception as exc:  # noqa: BLE001 - the answer carries it
            answer = {"id": rid, "error": repr(exc)[:500]}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


def _lookup(adapter: typing.Any, request_id: str, tokens: list[int], timeout_s: float) -> int:
    adapter.maybe_submit_lookup_request(request_id, tokens)
    deadline = time.monotonic() + timeout_s
    try:
        while (hit := adapter.check_lookup_result(request_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"lookup not answered in {timeout_s}s")
            time.sleep(0.0005)
        if hit > 0:
            adapter.free_lookup_locks(tokens, 0, hit, request_id)
        return int(hit)
    finally:
        adapter.end_session(request_id)
        adapter.cleanup_lookup_result(request_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LMCache lookup client for disagg's prefill-worker (JSON lines)")
    parser.add_argument("--server-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mq-timeout", type=float, default=5.0)
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    parser.add_argument("--world-size", type=int, default=1, help="the engine's tensor-parallel size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # Answers go out on a private copy of stdout; anything else that writes to
    # fd 1 (LMCache logs to stdout) lands in stderr, the log file.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return _serve(out, args.server_url, args.model, args.mq_timeout, args.heartbeat_interval, args.world_size)


if __name__ == "__main__":
    sys.exit(main())
