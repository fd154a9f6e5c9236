"""The public edge of the real stack (CPU default): what a hostile or merely busy world
sends it. Each test is one row of the hardening issue's table; each failed before."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from benchmarks.harness.scrape import metric_value
from daemons.children.child import descendants
from daemons.config import load_config
from daemons.deployment import Deployment
from daemons.runtime.statefile import read_state

from .conftest import PORTS, words_prompt

pytestmark = pytest.mark.stack
FRONT = ("127.0.0.1", PORTS["decode_worker"]["port"])


def raw_request(head: bytes, body: bytes = b"", timeout: float = 30) -> bytes:
    """Send bytes as they are (no client library tidies them up); return the first response bytes."""
    with socket.create_connection(FRONT, timeout=timeout) as sock:
        sock.sendall(head + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3})", response)
    assert match, response[:200]
    return int(match.group(1))


def rss(stack) -> float:  # type: ignore[no-untyped-def]
    return metric_value(stack.metrics("decode-worker"), "process_resident_memory_bytes")


def test_a_200_mb_body_is_refused_before_it_is_read(stack) -> None:  # type: ignore[no-untyped-def]
    before = rss(stack)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 209715200\r\n")
    response = raw_request(head, b"{" + b" " * (1 << 20))
    assert status_of(response) == 413
    grown = rss(stack) - before
    assert grown < 50e6, f"decode-worker grew by {grown / 1e6:.0f} MB on a refused body"


def test_deep_nesting_is_a_400(stack) -> None:  # type: ignore[no-untyped-def]
    resp = httpx.post(f"{stack.base_url}/v1/completions", content=b"[" * 100_000, trust_env=False, timeout=30)
    assert resp.status_code == 400 and "nested too deeply" in resp.json()["error"]["message"]


def test_a_non_ascii_request_id_is_a_400(stack) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 1}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"x-request-id: caf\xc3\xa9\r\nContent-Length: " + str(len(body)).encode() + b"\r\n")
    assert status_of(raw_request(head, body)) == 400


def running(stack) -> float:  # type: ignore[no-untyped-def]
    return metric_value(stack.metrics("decode-worker"), "vllm_num_requests_running")


def test_a_client_that_goes_away_stops_the_decode_engine(stack) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"model": "tiny-llama", "prompt": words_prompt(7, 30), "max_tokens": 4000,
                       "ignore_eos": True}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n")
    sock = socket.create_connection(FRONT, timeout=30)
    try:
        sock.sendall(head + b"\r\n" + body)
        deadline = time.monotonic() + 120
        while running(stack) < 1:
            assert time.monotonic() < deadline, "the request never ran in the decode engine"
            time.sleep(0.2)
        time.sleep(2.5)
    finally:
        sock.close()  # the client goes away
    t0 = time.monotonic()
    while running(stack) > 0:
        assert time.monotonic() - t0 < 30, "the decode engine kept generating for a client that left"
        time.sleep(0.2)
    print(f"\ndecode engine stopped {time.monotonic() - t0:.1f}s after the client closed")


def prefill_engine_busy(stack) -> float:  # type: ignore[no-untyped-def]
    text = stack.metrics("prefill-worker")
    return metric_value(text, "vllm_num_requests_running") + metric_value(text, "vllm_num_requests_waiting")


def test_clients_that_go_away_during_prefill_are_seen_and_their_prompts_never_aborted_mid_load(stack) -> None:  # type: ignore[no-untyped-def]
    """16 long prompts queue up in the prefill engine (~2 s of CPU each here, ~30 s in all); their clients leave
    while they are still there. prefill-worker sees them go (499), and does not abort its engine's requests while
    the engine defers any (waits for an LMCache lookup or load: an abort then kills vLLM 0.26 + LMCache 0.5.3, seen
    on the GPU under overload, docs/faults.md); it drops them once the engine defers nothing, else they finish. The
    engine drains them, alive, and the stack serves the next request disaggregated."""
    before_499 = metric_value(stack.metrics("prefill-worker"), "disagg_prefill_requests_total", 'status="499"')
    runtime = load_config(stack.config).runtime_dir
    engine_pid = read_state(runtime, "prefill-worker").details["engine_pid"]  # type: ignore[union-attr]
    socks = []
    try:
        for i in range(16):
            body = json.dumps({"model": "tiny-llama", "prompt": words_prompt(5000 + i, 6000),
                               "max_tokens": 4}).encode()
            sock = socket.create_connection(FRONT, timeout=30)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            socks.append(sock)
        deadline = time.monotonic() + 120
        while prefill_engine_busy(stack) < 8:
            assert time.monotonic() < deadline, "the prompts never queued in the prefill engine"
            time.sleep(0.2)
    finally:
        for sock in socks:
            sock.close()  # every client goes away
    left = prefill_engine_busy(stack)
    t0 = time.monotonic()
    while prefill_engine_busy(stack) > 0 or running(stack) > 0:
        assert time.monotonic() - t0 < 180, (f"{prefill_engine_busy(stack):.0f} requests in the prefill engine, "
                                             f"{running(stack):.0f} in the decode engine "
                                             f"{time.monotonic() - t0:.0f}s after their clients left")
        time.sleep(0.2)
    print(f"\nprefill engine done with {left:.0f} abandoned prompts {time.monotonic() - t0:.1f}s after the clients left")
    aborted = metric_value(stack.metrics("prefill-worker"), "disagg_prefill_requests_total", 'status="499"')
    assert aborted - before_499 >= 8, "prefill-worker did not see its callers go away"
    assert read_state(runtime, "prefill-worker").details["engine_pid"] == engine_pid, (  # type: ignore[union-attr]
        "the prefill engine was restarted")
    r = httpx.post(f"{stack.base_url}/v1/completions", json={"model": "tiny-llama", "prompt": words_prompt(7100, 600),
                   "max_tokens": 2}, timeout=120, trust_env=False)
    assert r.status_code == 200 and r.headers["x-disagg-path"] == "disaggregated", (r.status_code, r.headers)


async def one_stream(client: httpx.AsyncClient, i: int) -> tuple[int, str, list[str]]:
    body = {"model": "tiny-llama", "prompt": words_prompt(1000 + i, 60), "max_tokens": 16, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        text = (await resp.aread()).decode()
        return resp.status_code, resp.headers.get("retry-after", ""), text.split("\n\n")


def test_160_concurrent_streams_get_429s_not_a_slow_collapse(stack) -> None:  # type: ignore[no-untyped-def]
    fallbacks_before = metric_value(stack.metrics("decode-worker"), "disagg_fallbacks_total",
                                    'reason="prefill_timeout"')

    async def load() -> list[tuple[int, str, list[str]]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=300, limits=limits, trust_env=False) as c:
            return await asyncio.wait_for(asyncio.gather(*(one_stream(c, i) for i in range(160))), 600)

    t0 = time.monotonic()
    results = asyncio.run(load())
    elapsed = time.monotonic() - t0
    codes = [code for code, _, _ in results]
    refused = [r for r in results if r[0] == 429]
    assert set(codes) <= {200, 429}, codes
    assert refused and all(retry for _, retry, _ in refused), "no 429 (with Retry-After) under 160 streams"
    for code, _, events in results:
        if code != 200:
            continue
        for event in events:
            if event.startswith("data: ") and event != "data: [DONE]":
                json.loads(event[6:])  # every data line is whole JSON
    fallbacks = metric_value(stack.metrics("decode-worker"), "disagg_fallbacks_total",
                             'reason="prefill_timeout"') - fallbacks_before
    assert fallbacks == 0, f"{fallbacks:.0f} prefill timeouts under load: fallback multiplied the work"
    print(f"\n160 streams: {codes.count(200)} served, {len(refused)} refused with 429, {elapsed:.0f}s")
    stack.wait_state("decode-worker", ("ready",), timeout=120)


def test_every_port_of_the_stack_listens_on_loopback_only(stack) -> None:  # type: ignore[no-untyped-def]
    config = load_config(stack.config)
    pids: set[int] = set()
    for name in Deployment(config).daemon_names():
        record = read_state(config.runtime_dir, name)
        assert record is not None
        pids |= {record.pid, *descendants(record.pid)}
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    listening = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            local = line.split()[3]
            listening.append(local)
    assert f"127.0.0.1:{PORTS['lmcache']['http_port']}" in listening  # LMCache's HTTP API, on loopback
    exposed = [a for a in listening if not a.startswith(("127.", "[::1]", "[::ffff:127."))]
    assert exposed == [], f"listening beyond loopback: {exposed} (all: {listening})"


def garbage(rng: random.Random, n: int) -> list[bytes]:
    """Raw payloads: random bytes, broken HTTP framing, and well-framed requests with hostile bodies."""
    def framed(body: bytes, path: bytes = b"/v1/completions", extra: bytes = b"") -> bytes:
        return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n" + extra +
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    values: list[object] = [None, True, -1, 0, 2**63, 1e308, "", "x" * 5000, [], {}, [1, "a"], {"a": {"b": []}}]
    keys = ["model", "prompt", "messages", "max_tokens", "stream", "n", "temperature", "stop", "stream_options",
            "logprobs", "best_of", "echo", "min_tokens", "prompt_logprobs", "top_p", "seed"]
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2048))))
        elif kind == 1:
            out.append(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " +
                       rng.choice([b"-1", b"abc", b"99999999999999999999", b"10"]) + b"\r\n\r\n{")
        elif kind == 2:
            out.append(framed(b"{}", extra=b"X-" + bytes(rng.getrandbits(7) | 0x41 for _ in range(20)) +
                              b": " + bytes(rng.getrandbits(8) for _ in range(40)).replace(b"\r", b"").replace(
                                  b"\n", b"") + b"\r\n"))
        elif kind == 3:
            out.append(framed(json.dumps({k: rng.choice(values) for k in rng.sample(keys, rng.randint(1, 6))}).encode()))
        elif kind == 4:
            body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2,
                    rng.choice(keys): rng.choice(values)}
            out.append(framed(json.dumps(body).encode(), path=rng.choice(
                [b"/v1/completions", b"/v1/chat/completions", b"/v1/models", b"/health", b"/metrics", b"/nope"])))
        else:
            out.append(framed(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 512)))))
    return out


def send_raw(port: int, payload: bytes) -> int | None:
    """The status the server answered, None when it closed without one (garbage that is not HTTP).

    A well-framed request says ``Connection: close`` and is answered; anything else is followed by
    a half-close, so the server sees the end of it instead of waiting for more."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(payload)
        if b"Connection: close" not in payload:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while len(data) < 65536:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(match.group(1)) if match else None


def test_garbage_on_every_port_of_ours_gets_no_5xx_and_kills_nothing(stack) -> None:  # type: ignore[no-untyped-def]
    config = load_config(stack.config)
    before = {name: read_state(config.runtime_dir, name).pid for name in Deployment(config).daemon_names()}  # type: ignore[union-attr]
    ports = [PORTS["decode_worker"]["port"], PORTS["prefill_worker"]["port"], PORTS["lmcache_server"]["metrics_port"],
             PORTS["prefill_worker"]["metrics_port"], PORTS["decode_worker"]["metrics_port"]]
    rng = random.Random(20261126)
    statuses: dict[int, Counter[int | None]] = {}
    bad = []
    for port in ports:
        seen: Counter[int | None] = Counter()
        for payload in garbage(rng, 120):
            status = send_raw(port, payload)
            seen[status] += 1
            if status is not None and status >= 500 and status != 503:
                bad.append((port, status, payload[:120]))
        statuses[port] = seen
    print("\n" + "\n".join(f"port {p}: {dict(s)}" for p, s in statuses.items()))
    assert bad == [], bad[:5]
    after = {name: read_state(config.runtime_dir, name).pid for name in Deployment(config).daemon_names()}  # type: ignore[union-attr]
    assert after == before, "a daemon restarted under garbage"
    resp = stack.complete(words_prompt(3, 300), max_tokens=2)
    assert resp.status_code == 200


# The front door serves the decode engine's OpenAI API: the engine's own OpenAPI schema,
# cut down to the routes the front door has, is the front door's schema.
FRONT_DOOR_ROUTES = {"/v1/completions": "post", "/v1/chat/completions": "post", "/v1/models": "get"}


def test_schema_driven_fuzzing_of_the_front_door_finds_no_5xx(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = f"http://127.0.0.1:{PORTS['decode_worker']['engine_port']}"
    schema = httpx.get(f"{engine}/openapi.json", timeout=30, trust_env=False).json()
    schema["paths"] = {path: {method: schema["paths"][path][method]} for path, method in FRONT_DOOR_ROUTES.items()}
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    config = load_config(stack.config)
    pids = {name: read_state(config.runtime_dir, name).pid for name in Deployment(config).daemon_names()}  # type: ignore[union-attr]
    before = rss(stack)
    # Positive and negative cases (valid bodies and bodies the schema forbids), fixed seed; the
    # coverage phase is left out: schemathesis 4.32 crashes in it on this schema (its own
    # error, not a response). A request unanswered in 120 s fails the run.
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", str(tmp_path / "openapi.json"),
         "--url", stack.base_url, "--checks", "not_a_server_error", "--phases", "examples,fuzzing",
         "--max-time", "150", "--request-timeout", "120", "--seed", "20261126", "--workers", "2",
         "--no-color"],
        capture_output=True, text=True, timeout=600)
    summary = proc.stdout[-3000:]
    print("\n" + summary)
    assert proc.returncode == 0, summary
    generated = re.search(r"(\d+) generated", proc.stdout)
    assert generated and int(generated.group(1)) >= 100, "the fuzzer hardly ran"
    grown = rss(stack) - before
    assert grown < 100e6, f"decode-worker grew by {grown / 1e6:.0f} MB under fuzzing"
    after = {name: read_state(config.runtime_dir, name).pid for name in Deployment(config).daemon_names()}  # type: ignore[union-attr]
    assert after == pids, "a daemon restarted under fuzzing"
    stack.wait_state("decode-worker", ("ready",), timeout=120)
    prompt = words_prompt(4242, 600)
    stack.complete(prompt, max_tokens=2)
    resp = stack.complete(prompt, max_tokens=2)
    assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
