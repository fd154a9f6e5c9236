"""Failover with fakes: while the decode engine cannot serve, a request goes whole to a prefill engine
(path failover), bounded; one whose decode call fails before any answer is served there too; with no
engine able to serve it, 503 + Retry-After. Every count is back to 0 after."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemons.edge.door_settings import FrontDoorSettings
from daemons.edge.frontdoor import FrontDoor
from daemons.metrics import FrontDoorMetrics
from daemons.routing.prefill_router import PrefillChoice, PrefillOutcome, PrefillRouter

from .fakes import FakeUpstream

ANSWER = {"choices": [{"text": "x"}], "usage": {"prompt_tokens": 100, "completion_tokens": 3}}
STREAM = ('data: {"choices":[{"text":"x"}]}\n\n'
          'data: {"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":1}}\n\ndata: [DONE]\n\n')


class Prefills:
    """Stands in for PrefillRouter: ``ready`` prefill-workers (each at http://pN), round robin."""

    def __init__(self, ready: int = 1, siblings: dict[str, str] | None = None) -> None:
        self.ready = ready
        self.reports: list[PrefillOutcome] = []
        self._next = 0
        self.siblings = dict(siblings or {})  # decode-workers whose engines serve: name -> front door URL
        self.load: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.lighter = False  # by load, the first sibling is lighter (the real choice: test_decode_routing)
        self.roomy = False  # the first sibling has a free slot

    take = PrefillRouter.take
    give_back = PrefillRouter.give_back
    holding = PrefillRouter.holding
    relayed = PrefillRouter.relayed

    def roomy_sibling(self) -> PrefillChoice:
        if not self.roomy or not self.siblings:
            return PrefillChoice(skip="full")
        name = next(iter(self.siblings))
        return PrefillChoice(url=self.siblings[name], daemon=name)

    def lighter_sibling(self, mine: int, pressed: bool = False) -> PrefillChoice:
        if not self.lighter or not self.siblings:
            return PrefillChoice(skip="balanced")
        name = next(iter(self.siblings))
        return PrefillChoice(url=self.siblings[name], daemon=name)

    def choose_sibling(self, exclude: Sequence[str] = ()) -> PrefillChoice:
        name = next((n for n in self.siblings if n not in exclude), None)
        return PrefillChoice(skip="no_sibling") if name is None else PrefillChoice(url=self.siblings[name], daemon=name)

    def working_prefills(self) -> list[str]:
        return [f"p{i}" for i in range(self.ready)]

    def choose(self) -> PrefillChoice:
        return PrefillChoice(skip="prefill_unavailable")  # no disaggregation in these tests

    def choose_any(self) -> PrefillChoice:
        if not self.ready:
            return PrefillChoice(skip="prefill_unavailable")
        i = self._next % self.ready
        self._next += 1
        return PrefillChoice(url=f"http://p{i}", daemon=f"p{i}")

    def report(self, outcome: PrefillOutcome, request_id: str) -> PrefillOutcome:
        self.reports.append(outcome)
        return outcome

    def kv_missed(self, reason: str) -> None:
        pass


def engine_answer(request: httpx.Request) -> httpx.Response:
    if json.loads(request.content).get("stream"):
        return httpx.Response(200, text=STREAM, headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json=ANSWER)


def door_with(handler: Any, *, down: str = "", ready: int = 1, bound: int = 64,
              siblings: dict[str, str] | None = None, **settings: Any) -> tuple[FrontDoor, FrontDoorMetrics, list[str]]:
    metrics = FrontDoorMetrics(CollectorRegistry())
    seen: list[str] = []

    async def recording(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}{request.url.path}")
        result = handler(request)
        return await result if asyncio.iscoroutine(result) else result

    door = FrontDoor(FrontDoorSettings(engine_url="http://engine", disaggregate_min_tokens=0,
                                       failover_max_in_flight=bound, **settings), client=FakeUpstream(recording), metrics=metrics,
                     router=Prefills(ready, siblings),  # type: ignore[arg-type]
                     health=lambda: ("degraded", True, ""), decode_down=lambda: down)
    return door, metrics, seen


async def post(door: FrontDoor, stream: bool, headers: dict[str, str] | None = None,
               shared: bool = False) -> httpx.Response:
    body = {"model": "m", "prompt": list(range(100)), "max_tokens": 3, "stream": stream}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(door.app(shared)), base_url="http://door",
                                 timeout=10) as client:
        return await client.post("/v1/completions", json=body, headers=headers or {})


def paths(metrics: FrontDoorMetrics, path: str) -> float:
    return metrics.paths.labels(path=path)._value.get()


@pytest.mark.parametrize("stream", [False, True])
def test_while_the_decode_engine_is_down_requests_are_served_whole_by_a_prefill_engine(stream: bool) -> None:
    door, metrics, seen = door_with(engine_answer, down="reloading: it died")
    resp = asyncio.run(post(door, stream))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "failover"
    assert "x" in resp.text
    assert seen == ["p0/whole/v1/completions"]  # never the decode engine
    assert paths(metrics, "failover") == 1 and door.placement.failovers == 0 and door.admission.active == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("failure", ["refused", "500"])
def test_a_decode_call_that_fails_before_any_answer_is_served_by_a_prefill_engine(stream: bool, failure: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "engine":
            if failure == "refused":
                raise httpx.ConnectError("connection refused")
            return httpx.Response(500, json={"error": {"message": "EngineDeadError"}})
        return engine_answer(request)

    door, metrics, seen = door_with(handler)
    resp = asyncio.run(post(door, stream))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "failover", resp.text
    assert seen == ["engine/v1/completions", "p0/whole/v1/completions"]
    assert paths(metrics, "failover") == 1 and door.placement.failovers == 0 and door.admission.active == 0


@pytest.mark.parametrize("stalls", ["headers", "first_event"])
def test_a_stream_whose_decode_engine_sends_no_first_token_in_time_is_served_by_a_prefill_engine(stalls: str) -> None:
    """A decode engine that holds a stream and sends nothing (wedged: the fault matrix saw one restarted in place
    while LMCache was stopped) was a 503 at first_token_timeout_s; nothing has reached the client yet, so the
    request fails over like one whose engine refused it."""
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host != "engine":
            return engine_answer(request)
        if stalls == "headers":
            await asyncio.sleep(3600)

        async def nothing() -> Any:
            await asyncio.sleep(3600)
            yield b""

        return httpx.Response(200, content=nothing(), headers={"content-type": "text/event-stream"})

    door, metrics, seen = door_with(handler, first_token_timeout_s=0.2)
    resp = asyncio.run(post(door, True))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "failover", resp.text
    assert "x" in resp.text
    assert seen == ["engine/v1/completions", "p0/whole/v1/completions"]
    assert metrics.errors.labels(kind="decode_timeout")._value.get() == 1
    assert paths(metrics, "failover") == 1 and door.placement.failovers == 0 and door.admission.active == 0


@pytest.mark.parametrize("stream", [False, True])
def test_only_calls_to_the_own_decode_engine_run_on_when_abandoned(stream: bool) -> None:
    """An abort while an engine loads KV from LMCache kills it (daemons/edge/upstream.py): the front door's calls
    to its own engine are made as engine calls; those to a prefill-worker's /whole route are not (prefill-worker
    guards its own engine), so an abandoned one closes at once there."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "engine":
            return httpx.Response(500, json={"error": {"message": "EngineDeadError"}})
        return engine_answer(request)

    door, _metrics, seen = door_with(handler)
    resp = asyncio.run(post(door, stream))
    assert resp.status_code == 200 and seen == ["engine/v1/completions", "p0/whole/v1/completions"]
    assert door.client.orphaned == ["http://engine/v1/completions"]  # type: ignore[attr-defined]


def test_with_no_prefill_worker_ready_it_is_503_with_retry_after() -> None:
    door, metrics, seen = door_with(engine_answer, down="loading", ready=0)
    resp = asyncio.run(post(door, False))
    assert resp.status_code == 503 and resp.headers["retry-after"]
    assert "no prefill engine can serve" in resp.json()["error"]["message"]
    assert seen == [] and metrics.errors.labels(kind="no_engine")._value.get() == 1
    assert door.placement.failovers == 0 and door.admission.active == 0


def test_failover_is_bounded_and_the_one_past_the_bound_is_503() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()

        async def held(request: httpx.Request) -> httpx.Response:
            await gate.wait()
            return engine_answer(request)

        door, metrics, seen = door_with(held, down="loading", bound=2)
        first = [asyncio.create_task(post(door, False)) for _ in range(2)]
        for _ in range(200):
            if door.placement.failovers == 2:
                break
            await asyncio.sleep(0.01)
        assert door.placement.failovers == 2
        third = await post(door, False)
        assert third.status_code == 503 and "failover_max_in_flight" in third.json()["error"]["message"]
        gate.set()
        answers = await asyncio.gather(*first)
        assert [r.headers["x-disagg-path"] for r in answers] == ["failover", "failover"]
        assert door.placement.failovers == 0 and door.admission.active == 0

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_a_prefill_worker_that_refuses_the_failover_is_skipped_for_another() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "p0":
            raise httpx.ConnectError("connection refused")
        return engine_answer(request)

    door, metrics, seen = door_with(handler, down="loading", ready=2)
    resp = asyncio.run(post(door, True))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "failover"
    assert seen == ["p0/whole/v1/completions", "p1/whole/v1/completions"]
    assert door.placement.failovers == 0 and door.admission.active == 0


def chunk(text: str, ids: list[int], prompt_ids: list[int] | None = None, finish: str | None = None) -> str:
    choice: dict[str, Any] = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}
    if prompt_ids is not None:
        choice["prompt_token_ids"] = prompt_ids
    return "data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choice]})


def events_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_whose_engine_dies_mid_way_goes_on_on_another_engine_as_one_stream(chat: bool) -> None:
    prompt_ids = [5, 6, 7]
    continuations: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.host == "engine":  # two tokens, then the engine dies inside an event
            assert body["return_token_ids"] is True
            if chat:
                first = {"id": "chat-1", "object": "chat.completion.chunk", "model": "m", "prompt_token_ids": prompt_ids,
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                text = ("data: " + json.dumps(first) + "\n\n"
                        + "".join("data: " + json.dumps({"id": "chat-1", "object": "chat.completion.chunk", "model": "m",
                                                         "choices": [{"index": 0, "delta": {"content": t},
                                                                      "token_ids": [i]}]}) + "\n\n"
                                  for t, i in (("a", 1), ("b", 2))))
            else:
                text = chunk("a", [1], prompt_ids) + "\n\n" + chunk("b", [2]) + "\n\n"
            return httpx.Response(200, text=text + 'data: {"choi', headers={"content-type": "text/event-stream"})
        continuations.append({"url": f"{request.url.host}{request.url.path}", **body})
        text = (chunk("c", [3], body["prompt"]) + "\n\n" + chunk("d", [4], finish="length") + "\n\n"
                + 'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n'
                + "data: [DONE]\n\n")
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    door, metrics, seen = door_with(handler)
    body: dict[str, Any] = {"model": "m", "max_tokens": 4, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    route = "/v1/chat/completions" if chat else "/v1/completions"

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(door.app()), base_url="http://door",
                                     timeout=10) as client:
            return await client.post(route, json=body)

    resp = asyncio.run(send())
    assert resp.status_code == 200
    assert continuations == [{"url": "p0/whole/v1/completions", "model": "m", "temperature": 0,
                              "prompt": [5, 6, 7, 1, 2], "max_tokens": 2, "stream": True,
                              "stream_options": {"include_usage": True}, "return_token_ids": True}]
    events = events_of(resp.text)
    if chat:
        text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
        assert all(e["object"] == "chat.completion.chunk" and e["id"] == "chat-1" for e in events if e.get("choices"))
    else:
        text = "".join(c.get("text", "") for e in events for c in e.get("choices", []))
        assert all(e["id"] == "cmpl-1" for e in events if e.get("choices"))
    assert text == "abcd"  # one uninterrupted stream
    assert resp.text.count("data: [DONE]") == 1 and "error" not in resp.text
    assert "token_ids" not in resp.text and "prompt_token_ids" not in resp.text  # the client did not ask for them
    usage = events[-1]["usage"]
    assert usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert metrics.migrations.labels(outcome="continued")._value.get() == 1
    assert door.admission.active == 0


def test_a_stream_that_cannot_be_continued_ends_with_one_error_event() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=chunk("a", [1], [5]) + '\n\ndata: {"choi',
                              headers={"content-type": "text/event-stream"})

    door, metrics, seen = door_with(handler, ready=0)  # no other engine to go on on
    resp = asyncio.run(post(door, True))
    assert resp.status_code == 200 and resp.text.count('"error"') == 1
    assert metrics.migrations.labels(outcome="failed")._value.get() == 1
    assert metrics.errors.labels(kind="stream_broken")._value.get() == 1


def test_an_engine_that_reports_its_death_in_the_stream_is_migrated_like_a_broken_one() -> None:
    """vLLM's API server, on SIGTERM or an EngineCore death, ends a stream with an error event and [DONE]."""
    seen_cont: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "engine":
            error = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError",
                               "code": 500}}
            text = chunk("a", [1], [5, 6]) + "\n\ndata: " + json.dumps(error) + "\n\ndata: [DONE]\n\n"
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        seen_cont.append(f"{request.url.host}{request.url.path}")
        return httpx.Response(200, text=chunk("b", [2], [5, 6, 1], finish="length") + "\n\ndata: [DONE]\n\n",
                              headers={"content-type": "text/event-stream"})

    door, metrics, _ = door_with(handler)
    resp = asyncio.run(post(door, True))
    assert resp.status_code == 200 and '"error"' not in resp.text
    assert "".join(c.get("text", "") for e in events_of(resp.text) for c in e.get("choices", [])) == "ab"
    assert seen_cont == ["p0/whole/v1/completions"]
    assert metrics.migrations.labels(outcome="continued")._value.get() == 1


@pytest.mark.parametrize("wants_usage", [False, True])
def test_an_engine_that_dies_after_the_last_token_ends_the_stream_whole(wants_usage: bool) -> None:
    """The fault matrix (SIGTERM of the decode engine, CI): a stream whose every token, finish_reason included, had
    reached the client, then the engine's error event instead of its usage and [DONE]: the client got the error and
    the harness a lost request. Nothing is left to continue: the stream ends with [DONE] (its usage counted here)."""
    def handler(request: httpx.Request) -> httpx.Response:
        error = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "code": 500}}
        text = (chunk("a", [1], [5, 6]) + "\n\n" + chunk("b", [2], finish="length") + "\n\ndata: "
                + json.dumps(error) + "\n\ndata: [DONE]\n\n")
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    door, metrics, seen = door_with(handler)

    async def go() -> httpx.Response:
        body = {"model": "m", "prompt": list(range(100)), "max_tokens": 3, "stream": True,
                **({"stream_options": {"include_usage": True}} if wants_usage else {})}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(door.app()), base_url="http://door") as client:
            return await client.post("/v1/completions", json=body)

    resp = asyncio.run(go())
    assert resp.status_code == 200 and '"error"' not in resp.text and resp.text.endswith("data: [DONE]\n\n")
    assert "".join(c.get("text", "") for e in events_of(resp.text) for c in e.get("choices", [])) == "ab"
    usage = [e["usage"] for e in events_of(resp.text) if e.get("usage")]
    assert usage == ([{"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}] if wants_usage else [])
    assert seen == ["engine/v1/completions"]  # nothing continued elsewhere
    assert metrics.errors.labels(kind="stream_broken")._value.get() == 0
    assert metrics.requests.labels(route="/v1/completions", status="200")._value.get() == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_503_never_names_an_internal_address(stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The engine's connection error names its host and port; the client's 503 does not (the log does)."""
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Cannot connect to host 10.1.2.3:18001 ssl:default [Connect call failed "
                                 "('10.1.2.3', 18001)] via http://engine-host.internal:18001/v1")

    door, metrics, _ = door_with(handler, ready=0)
    with caplog.at_level("WARNING"):
        resp = asyncio.run(post(door, stream))
    assert resp.status_code == 503 and resp.headers["retry-after"]
    body = resp.text
    assert "no prefill engine can serve" in body
    assert "10.1.2.3" not in body and "18001" not in body and "engine-host" not in body, body
    assert "10.1.2.3:18001" in caplog.text  # the operator still sees where


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_prefill_engine_that_cannot_serve_a_failover_passes_it_on(stream: bool, status: int) -> None:
    """A rolling restart: the prefill engine the failover went to is going down and answers 500; the request is
    served by the next one, never relayed as the client's 500 (seen once in the fault matrix)."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "p0":
            return httpx.Response(status, json={"error": {"message": "EngineDeadError"}})
        return engine_answer(request)

    door, metrics, seen = door_with(handler, down="reloading", ready=2)
    resp = asyncio.run(post(door, stream))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "failover", resp.text
    assert seen == ["p0/whole/v1/completions", "p1/whole/v1/completions"]
    assert door.placement.failovers == 0 and door.admission.active == 0


SIBLINGS = {"decode-worker@b": "http://sib-b", "decode-worker@c": "http://sib-c"}


def refusing_siblings(refusal: int | str) -> Any:
    """A handler whose sibling front doors answer ``refusal`` (a status, or "refused": no connection); engines serve."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host.startswith("sib-"):
            if refusal == "refused":
                raise httpx.ConnectError("connection refused")
            return httpx.Response(int(refusal), json={"error": {"message": "busy"}})
        return engine_answer(request)
    return handler


@pytest.mark.parametrize("stream", [False, True])
def test_while_the_decode_engine_is_down_a_sibling_decode_worker_serves_first(stream: bool) -> None:
    """Instances: the request goes to another decode-worker's front door (its own prefill and decode engine) with
    the client's key and the hop mark, not to a prefill engine; the load counted there is given back."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return engine_answer(request)

    door, metrics, seen = door_with(handler, down="reloading: it died", siblings=SIBLINGS)
    resp = asyncio.run(post(door, stream, {"authorization": "Bearer k1"}))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "sibling", resp.text
    assert seen == ["sib-b/v1/completions"]
    assert sent[0].headers["authorization"] == "Bearer k1" and sent[0].headers["x-disagg-forwarded"] == "1"
    assert paths(metrics, "sibling") == 1 and paths(metrics, "failover") == 0
    assert door.router.load == {} and door.placement.failovers == 0 and door.admission.active == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("refusal", [429, 401, 503, "refused"])
def test_a_sibling_that_cannot_take_it_passes_it_to_the_next_then_to_a_prefill_engine(refusal: int | str) -> None:
    door, metrics, seen = door_with(refusing_siblings(refusal), down="loading", siblings=SIBLINGS)
    resp = asyncio.run(post(door, True))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "failover", resp.text
    assert seen == ["sib-b/v1/completions", "sib-c/v1/completions", "p0/whole/v1/completions"]
    assert door.router.load == {} and door.placement.failovers == 0 and door.admission.active == 0  # type: ignore[attr-defined]


def test_a_request_a_sibling_passed_on_goes_to_a_prefill_engine_never_a_third_front_door() -> None:
    door, metrics, seen = door_with(engine_answer, down="loading", siblings=SIBLINGS)
    resp = asyncio.run(post(door, False, {"x-disagg-forwarded": "1"}))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "failover"
    assert seen == ["p0/whole/v1/completions"]


def test_a_stream_whose_decode_engine_dies_goes_on_on_a_sibling_decode_worker_first() -> None:
    continuations: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "engine":
            return httpx.Response(200, text=chunk("a", [1], [5, 6]) + '\n\ndata: {"choi',
                                  headers={"content-type": "text/event-stream"})
        continuations.append(request)
        text = (chunk("b", [2], [5, 6, 1]) + "\n\n" + chunk("c", [3], finish="length") + "\n\n" + "data: [DONE]\n\n")
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    door, metrics, seen = door_with(handler, siblings=SIBLINGS)
    resp = asyncio.run(post(door, True, {"authorization": "Bearer k1"}))
    assert resp.status_code == 200 and "error" not in resp.text
    assert "".join(c.get("text", "") for e in events_of(resp.text) for c in e.get("choices", [])) == "abc"
    assert [f"{r.url.host}{r.url.path}" for r in continuations] == ["sib-b/v1/completions"]
    assert continuations[0].headers["authorization"] == "Bearer k1"
    assert continuations[0].headers["x-disagg-forwarded"] == "1"
    assert json.loads(continuations[0].content)["prompt"] == [5, 6, 1]
    assert metrics.migrations.labels(outcome="continued")._value.get() == 1


def test_a_stream_moved_to_a_sibling_that_breaks_goes_on_on_the_own_engine_as_an_engine_call() -> None:
    """The rest of a stream whose sibling broke is continued on this front door's own engine: that call (its prompt
    very likely in LMCache) is an engine call, never aborted while the engine loads it (edge/upstream.py)."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "sib-b":
            return httpx.Response(200, text=chunk("a", [1], [5, 6]) + '\n\ndata: {"choi',
                                  headers={"content-type": "text/event-stream"})
        text = (chunk("b", [2], [5, 6, 1]) + "\n\n" + chunk("c", [3], finish="length") + "\n\n" + "data: [DONE]\n\n")
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    door, _metrics, seen = door_with(handler, siblings=SIBLINGS)
    door.router.lighter = True  # type: ignore[attr-defined]
    resp = asyncio.run(post(door, True, shared=True))
    assert resp.status_code == 200 and "error" not in resp.text
    assert seen == ["sib-b/v1/completions", "engine/v1/completions"]
    assert door.client.orphaned == ["http://engine/v1/completions"]  # type: ignore[attr-defined]


def test_a_sibling_that_refuses_a_continuation_passes_it_to_the_next() -> None:
    tried: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "engine":
            return httpx.Response(200, text=chunk("a", [1], [5, 6]) + '\n\ndata: {"choi',
                                  headers={"content-type": "text/event-stream"})
        tried.append(request.url.host)
        if request.url.host == "sib-b":
            return httpx.Response(429, json={"error": {"message": "too many requests in progress"}})
        text = chunk("b", [2], [5, 6, 1]) + "\n\n" + chunk("c", [3], finish="length") + "\n\n" + "data: [DONE]\n\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    door, metrics, seen = door_with(handler, siblings=SIBLINGS)
    resp = asyncio.run(post(door, True))
    assert resp.status_code == 200 and "error" not in resp.text
    assert "".join(c.get("text", "") for e in events_of(resp.text) for c in e.get("choices", [])) == "abc"
    assert tried == ["sib-b", "sib-c"]
    assert metrics.migrations.labels(outcome="continued")._value.get() == 1


def forwards(metrics: FrontDoorMetrics, why: str) -> float:
    return metrics.sibling_forwards.labels(why=why)._value.get()


@pytest.mark.parametrize("stream", [False, True])
def test_the_box_s_endpoint_sends_a_request_to_a_lighter_sibling_and_a_door_s_own_port_never_does(
        stream: bool) -> None:
    """decode_worker.shared_port: a request that came in on the box's endpoint goes to the sibling whose engine
    holds fewer requests (path sibling, why load, the client's key and the hop mark); the same request on this
    front door's own port stays on its engine; one a sibling passed on is never moved again."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return engine_answer(request)

    door, metrics, seen = door_with(handler, siblings=SIBLINGS)
    door.router.lighter = True  # type: ignore[attr-defined]
    resp = asyncio.run(post(door, stream, {"authorization": "Bearer k1"}, shared=True))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "sibling", resp.text
    assert seen == ["sib-b/v1/completions"]
    assert sent[0].headers["authorization"] == "Bearer k1" and sent[0].headers["x-disagg-forwarded"] == "1"
    assert forwards(metrics, "load") == 1 and forwards(metrics, "engine_down") == 0
    assert door.router.requests == {} and door.router.load == {}  # type: ignore[attr-defined]
    assert door.admission.active == 0 and door.placement.engine_requests() == 0
    for headers, shared in (({}, False), ({"x-disagg-forwarded": "1"}, True)):
        seen.clear()
        resp = asyncio.run(post(door, stream, headers, shared=shared))
        assert resp.status_code == 200 and resp.headers["x-disagg-path"] != "sibling", resp.text
        assert seen == ["engine/v1/completions"]
    assert forwards(metrics, "load") == 1


@pytest.mark.parametrize("refusal", [503, "refused"])
def test_a_request_sent_away_by_load_that_the_sibling_cannot_take_is_served_here(refusal: int | str) -> None:
    """Moved by load, not because this engine is down: a sibling that fails it hands it back to this engine, never
    to a prefill engine whole (failover is for an engine that cannot serve)."""
    door, metrics, seen = door_with(refusing_siblings(refusal), siblings=SIBLINGS)
    door.router.lighter = True  # type: ignore[attr-defined]
    resp = asyncio.run(post(door, True, shared=True))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] not in ("sibling", "failover"), resp.text
    assert seen == ["sib-b/v1/completions", "engine/v1/completions"]
    assert paths(metrics, "failover") == 0 and door.placement.failovers == 0 and door.admission.active == 0
    assert door.router.requests == {} and door.router.load == {}  # type: ignore[attr-defined]


def test_a_sibling_taking_a_down_engine_s_request_is_counted_as_engine_down() -> None:
    door, metrics, seen = door_with(engine_answer, down="loading", siblings=SIBLINGS)
    resp = asyncio.run(post(door, False, shared=True))
    assert resp.headers["x-disagg-path"] == "sibling" and seen == ["sib-b/v1/completions"]
    assert forwards(metrics, "engine_down") == 1 and forwards(metrics, "load") == 0


@pytest.mark.parametrize("sibling_answer", [200, 429])
def test_a_full_front_door_on_the_box_s_endpoint_sends_the_request_to_a_sibling_with_room(sibling_answer: int) -> None:
    """One admission for the box: its one slot taken, this front door relays a request from the box's endpoint to a
    sibling with a free slot (path sibling, why full) instead of queueing it; if that sibling refuses it too, the
    box is full: 429 + Retry-After. On the door's own port the same request waits its turn (none may: 429)."""
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "engine":
            await release.wait()
            return engine_answer(request)
        if sibling_answer != 200:
            return httpx.Response(sibling_answer, json={"error": {"message": "busy"}})
        return engine_answer(request)

    door, metrics, seen = door_with(handler, siblings=SIBLINGS, max_concurrent_requests=1, max_queued_requests=0)
    door.router.roomy = True  # type: ignore[attr-defined]

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        first = asyncio.create_task(post(door, False))
        while door.admission.active < 1:
            await asyncio.sleep(0.01)
        own = await post(door, False)  # its own port: no room, no queue
        shared = await post(door, False, shared=True)
        release.set()
        assert (await first).status_code == 200
        return own, shared

    own, shared = asyncio.run(scenario())
    assert own.status_code == 429
    if sibling_answer == 200:
        assert shared.status_code == 200 and shared.headers["x-disagg-path"] == "sibling", shared.text
    else:
        assert shared.status_code == 429 and shared.headers["retry-after"], shared.text
    assert seen.count("sib-b/v1/completions") == 1 and forwards(metrics, "full") == 1
    assert door.admission.active == 0 and door.router.requests == {}  # type: ignore[attr-defined]
