"""Server-Timing: every answer says where its time went, and the stages add up to its time to first token.

With fakes that take known times (a prefill-worker that answers after 120 ms, 30 of them waiting for LMCache;
a decode engine whose first token comes after 80 ms): the header's stages, their sum against the time the
client measured, a stream's final comment when the client asks, and the stage histograms."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemons.edge import timing
from daemons.edge.door_settings import FrontDoorSettings
from daemons.edge.frontdoor import FrontDoor
from daemons.metrics import FrontDoorMetrics

from .fakes import FakeUpstream, OnePrefill

PREFILL_S, STORE_MS, DECODE_S = 0.12, 30.0, 0.08


def door() -> tuple[FrontDoor, FrontDoorMetrics]:
    metrics = FrontDoorMetrics(CollectorRegistry())

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.host == "p0":
            await asyncio.sleep(PREFILL_S)
            return httpx.Response(200, json={"choices": [{"text": "a"}]}, headers={
                "x-disagg-kv-expected-tokens": "256", "x-disagg-kv-stored-tokens": "256",
                "x-disagg-store-wait-ms": str(STORE_MS)})
        await asyncio.sleep(DECODE_S)
        usage = {"prompt_tokens": 300, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 256}}
        if body.get("stream"):
            text = ('data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n'
                    f'data: {json.dumps({"choices": [], "usage": usage})}\n\ndata: [DONE]\n\n')
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"choices": [{"text": "ab"}], "usage": usage})

    settings = FrontDoorSettings(engine_url="http://engine", disaggregate_min_tokens=0)
    front = FrontDoor(settings, client=FakeUpstream(handler), metrics=metrics, router=OnePrefill(url="http://p0"),  # type: ignore
                      health=lambda: ("ready", True, ""))
    return front, metrics


async def send(front: FrontDoor, stream: bool, ask: bool = False) -> tuple[httpx.Response, float]:
    body: dict[str, Any] = {"model": "m", "prompt": list(range(300)), "max_tokens": 2, "stream": stream}
    headers = {timing.ASK_HEADER: "1"} if ask else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(front.app()), base_url="http://door",
                                 timeout=10) as client:
        t0 = time.monotonic()
        if not stream:
            resp = await client.post("/v1/completions", json=body, headers=headers)
            return resp, time.monotonic() - t0
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
            seen = time.monotonic() - t0  # the headers come with the first token
            await resp.aread()
        return resp, seen


@pytest.mark.parametrize("stream", [False, True])
def test_every_answer_says_where_its_time_went_and_the_stages_add_up(stream: bool) -> None:
    front, metrics = door()
    resp, client_ttft = asyncio.run(send(front, stream))
    stages = timing.parse(resp.headers["server-timing"])
    assert stages["path"] == "disaggregated"
    assert set(stages) >= {"read", "queue", "prefill", "store", "decode", "ttft"}
    assert stages["prefill"] >= PREFILL_S * 1000 and stages["store"] == STORE_MS
    assert stages["decode"] >= DECODE_S * 1000
    parts = sum(float(stages[s]) for s in ("read", "queue", "prefill", "decode"))
    ttft = float(stages["ttft"])
    # The stages are disjoint parts of the time to the first token (how much else the front door spent between them
    # is the machine's business, not a bound to test here).
    assert parts <= ttft, stages
    assert ttft <= client_ttft * 1000 + 1.0  # never more than the client measured
    for stage in ("queue", "prefill", "decode", "ttft"):
        assert metrics.stages.labels(stage=stage)._sum.get() > 0


def test_a_stream_whose_client_asks_ends_with_the_whole_breakdown() -> None:
    front, metrics = door()
    resp, _ = asyncio.run(send(front, True, ask=True))
    comments = [line for line in resp.text.split("\n\n") if line.startswith(timing.COMMENT)]
    assert len(comments) == 1 and resp.text.index(comments[0]) < resp.text.index("data: [DONE]")
    final = timing.parse(comments[0][len(timing.COMMENT):])
    assert final["total"] >= final["ttft"] and final["path"] == "disaggregated"
    plain, _ = asyncio.run(send(front, True))
    assert timing.COMMENT not in plain.text  # not asked: nothing a strict parser could trip on
    assert metrics.stages.labels(stage="total")._sum.get() > 0


def test_the_header_format() -> None:
    t = timing.Timing(t0=0.0, stages={"queue": 0.0012, "prefill": 0.1204, "ttft": 0.2})
    assert t.header("fallback") == 'queue;dur=1.2, prefill;dur=120.4, ttft;dur=200.0, path;desc="fallback"'
    assert timing.parse(t.header("fallback")) == {"queue": 1.2, "prefill": 120.4, "ttft": 200.0, "path": "fallback"}
