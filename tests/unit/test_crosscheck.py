"""The KV cross-check: the decode engine's first token against the prefill engine's own, for greedy requests.

The logic (parsing both engines' answers, the verdict and its tolerance), then the front door with fakes: a
prefill-worker whose header names a first token, a decode engine that agrees or not, streamed and not,
completions and chat; the client sees neither the token ids nor the log-probabilities it did not ask for."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemons.edge.door_settings import FrontDoorSettings
from daemons.edge.frontdoor import FrontDoor
from daemons.kv import crosscheck
from daemons.kv.crosscheck import FirstToken, judge
from daemons.metrics import FrontDoorMetrics

from .fakes import FakeUpstream, OnePrefill


def test_greedy_is_temperature_zero_one_choice_no_bias() -> None:
    assert crosscheck.greedy({"temperature": 0})
    assert crosscheck.greedy({"temperature": 0.0, "n": 1})
    assert not crosscheck.greedy({})  # the engine's default temperature samples
    assert not crosscheck.greedy({"temperature": 0.7})
    assert not crosscheck.greedy({"temperature": 0, "n": 2})
    assert not crosscheck.greedy({"temperature": 0, "logit_bias": {"5": 100}})
    assert not crosscheck.greedy({"temperature": 0, "min_tokens": 3})
    assert not crosscheck.greedy({"temperature": False})


def test_the_prefill_engines_first_token_is_read_from_completions_and_chat() -> None:
    completions = {"choices": [{"text": "a", "token_ids": [7], "logprobs": {
        "tokens": ["token_id:7"], "token_logprobs": [-0.5],
        "top_logprobs": [{"token_id:7": -0.5, "token_id:9": -1.25, "token_id:3": -3.0}]}}]}
    assert crosscheck.prefill_first_token(completions) == FirstToken(7, -0.5, {7: -0.5, 9: -1.25, 3: -3.0})
    chat = {"choices": [{"message": {"content": "a"}, "token_ids": [7], "logprobs": {"content": [
        {"token": "token_id:7", "logprob": -0.5, "top_logprobs": [{"token": "token_id:7", "logprob": -0.5},
                                                                  {"token": "token_id:9", "logprob": -1.25}]}]}}]}
    assert crosscheck.prefill_first_token(chat) == FirstToken(7, -0.5, {7: -0.5, 9: -1.25})
    assert crosscheck.prefill_first_token({"choices": []}) is None
    header = crosscheck.first_token_header(FirstToken(7, -0.5, {7: -0.5, 9: -1.25, 3: -3.0}))
    assert header == "7:-0.5,9:-1.25,3:-3"
    assert crosscheck.parse_first_token_header(header) == FirstToken(7, -0.5, {7: -0.5, 9: -1.25, 3: -3.0})
    for garbage in ("", "x", "7", "7:y", "a:1"):
        assert crosscheck.parse_first_token_header(garbage) is None


def test_the_verdict_same_token_near_tie_or_mismatch() -> None:
    prefill = FirstToken(7, -0.5, {7: -0.5, 9: -0.52, 3: -4.0})
    assert judge(prefill, FirstToken(7, -0.5001, {}), 0.05).result == "match"
    assert judge(prefill, FirstToken(7, None, {}), 0.05).result == "match"
    assert judge(prefill, FirstToken(9, -0.51, {}), 0.05).result == "near_tie"  # ranked 0.02 below: a coin toss
    far = judge(prefill, FirstToken(3, -0.3, {}), 0.05)
    assert far.result == "mismatch" and "ranked -4" in far.detail
    assert judge(prefill, FirstToken(42, -0.1, {}), 0.05).result == "mismatch"  # not in prefill's top few
    assert judge(prefill, FirstToken(7, -2.0, {}), 0.05).result == "mismatch"  # same token, very unlike odds


def test_what_the_check_added_is_stripped_unless_asked() -> None:
    chunk = {"id": "c", "choices": [{"text": "a", "token_ids": [7], "logprobs": {"token_logprobs": [-0.5]}}],
             "prompt_token_ids": [1, 2]}
    assert crosscheck.strip_probe(chunk, keep_ids=False, keep_logprobs=False) == {
        "id": "c", "choices": [{"text": "a", "logprobs": None}]}
    assert crosscheck.strip_probe(chunk, keep_ids=True, keep_logprobs=True) == chunk


# -- through the front door ---------------------------------------------------------------------------
PREFILL_HEADER = "7:-0.5,9:-1.5,3:-3"



def decode_chunk(chat: bool, token: int, logprob: float, first: bool) -> dict[str, Any]:
    lp = {"content": [{"token": "x", "logprob": logprob}]} if chat else {"token_logprobs": [logprob]}
    choice = ({"delta": {"content": "a"}, "token_ids": [token], "logprobs": lp} if chat
              else {"text": "a", "token_ids": [token], "logprobs": lp})
    return {"id": "d", "choices": [choice], **({"prompt_token_ids": [1, 2, 3]} if first else {})}


def door_with(decode_token: int, decode_logprob: float, seen: list[dict[str, Any]]
              ) -> tuple[FrontDoor, FrontDoorMetrics, OnePrefill]:
    metrics = FrontDoorMetrics(CollectorRegistry())
    router = OnePrefill(url="http://p0")

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        chat = request.url.path.endswith("/chat/completions")
        if request.url.host == "p0":
            return httpx.Response(200, json={"choices": [{"text": "a"}], "usage": {"prompt_tokens": 300}},
                                  headers={"x-disagg-kv-expected-tokens": "256", "x-disagg-kv-stored-tokens": "256",
                                           crosscheck.HEADER: PREFILL_HEADER})
        seen.append(body)
        usage = {"prompt_tokens": 300, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 256}}
        if body.get("stream"):
            events = []
            if chat:
                events.append({"id": "d", "choices": [{"delta": {"role": "assistant", "content": ""}}]})
            events += [decode_chunk(chat, decode_token, decode_logprob, not chat), decode_chunk(chat, 8, -0.1, False)]
            text = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
            text += f'data: {json.dumps({"choices": [], "usage": usage})}\n\ndata: [DONE]\n\n'
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        one = decode_chunk(chat, decode_token, decode_logprob, True)
        one["choices"][0]["token_ids"] = [decode_token, 8]
        return httpx.Response(200, json={**one, "usage": usage})

    settings = FrontDoorSettings(engine_url="http://engine", disaggregate_min_tokens=0, kv_crosscheck_tolerance=0.05)
    door = FrontDoor(settings, client=FakeUpstream(handler), metrics=metrics, router=router,  # type: ignore
                     health=lambda: ("ready", True, ""))
    return door, metrics, router


async def send(door: FrontDoor, chat: bool, stream: bool, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": "m", "max_tokens": 2, "temperature": 0, "stream": stream, **extra}
    if chat:
        body["messages"] = [{"role": "user", "content": "hello " * 300}]
    else:
        body["prompt"] = list(range(300))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(door.app()), base_url="http://door",
                                 timeout=10) as client:
        return await client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)


def checks(metrics: FrontDoorMetrics, result: str) -> float:
    return metrics.kv_checks.labels(result=result)._value.get()


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_a_decode_engine_that_agrees_passes_and_the_client_sees_only_what_it_asked(chat: bool, stream: bool) -> None:
    seen: list[dict[str, Any]] = []
    door, metrics, router = door_with(7, -0.5, seen)
    resp = asyncio.run(send(door, chat, stream))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-disagg-path"] == "disaggregated" and resp.headers[crosscheck.CHECK_HEADER].startswith("match; delta=")
    assert checks(metrics, "match") == 1 and checks(metrics, "mismatch") == 0 and router.missed == []
    assert seen[0]["return_token_ids"] is True and "logprobs" in seen[0]  # asked of the engine...
    assert "token_ids" not in resp.text and "token_logprobs" not in resp.text  # ...not shown to the client
    assert '"logprob"' not in resp.text


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_a_decode_engine_that_picks_another_first_token_is_a_kv_mismatch(chat: bool, stream: bool) -> None:
    seen: list[dict[str, Any]] = []
    door, metrics, router = door_with(3, -0.2, seen)  # prefill ranked token 3 at -3.0, chose 7 at -0.5
    resp = asyncio.run(send(door, chat, stream))
    assert resp.status_code == 200  # served as computed, and said so
    assert resp.headers["x-disagg-path"] == "kv_mismatch" and resp.headers[crosscheck.CHECK_HEADER].startswith("mismatch; delta=")
    assert checks(metrics, "mismatch") == 1
    assert metrics.paths.labels(path="kv_mismatch")._value.get() == 1
    assert router.missed == ["kv_mismatch"]  # the canary checks the path at once


def test_a_near_tie_is_no_mismatch() -> None:
    door, metrics, _ = door_with(9, -1.5, [])
    door.settings = FrontDoorSettings(engine_url="http://engine", disaggregate_min_tokens=0, kv_crosscheck_tolerance=1.5)
    resp = asyncio.run(send(door, False, False))
    assert resp.headers[crosscheck.CHECK_HEADER] == "near_tie; delta=1" and resp.headers["x-disagg-path"] == "disaggregated"


def test_sampled_requests_and_the_clients_own_logprobs_are_left_alone() -> None:
    seen: list[dict[str, Any]] = []
    door, metrics, _ = door_with(3, -0.2, seen)
    resp = asyncio.run(send(door, False, False, temperature=0.8))
    assert crosscheck.CHECK_HEADER not in resp.headers and "return_token_ids" not in seen[0]
    resp = asyncio.run(send(door, False, False, logprobs=2))  # greedy, with the client's own logprobs
    assert resp.headers[crosscheck.CHECK_HEADER].startswith("mismatch; delta=")
    assert seen[1]["logprobs"] == 2 and "token_logprobs" in resp.text  # theirs, kept
