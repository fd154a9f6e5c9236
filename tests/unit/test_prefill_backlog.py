"""Overflow: while prefill is backed up, the decode engine computes a bounded amount of prompt itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemons.edge.door_settings import FrontDoorSettings
from daemons.edge.frontdoor import FrontDoor
from daemons.metrics import FrontDoorMetrics
from daemons.routing.prefill_backlog import Backlog

from .fakes import FakeUpstream, OnePrefill, until

ANSWER = {"choices": [{"text": "x"}], "usage": {"prompt_tokens": 1000, "completion_tokens": 1,
                                                "prompt_tokens_details": {"cached_tokens": 768}}}


def test_overflow_needs_a_backlog_at_prefill_and_room_on_the_decode_engine() -> None:
    b = Backlog(overflow_backlog_tokens=2000, overflow_max_local_tokens=1500)
    assert not b.overflow(1000)  # nothing queued at prefill
    with b.at_prefill(1000):
        assert not b.overflow(1000)  # 1,000 < 2,000
        with b.at_prefill(1000):
            assert b.overflow(1000)
            with b.on_decode(1000):
                assert not b.overflow(1000)  # 2,000 > 1,500 on the decode engine
                assert b.overflow(500)
            assert b.overflow(1500)
        assert (b.prefill_tokens, b.local_tokens) == (1000, 0)
    assert (b.prefill_tokens, b.local_tokens) == (0, 0)


def test_off_by_default_and_counts_survive_exceptions() -> None:
    b = Backlog()
    with b.at_prefill(10**6):
        assert not b.overflow(1)
    with pytest.raises(RuntimeError), b.on_decode(5):
        raise RuntimeError("engine gone")
    assert b.local_tokens == 0
    with pytest.raises(ValueError):
        Backlog(-1, 0)


def sample(metrics: FrontDoorMetrics, where: str) -> float | None:
    return metrics.registry.get_sample_value("disagg_prompt_tokens_in_flight", {"where": where})



def test_the_front_door_overflows_while_prefill_calls_are_stuck_and_stops_after(tmp_path: Path) -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        decode_gate = asyncio.Event()

        async def handler(request: httpx.Request) -> httpx.Response:
            if request.url.host == "prefill":
                await release.wait()  # the prefill GPU is busy until the test says otherwise
                return httpx.Response(200, json=ANSWER, headers={"x-disagg-kv-expected-tokens": "768",
                                                                 "x-disagg-kv-stored-tokens": "768"})
            if json.loads(request.content).get("max_tokens") == 7:  # the overflowed prompts
                await decode_gate.wait()
            return httpx.Response(200, json=ANSWER)

        metrics = FrontDoorMetrics(CollectorRegistry())
        router = OnePrefill()
        settings = FrontDoorSettings(engine_url="http://engine", prefill_timeout_s=30, disaggregate_min_tokens=0,
                                     overflow_backlog_tokens=2000, overflow_max_local_tokens=1000)
        door = FrontDoor(settings, client=FakeUpstream(handler), metrics=metrics, router=router,  # type: ignore
                         health=lambda: ("ready", True, ""))
        transport = httpx.ASGITransport(door.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://door", timeout=60) as client:
            def send(max_tokens: int = 1) -> asyncio.Task[httpx.Response]:
                body: dict[str, Any] = {"model": "m", "prompt": list(range(1000)), "max_tokens": max_tokens}
                return asyncio.create_task(client.post("/v1/completions", json=body))

            stuck = [send(), send()]  # 2,000 tokens at prefill: the backlog is reached
            await until(lambda: door.placement.backlog.prefill_tokens == 2000, "two prefill calls held")
            local = send(7)  # overflows: the decode engine computes it (held at the decode engine)
            await until(lambda: door.placement.backlog.local_tokens == 1000, "the overflow at the decode engine")
            assert router.asked == 2
            assert sample(metrics, "prefill") == 2000 and sample(metrics, "decode") == 1000
            third = send()  # the decode engine's share is full: this one queues at prefill
            await until(lambda: door.placement.backlog.prefill_tokens == 3000, "the third call at prefill")
            assert router.asked == 3
            decode_gate.set()
            resp = await asyncio.wait_for(local, 30)
            assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "prefill_busy"
            release.set()
            for r in await asyncio.wait_for(asyncio.gather(*stuck, third), 30):
                assert r.status_code == 200 and r.headers["x-disagg-path"] == "disaggregated"
        assert (door.placement.backlog.prefill_tokens, door.placement.backlog.local_tokens) == (0, 0)
        assert metrics.paths.labels(path="prefill_busy")._value.get() == 1
        assert metrics.paths.labels(path="disaggregated")._value.get() == 3
        assert metrics.fallbacks.labels(reason="prefill_timeout")._value.get() == 0
        assert sample(metrics, "prefill") == 0 and sample(metrics, "decode") == 0

    asyncio.run(asyncio.wait_for(scenario(), 30))
