"""The public edge with fakes (the front door's app over ASGI, a mock engine): request limits,
bad headers, API keys, admission control, and a client that goes away. The same rows run
against the real stack in tests/e2e/test_edge.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemons.edge.admission import Admission, Overloaded
from daemons.edge.auth import ApiKeyError, ApiKeys
from daemons.edge.door_settings import FrontDoorSettings
from daemons.edge.frontdoor import FrontDoor
from daemons.edge.upstream import Upstream
from daemons.metrics import FrontDoorMetrics
from daemons.routing.prefill_router import PrefillRouter
from daemons.runtime.peers import Peers

from .fakes import FakeUpstream, until

ENGINE_ANSWER = {"choices": [{"text": "hi"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


def front_door(tmp_path: Path, engine: httpx.MockTransport | None = None, **kw: Any) -> FrontDoor:
    metrics = FrontDoorMetrics(CollectorRegistry())
    router = PrefillRouter([], Peers(tmp_path, 5, expect_digest=None), metrics)  # no prefill: fallback
    transport = engine or httpx.MockTransport(lambda r: httpx.Response(200, json=ENGINE_ANSWER))
    keys = kw.pop("keys", None)
    kw.setdefault("disaggregate_min_tokens", 0)  # these prompts are short: send them to prefill anyway
    settings = FrontDoorSettings(engine_url="http://engine", prefill_timeout_s=5, **kw)
    return FrontDoor(settings, client=FakeUpstream(transport.handler), metrics=metrics, router=router,
                     health=lambda: ("ready", True, ""), keys=keys)


async def post(door: FrontDoor, body: bytes | None = None, headers: dict[str, Any] | None = None,
               path: str = "/v1/completions") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(door.app()), base_url="http://door") as client:
        content = body if body is not None else json.dumps({"model": "m", "prompt": "hello"}).encode()
        return await client.post(path, content=content, headers=headers or {})


def errors(door: FrontDoor, kind: str) -> float:
    return door.metrics.errors.labels(kind=kind)._value.get()


def test_a_polite_request_is_served(tmp_path: Path) -> None:
    door = front_door(tmp_path)
    resp = asyncio.run(post(door))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "fallback"
    assert door.admission.active == 0  # the slot came back


def test_a_body_over_the_limit_is_413_before_it_is_read(tmp_path: Path) -> None:
    door = front_door(tmp_path, max_body_bytes=1024)
    resp = asyncio.run(post(door, b"x" * 5000))
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "request_too_large"
    assert errors(door, "too_large") == 1


def test_deep_nesting_is_400_not_500(tmp_path: Path) -> None:
    door = front_door(tmp_path)
    deep: object = 1
    for _ in range(33):
        deep = [deep]
    for body in (b"[" * 100_000, json.dumps({"prompt": "x", "a": deep}).encode()):
        resp = asyncio.run(post(door, body))
        assert resp.status_code == 400 and "nested too deeply" in resp.json()["error"]["message"]


@pytest.mark.parametrize("body", [b"", b"{", b"[1, 2]", b"\xff\xfe", b'"just a string"'])
def test_garbage_bodies_are_400(tmp_path: Path, body: bytes) -> None:
    resp = asyncio.run(post(front_door(tmp_path), body))
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("rid", ["caf\u00e9", "two words", "x" * 200, "tab\there"])
def test_a_bad_request_id_is_400_and_never_reaches_the_engine(tmp_path: Path, rid: str) -> None:
    calls = []
    engine = httpx.MockTransport(lambda r: calls.append(r) or httpx.Response(200, json=ENGINE_ANSWER))
    door = front_door(tmp_path, engine)
    resp = asyncio.run(post(door, headers={"x-request-id": rid.encode("utf-8")}))
    assert resp.status_code == 400 and "x-request-id" in resp.json()["error"]["message"]
    assert calls == []


def test_api_keys_gate_the_api_but_not_health(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nold-key\nnew-key\n")
    keys_file.chmod(0o640)
    door = front_door(tmp_path, keys=ApiKeys(keys_file, env={}))
    assert asyncio.run(post(door)).status_code == 401
    assert asyncio.run(post(door, headers={"authorization": "Bearer wrong"})).status_code == 401
    assert asyncio.run(post(door, headers={"authorization": "Bearer old-key"})).status_code == 200
    assert asyncio.run(post(door, headers={"authorization": "bearer new-key"})).status_code == 200
    unauthorized = asyncio.run(post(door, headers={"authorization": "Bearer wrong"}))
    assert unauthorized.json()["error"]["type"] == "authentication_error" and "wrong" not in unauthorized.text

    async def health() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(door.app()), base_url="http://door") as c:
            return await c.get("/health")
    health_resp = asyncio.run(health())
    assert health_resp.status_code == 200 and health_resp.json() == {"state": "ready"}  # no reason, no addresses


def test_keys_rotate_without_a_restart_and_a_broken_file_keeps_the_old_keys(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("old-key\n")
    keys_file.chmod(0o640)
    keys = ApiKeys(keys_file, env={"DISAGG_API_KEYS": "env-key"})
    assert keys.allows("Bearer old-key") and keys.allows("Bearer env-key")
    keys_file.write_text("new-key\n")
    os.utime(keys_file, (1, 1))
    keys.reload_if_changed()
    assert keys.allows("Bearer new-key") and not keys.allows("Bearer old-key")
    keys_file.chmod(0o644)  # readable by everyone: refused, the loaded keys stay
    os.utime(keys_file, (2, 2))
    keys.reload_if_changed()
    assert keys.allows("Bearer new-key")
    with pytest.raises(ApiKeyError, match="readable by everyone"):
        ApiKeys(keys_file, env={})


def test_no_key_source_means_no_authentication() -> None:
    assert ApiKeys(None, env={}).allows(None)
    assert not ApiKeys(None, env={"DISAGG_API_KEYS": "k"}).allows(None)


def test_admission_queues_then_refuses_at_once() -> None:
    async def scenario() -> list[str]:
        adm = Admission(max_concurrent=2, max_queued=1, queue_timeout_s=60)
        await adm.acquire()
        await adm.acquire()
        queued = asyncio.create_task(adm.acquire())
        await until(lambda: adm.queued == 1, "the third request queued")
        outcomes = []
        try:
            await adm.acquire()  # the queue (1) is full
        except Overloaded as exc:
            outcomes.append(exc.reason)
        adm.release()  # the queued one gets the slot
        await asyncio.wait_for(queued, 10)
        outcomes.append(f"active={adm.active} queued={adm.queued}")
        adm.resize(2, 1, 0.05)  # the queue's deadline, short: nobody releases
        try:
            await adm.acquire()  # waits, nobody releases: too long
        except Overloaded as exc:
            outcomes.append(exc.reason)
        return outcomes

    assert asyncio.run(scenario()) == ["queue_full", "active=2 queued=0", "queue_timeout"]


def test_overload_is_429_with_retry_after(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow_engine(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json=ENGINE_ANSWER)

    async def scenario() -> list[int]:
        door = front_door(tmp_path, httpx.MockTransport(slow_engine), max_concurrent_requests=2, max_queued_requests=2,
                          queue_timeout_s=30)
        tasks = [asyncio.create_task(post(door)) for _ in range(8)]
        # Two in progress, two queued, four refused at once: then the engine answers.
        await until(lambda: door.admission.active == 2 and door.admission.queued == 2
                    and sum(t.done() for t in tasks) == 4, "the box full and the rest refused")
        release.set()
        responses = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        refused = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] for r in refused)
        assert door.admission.active == 0 and door.admission.queued == 0
        return sorted(r.status_code for r in responses)

    assert asyncio.run(scenario()) == [200] * 4 + [429] * 4


def hanging_engine() -> tuple[asyncio.Event, asyncio.Event, Any]:
    """An engine that never answers: (it got the request, the request was cancelled, the handler)."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    return started, cancelled, handler


def test_a_client_that_goes_away_cancels_the_engine_request(tmp_path: Path) -> None:
    started, cancelled, endless_engine = hanging_engine()

    async def scenario() -> None:
        door = front_door(tmp_path, httpx.MockTransport(endless_engine))
        body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 4000}).encode()
        gone, call = asgi_post_then_disconnect(door.app(), body)
        app_task = asyncio.create_task(call)
        await asyncio.wait_for(started.wait(), 5)
        gone.set()  # the client closes its connection
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.wait_for(app_task, 5)
        assert errors(door, "client_gone") == 1 and door.admission.active == 0

    asyncio.run(scenario())


def asgi_post_then_disconnect(app: Any, body: bytes) -> tuple[asyncio.Event, Any]:
    """Drive ``app`` with one POST whose client disconnects when the returned event is set."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("x", 80), "client": ("c", 1), "root_path": ""}
    return gone, app(scope, receive, send)


def test_prefill_worker_aborts_the_engine_request_when_its_caller_gives_up(tmp_path: Path) -> None:
    from daemons.config import parse_config
    from daemons.prefill_worker import PrefillWorker

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    worker = PrefillWorker(parse_config({"runtime_dir": str(tmp_path / "run"), "log_dir": str(tmp_path / "log"),
                                         "model": {"path": str(model)}}, tmp_path / "d.yaml"), strict=True)
    started, cancelled, endless_engine = hanging_engine()

    async def scenario() -> None:
        worker.proxy = FakeUpstream(endless_engine)  # type: ignore[assignment]
        gone, call = asgi_post_then_disconnect(worker.app(), json.dumps({"model": "m", "prompt": "p"}).encode())
        task = asyncio.create_task(call)
        await asyncio.wait_for(started.wait(), 5)
        gone.set()  # the front door's prefill deadline passed: it closed the connection
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())


def test_lmcache_http_api_is_bound_to_loopback(tmp_path: Path) -> None:
    from daemons.config import parse_config
    from daemons.deployment import Deployment
    from daemons.lmcache_server import lmcache_argv

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    argv = lmcache_argv(Deployment(parse_config({"runtime_dir": "r", "log_dir": "l", "model": {"path": str(model)}},
                                                tmp_path / "d.yaml")))
    assert argv[argv.index("--http-host") + 1] == "127.0.0.1"


def test_a_local_client_finds_a_key_to_send(tmp_path: Path) -> None:
    from daemons.edge.auth import client_key

    keys_file = tmp_path / "keys"
    keys_file.write_text("# header\nfile-key\n")
    assert client_key(keys_file, env={}) == "file-key"
    assert client_key(keys_file, env={"DISAGG_API_KEYS": "env-key,other"}) == "env-key"
    assert client_key(tmp_path / "absent", env={}) is None and client_key(None, env={}) is None


def test_a_prefill_call_past_its_deadline_closes_the_connection_to_prefill_worker(tmp_path: Path) -> None:
    """The front door gives up on a slow prefill: prefill-worker must see its caller go (then it aborts
    the engine's request, tested above), or the prefill engine computes a prompt nobody will use."""
    from daemons.routing.prefill_router import PrefillChoice

    async def scenario() -> None:
        got_request, saw_close = asyncio.Event(), asyncio.Event()

        async def slow_prefill_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            got_request.set()
            while await reader.read(65536):  # never answers; EOF when the caller closes
                pass
            saw_close.set()
            writer.close()

        server = await asyncio.start_server(slow_prefill_worker, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        door = front_door(tmp_path)
        door.client = Upstream()  # a real connection to the fake prefill-worker
        door.prefill_timeout_s = 0.5
        door.router.choose = lambda: PrefillChoice(url=f"http://127.0.0.1:{port}")  # type: ignore[method-assign]
        async with server:
            outcome = await asyncio.wait_for(door.prefill("/v1/completions", {"model": "m", "prompt": "p"}, "r1"), 10)
            assert (outcome.path, outcome.reason) == ("fallback", "prefill_timeout")
            assert got_request.is_set()
            await asyncio.wait_for(saw_close.wait(), 5)
        await door.client.aclose()

    asyncio.run(scenario())


def test_upstream_relays_events_whole_even_when_a_character_spans_two_chunks() -> None:
    """A real aiohttp round trip: an engine that sends an event split inside a multi-byte character."""
    from daemons.edge.upstream import UpstreamError

    event = 'data: {"choices": [{"text": "caf\u00e9 \u2603"}]}'.encode()
    cut = event.index("\u2603".encode()) + 1  # inside the snowman's three bytes

    async def scenario() -> None:
        async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
            writer.write(event[:cut])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(event[cut:] + b"\n\ndata: {\"trunc")  # then a stream that ends inside an event
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(engine, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream()
        async with server:
            stream = await upstream.stream(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "x"})
            got = []
            with pytest.raises(UpstreamError, match="inside an event"):
                async for e in stream.events():
                    got.append(e)
            assert got == [event.decode()]
            await stream.aclose()
        await upstream.aclose()

    asyncio.run(scenario())


def test_prefill_worker_relays_a_whole_request_and_ends_a_broken_stream_with_an_error_event(tmp_path: Path) -> None:
    """/whole/v1/... (path decode_busy) through a real aiohttp round trip: the engine's events pass untouched,
    and an engine whose stream breaks mid-way leaves the caller one error event, not a silent end."""
    from daemons.config import parse_config
    from daemons.edge.sse_relay import BROKEN_STREAM_EVENT
    from daemons.prefill_worker import PrefillWorker
    from daemons.runtime.httpserver import EmbeddedServer

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    worker = PrefillWorker(parse_config({"runtime_dir": str(tmp_path / "run"), "log_dir": str(tmp_path / "log"),
                                         "model": {"path": str(model)}}, tmp_path / "d.yaml"), strict=True)
    event = b'data: {"choices":[{"index":0,"text":" hi"}]}\n\n'
    seen: list[bytes] = []

    async def scenario() -> None:
        break_now = asyncio.Event()

        async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            seen.append(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await break_now.wait()  # the caller has the first event
            writer.close()  # no terminating chunk: the stream broke

        server = await asyncio.start_server(engine, "127.0.0.1", 0)
        worker.engine_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        body = {"model": "m", "prompt": "p", "max_tokens": 50, "stream": True}
        with socket.socket() as probe:  # a free port for prefill-worker's API (httpx's ASGI transport buffers)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        api = EmbeddedServer(worker.app(), "127.0.0.1", port, name="prefill API", drain_s=1)
        await api.start()
        async with server:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False) as client:
                async with client.stream("POST", "/whole/v1/completions", json=body) as resp:
                    assert resp.status_code == 200
                    received = b""
                    async for chunk in resp.aiter_raw():
                        received += chunk
                        if received == event:
                            break_now.set()
        await api.stop()
        await worker.proxy.aclose()
        assert received == event + f"data: {BROKEN_STREAM_EVENT}\n\n".encode()
        assert json.loads(seen[0]) == body  # passed on as it came: 50 tokens, streamed (not cut to a prefill)

    asyncio.run(asyncio.wait_for(scenario(), 20))


@pytest.mark.parametrize(("extra", "named"), [
    ({"n": 5}, "max_choices"), ({"best_of": 64}, "max_choices"),
    ({"prompt": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}, "max_prompts"),
    ({"max_tokens": 100_000}, "max_output_tokens"), ({"prompt_logprobs": 50}, "max_logprobs"),
    ({"logprobs": 21}, "max_logprobs"),
])
def test_one_request_asking_for_a_batch_of_work_is_400_naming_the_limit(tmp_path: Path, extra: dict,
                                                                          named: str) -> None:
    """(issue 30.8) Admission counts requests; n, best_of, lists of prompts, prompt_logprobs and max_tokens up to the
    model's length let one request hold a batch's worth of the engine."""
    calls: list[httpx.Request] = []
    engine = httpx.MockTransport(lambda r: calls.append(r) or httpx.Response(200, json=ENGINE_ANSWER))
    door = front_door(tmp_path, engine)
    resp = asyncio.run(post(door, json.dumps({"model": "m", "prompt": "hello", **extra}).encode()))
    assert resp.status_code == 400, resp.text
    assert f"decode_worker.{named}" in resp.json()["error"]["message"]
    assert calls == [] and door.admission.active == 0 and errors(door, "bad_request") == 1


def test_work_within_the_limits_is_served(tmp_path: Path) -> None:
    door = front_door(tmp_path)
    within = {"n": 4, "prompt": [[1, 2, 3] * 400, "b"], "max_tokens": 4096, "logprobs": 5, "prompt_logprobs": 0}
    resp = asyncio.run(post(door, json.dumps({"model": "m", **within}).encode()))
    assert resp.status_code == 200, resp.text
    one = asyncio.run(post(door, json.dumps({"model": "m", "prompt": list(range(2000))}).encode()))
    assert one.status_code == 200, one.text  # a list of token ids is one prompt


def test_slots_past_the_cap_are_bounded_and_hold_back_the_queue() -> None:
    """take_beyond: a full front door's relays (the box's endpoint) hold slots past the cap, at most ``extra``;
    a waiter gets a slot only once fewer than the cap are in progress, relays included."""
    from daemons.edge.admission import Admission

    async def scenario() -> None:
        adm = Admission(max_concurrent=1, max_queued=1, queue_timeout_s=5)
        assert not adm.full
        await adm.acquire()
        assert adm.full and adm.take_beyond(1) and not adm.take_beyond(1) and adm.active == 2
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0.01)
        adm.release()  # one left in progress: still at the cap
        await asyncio.sleep(0.01)
        assert not waiter.done()
        adm.release()
        await asyncio.wait_for(waiter, 1)
        assert adm.active == 1

    asyncio.run(scenario())
