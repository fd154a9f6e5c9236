"""Short prompts under load go whole to the less busy engine (daemons.routing.engine_share), with fakes:
the rule itself, and a front door whose engines hold their requests until the test lets them go."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemons.edge.door_settings import FrontDoorSettings
from daemons.edge.frontdoor import FrontDoor
from daemons.metrics import FrontDoorMetrics
from daemons.routing.engine_share import EngineShare

from .fakes import FakeUpstream, OnePrefill, until

ANSWER = {"choices": [{"text": "x"}], "usage": {"prompt_tokens": 100, "completion_tokens": 3}}
STREAM = ('data: {"choices":[{"text":"x"}]}\n\n'
          'data: {"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":1}}\n\ndata: [DONE]\n\n')


def test_the_rule_balances_requests_in_progress_and_is_off_by_default() -> None:
    assert not EngineShare().to_prefill(10, 0, 1)
    share = EngineShare(enabled=True)
    assert not share.to_prefill(10, 0, 0)  # no working prefill engine
    assert not share.to_prefill(0, 0, 1)  # nothing in progress: the decode engine (no extra hop)
    assert share.to_prefill(1, 0, 1)  # the decode engine holds one, the prefill engine none
    share.taken()
    assert not share.to_prefill(2, 0, 1)  # one each
    assert share.to_prefill(3, 0, 1)
    assert not share.to_prefill(4, 1, 1)  # a prefill call in flight is the prefill engine's too
    assert share.to_prefill(4, 1, 2)  # ...shared among the working prefill engines
    share.released()
    with pytest.raises(RuntimeError):
        share.released()



def door_with(handler: Any, *, balance: bool = True) -> tuple[FrontDoor, FrontDoorMetrics, OnePrefill]:
    metrics = FrontDoorMetrics(CollectorRegistry())
    router = OnePrefill()
    settings = FrontDoorSettings(engine_url="http://engine", prefill_timeout_s=30, max_concurrent_requests=64,
                                 max_queued_requests=64, queue_timeout_s=10.0, disaggregate_min_tokens=500,
                                 short_prompt_max_in_flight=1, balance_short_prompts=balance)
    door = FrontDoor(settings, client=FakeUpstream(handler), metrics=metrics, router=router,  # type: ignore
                     health=lambda: ("ready", True, ""))
    return door, metrics, router


def engine_answer(request: httpx.Request) -> httpx.Response:
    """An engine's answer to ``request``: a stream if it asked for one."""
    if json.loads(request.content).get("stream"):
        return httpx.Response(200, text=STREAM, headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json=ANSWER)


def test_under_load_short_prompts_alternate_between_the_engines_streamed_or_not() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        seen: list[str] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.url.host}{request.url.path}")
            assert request.url.path.endswith("/v1/completions")
            await gate.wait()  # every engine is busy until the test says otherwise
            return engine_answer(request)

        door, metrics, router = door_with(handler)
        transport = httpx.ASGITransport(door.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://door", timeout=60) as client:
            tasks = []
            for i in range(4):
                body = {"model": "m", "prompt": list(range(100)), "max_tokens": 3, "stream": i % 2 == 1}
                tasks.append(asyncio.create_task(client.post("/v1/completions", json=body)))
                await until(lambda i=i: len(seen) == i + 1, f"request {i} at an engine")
            # quiet -> decode engine; then the less busy side each time: prefill, decode, prefill
            assert seen == ["engine/v1/completions", "prefill/whole/v1/completions",
                            "engine/v1/completions", "prefill/whole/v1/completions"]
            assert door.placement.share.on_prefill == 2
            gate.set()
            answers = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert [r.status_code for r in answers] == [200] * 4
        assert [r.headers["x-disagg-path"] for r in answers] == ["short_prompt", "decode_busy"] * 2
        assert "x" in answers[3].text  # the streamed answer came through the prefill-worker
        assert door.placement.share.on_prefill == 0 and door.admission.active == 0
        assert metrics.paths.labels(path="decode_busy")._value.get() == 2
        assert metrics.paths.labels(path="short_prompt")._value.get() == 2
        assert router.reports == []  # no prefill call, no fallback

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("failure", ["refused", "503"])
def test_a_prefill_worker_that_cannot_serve_the_whole_request_leaves_it_to_the_decode_engine(
        stream: bool, failure: str) -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        at_engine: list[str] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            if request.url.host == "prefill":
                if failure == "refused":
                    raise httpx.ConnectError("connection refused")
                return httpx.Response(503, json={"error": {"message": "prefill engine unavailable"}})
            at_engine.append(request.url.path)
            await gate.wait()
            return engine_answer(request)

        door, metrics, router = door_with(handler)
        transport = httpx.ASGITransport(door.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://door", timeout=60) as client:
            body = {"model": "m", "prompt": list(range(100)), "max_tokens": 3, "stream": stream}
            first = asyncio.create_task(client.post("/v1/completions", json=body))
            # At the decode engine, so placed: merely admitted, it may be placed after the second (a loaded CPU).
            await until(lambda: len(at_engine) == 1, "the first request at the decode engine")
            second = asyncio.create_task(client.post("/v1/completions", json=body))
            await until(lambda: len(router.reports) == 1, "the second request's fallback")
            gate.set()
            answers = await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert [r.status_code for r in answers] == [200, 200]
        assert answers[1].headers["x-disagg-path"] == "fallback"
        assert answers[1].headers["x-disagg-fallback-reason"] == "prefill_unreachable"
        assert door.placement.share.on_prefill == 0 and door.admission.active == 0
        assert metrics.paths.labels(path="decode_busy")._value.get() == 0

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_without_balancing_short_prompts_under_load_are_disaggregated() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        seen: list[str] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.url.host}{request.url.path}")
            if request.url.host == "prefill":
                return httpx.Response(200, json=ANSWER, headers={"x-disagg-kv-expected-tokens": "0"})
            await gate.wait()
            return httpx.Response(200, json=ANSWER)

        door, _, _ = door_with(handler, balance=False)
        transport = httpx.ASGITransport(door.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://door", timeout=60) as client:
            body = {"model": "m", "prompt": list(range(100)), "max_tokens": 3}
            tasks = [asyncio.create_task(client.post("/v1/completions", json=body))]
            await until(lambda: len(seen) == 1, "the first request at the decode engine")
            tasks.append(asyncio.create_task(client.post("/v1/completions", json=body)))
            await until(lambda: len(seen) == 3, "the second request's prefill call and decode")
            gate.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert seen == ["engine/v1/completions", "prefill/v1/completions", "engine/v1/completions"]

    asyncio.run(asyncio.wait_for(scenario(), 30))
