"""The lookup client (lmcache-server's probe, prefill-worker's stored-KV check) reaches a restarted LMCache server.

A real LMCache server and the real client, no stack. Seen in CI and then here: once the server it knew was stopped
and replaced, the client never reached the new one ("Cannot reach the LMCache MP server ... within 5.0s" at every
question while the new server sat idle), so lmcache-server took every fresh LMCache for a stuck one and restarted it
again and again, and the KV path never came back (the fault matrix's compound row). Cause: every reconnect shared
one zmq context; a context per connection, ended with it, reaches the new server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from daemons.kv.kv_lookup import KVLookup

DEADLINE_S = 90.0  # per phase: a server start (LMCache imports torch) plus a reconnect, on two busy cores
STUCK_S = 20.0  # how long the stopped server is asked before it is replaced (several reconnects)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(port: int, http_port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", "daemons.children.lmcache_main", "server", "--host", "127.0.0.1",
             "--port", str(port), "--http-host", "127.0.0.1", "--http-port", str(http_port), "--chunk-size", "256",
             "--l1-size-gb", "0.2", "--eviction-policy", "LRU"],
            stdout=out, stderr=subprocess.STDOUT,
        )


async def _answer(probe: KVLookup) -> str:
    """'ok' for a healthy answer, else what went wrong."""
    try:
        await probe.hit_tokens([1] * 256, 7.0)
    except (RuntimeError, TimeoutError) as exc:
        return str(exc) or "timed out"
    return "ok" if probe.healthy else "answered, client marks the server unhealthy"


async def _until(probe: KVLookup, want_ok: bool, what: str) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        seen.append(await _answer(probe))
        if (seen[-1] == "ok") == want_ok:
            return seen
        await asyncio.sleep(1.0)
    raise AssertionError(f"{what} within {DEADLINE_S:.0f}s; the client's answers: {seen[-5:]}")


def test_the_lookup_client_reaches_a_restarted_lmcache_server(tmp_path: Path, model_dir: Path) -> None:
    port, http_port, log = _free_port(), _free_port(), tmp_path / "lmcache.log"
    server = _start_server(port, http_port, log)
    probe = KVLookup(server_url=f"tcp://127.0.0.1:{port}", model=str(model_dir), mq_timeout_s=5.0,
                     heartbeat_interval_s=2.0, log_path=tmp_path / "probe.log")

    async def scenario() -> None:
        nonlocal server
        await probe.start()
        try:
            await _until(probe, True, "no healthy answer from the first server")
            os.kill(server.pid, signal.SIGSTOP)  # stuck: the client must first see it
            await _until(probe, False, "the stopped server still answered")
            # Questions go on while it stays stuck, as lmcache-server's go on until it restarts LMCache: the client
            # connects again and again to a server that does not answer.
            held = time.monotonic() + STUCK_S
            while time.monotonic() < held:
                assert await _answer(probe) != "ok", "the stopped server answered"
                await asyncio.sleep(1.0)
            server.kill()
            server.wait(30)
            server = _start_server(port, http_port, log)
            await _until(probe, True, "the client never reached the restarted server")
        finally:
            await probe.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.kill()
        server.wait(30)
