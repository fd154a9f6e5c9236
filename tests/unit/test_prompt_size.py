"""Short prompts skip the prefill call: the prompt-length estimate and the front door's choice."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from daemons.routing.prompt_size import DEFAULT_BYTES_PER_TOKEN, MIN_SAMPLES, PromptSizer

from .test_edge import front_door, post

ROUTE = "/v1/completions"


def test_token_ids_are_counted_exactly() -> None:
    sizer = PromptSizer()
    assert sizer.estimate(ROUTE, {"prompt": list(range(300))}) == 300
    assert sizer.estimate(ROUTE, {"prompt": [[1, 2], list(range(500))]}) == 500  # the longest of a batch


def test_text_is_estimated_from_bytes_until_the_engine_has_counted_some() -> None:
    sizer = PromptSizer()
    text = "word " * 600  # 3,000 bytes
    assert sizer.estimate(ROUTE, {"prompt": text}) == round(3000 / DEFAULT_BYTES_PER_TOKEN)
    for _ in range(MIN_SAMPLES):
        sizer.learn(ROUTE, {"prompt": text}, 600)  # the engine said: 600 tokens, 5 bytes each
    assert sizer.estimate(ROUTE, {"prompt": "word " * 100}) == 100
    assert sizer.bytes_per_token("/v1/chat/completions") == DEFAULT_BYTES_PER_TOKEN  # learnt per route


def test_chat_messages_count_their_text_parts() -> None:
    body = {"messages": [{"role": "system", "content": "ab"},
                         {"role": "user", "content": [{"type": "text", "text": "cdef"}, {"type": "image_url"}]},
                         "not a message"]}
    assert PromptSizer.prompt_bytes(body) == 6


def test_what_cannot_teach_is_ignored() -> None:
    sizer = PromptSizer()
    for _ in range(MIN_SAMPLES):
        sizer.learn(ROUTE, {"prompt": ["a b c", "d e f"]}, 6)  # usage sums several prompts
        sizer.learn(ROUTE, {"prompt": [1, 2, 3]}, 3)  # token ids are exact anyway
        sizer.learn(ROUTE, {"prompt": "abc"}, None)
        sizer.learn(ROUTE, {"prompt": "abc"}, "3")
        sizer.learn(ROUTE, {"prompt": ""}, 1)
    assert sizer.bytes_per_token(ROUTE) == DEFAULT_BYTES_PER_TOKEN


class CountingRouter:
    """Stands in for PrefillRouter: counts the choices asked of it, says no prefill is available."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.asked = 0

    def choose(self):  # type: ignore[no-untyped-def]
        self.asked += 1
        return self.real.choose()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def test_a_short_prompt_skips_prefill_and_is_counted_as_its_own_path(tmp_path: Path) -> None:
    door = front_door(tmp_path, disaggregate_min_tokens=257)
    router = CountingRouter(door.router)
    door.router = router  # type: ignore[assignment]
    short = json.dumps({"model": "m", "prompt": list(range(256))}).encode()
    resp = asyncio.run(post(door, short))
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "short_prompt"
    assert router.asked == 0, "a short prompt still asked for a prefill-worker"
    assert door.metrics.paths.labels(path="short_prompt")._value.get() == 1
    assert door.metrics.fallbacks.labels(reason="prefill_unavailable")._value.get() == 0

    long = json.dumps({"model": "m", "prompt": list(range(257))}).encode()
    resp = asyncio.run(post(door, long))
    assert router.asked == 1 and resp.headers["x-disagg-path"] == "fallback"  # no prefill-worker here


def test_threshold_zero_sends_every_prompt_to_prefill(tmp_path: Path) -> None:
    door = front_door(tmp_path, disaggregate_min_tokens=0)
    resp = asyncio.run(post(door, json.dumps({"model": "m", "prompt": [1]}).encode()))
    assert resp.headers["x-disagg-path"] == "fallback"


def test_the_front_door_learns_bytes_per_token_from_the_engines_answers(tmp_path: Path) -> None:
    answer = {"choices": [{"text": "x"}], "usage": {"prompt_tokens": 100, "completion_tokens": 1}}
    door = front_door(tmp_path, httpx.MockTransport(lambda r: httpx.Response(200, json=answer)),
                      disaggregate_min_tokens=257)
    text = "abcd " * 200  # 1,000 bytes, 100 tokens by the engine's count: 10 bytes per token
    for _ in range(MIN_SAMPLES):
        asyncio.run(post(door, json.dumps({"model": "m", "prompt": text}).encode()))
    assert door.placement.sizer.bytes_per_token(ROUTE) == 10.0
    resp = asyncio.run(post(door, json.dumps({"model": "m", "prompt": "abcd " * 500}).encode()))
    assert resp.headers["x-disagg-path"] == "short_prompt"  # 2,500 bytes: ~250 tokens


def test_under_load_short_prompts_go_to_prefill_too(tmp_path: Path) -> None:
    door = front_door(tmp_path, disaggregate_min_tokens=257, short_prompt_max_in_flight=1)
    router = CountingRouter(door.router)
    door.router = router  # type: ignore[assignment]
    short = {"model": "m", "prompt": list(range(100))}
    quiet = door.placement.short_prompt(door.placement.sizer.estimate("/v1/completions", short))  # nothing else in progress
    assert quiet is not None and quiet.path == "short_prompt"

    async def while_busy() -> httpx.Response:
        await door.admission.acquire()  # another request in progress: 2 with this one
        try:
            return await post(door, json.dumps(short).encode())
        finally:
            door.admission.release()

    resp = asyncio.run(while_busy())
    assert router.asked == 1 and resp.headers["x-disagg-path"] == "fallback"  # it asked for prefill
