"""The KV-path logic with fakes: stall detection, the canary's hop verdicts,
a request's truthful path, prompt token ids from a prefill answer."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from daemons.children.stall import EngineLoad, StallDetector, engine_load
from daemons.kv.canary import PathCanary, cached_tokens, vocabulary
from daemons.prefill_worker import as_prefill, prompt_token_ids
from daemons.routing.prefill_router import PrefillOutcome

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="deferred"} 2.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0
vllm:generation_tokens_total{engine="0",model_name="m"} 50.0
vllm:iteration_tokens_total_count{engine="0",model_name="m"} 7.0
vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 1050.0
vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e9
"""


def test_engine_load_sums_requests_and_tokens() -> None:
    assert engine_load(VLLM_METRICS) == EngineLoad(busy=3.0, progress=1057.0)  # 7 steps + 1050 tokens
    assert engine_load("") == EngineLoad(0.0, 0.0)


def test_engine_load_reads_the_engine_s_own_room() -> None:
    """Requests queued for room (not those waiting for their KV: "deferred") and KV-cache use; either out of room
    makes the engine pressed (it takes nothing by load)."""
    load = engine_load(VLLM_METRICS)
    assert (load.queued, load.kv_usage, load.pressed) == (0.0, None, False)  # 2 deferred: waiting for KV, not room
    assert load.deferred == 2.0 and engine_load("").deferred is None  # absent: not known (never "none deferred")
    full = VLLM_METRICS + 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.97\n'
    assert engine_load(full).kv_usage == 0.97 and engine_load(full).pressed
    queued = VLLM_METRICS + 'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 3.0\n'
    assert engine_load(queued).queued == 3.0 and engine_load(queued).pressed


def test_busy_engine_that_computes_is_never_wedged() -> None:
    d = StallDetector(timeout_s=10)
    for t in range(0, 100, 2):
        assert d.observe(float(t), EngineLoad(busy=4, progress=float(t * 100))) is None


def test_idle_engine_is_never_wedged() -> None:
    d = StallDetector(timeout_s=10)
    for t in range(0, 100, 2):
        assert d.observe(float(t), EngineLoad(busy=0, progress=5.0)) is None


def test_engine_holding_requests_without_progress_is_wedged_after_the_timeout() -> None:
    d = StallDetector(timeout_s=10)
    assert d.observe(0.0, EngineLoad(busy=1, progress=5.0)) is None
    assert d.observe(8.0, EngineLoad(busy=1, progress=5.0)) is None
    reason = d.observe(10.0, EngineLoad(busy=1, progress=5.0))
    assert reason is not None and "no token for 10s" in reason


def test_progress_restarts_the_stall_clock() -> None:
    d = StallDetector(timeout_s=10)
    d.observe(0.0, EngineLoad(busy=1, progress=5.0))
    d.observe(9.0, EngineLoad(busy=1, progress=6.0))
    assert d.observe(18.0, EngineLoad(busy=1, progress=6.0)) is None
    assert d.observe(19.0, EngineLoad(busy=1, progress=6.0)) is not None


def test_silent_engine_is_wedged_after_the_timeout_and_an_answer_resets_it() -> None:
    d = StallDetector(timeout_s=10)
    assert d.observe(0.0, None) is None
    assert d.observe(5.0, EngineLoad(0, 0)) is None
    assert d.observe(6.0, None) is None
    assert d.observe(14.0, None) is None  # silent since the answer at 5.0
    assert "not answered for 10s" in (d.observe(15.0, None) or "")


@pytest.mark.parametrize(
    "outcome, cached, path, reason",
    [
        (PrefillOutcome("disaggregated", expected=512, stored=512), 512, "disaggregated", ""),
        (PrefillOutcome("disaggregated", expected=512, stored=512), 256, "recomputed", "kv_not_loaded"),
        (PrefillOutcome("disaggregated", expected=512, stored=256), 256, "recomputed", "kv_not_stored"),
        (PrefillOutcome("disaggregated", expected=0, stored=0), 0, "recomputed", "no_full_chunk"),
        (PrefillOutcome("fallback", "prefill_timeout"), 0, "fallback", "prefill_timeout"),
        # a stream's headers leave before usage: prefill's verdict stands until then
        (PrefillOutcome("disaggregated", expected=512, stored=512), None, "disaggregated", ""),
        (PrefillOutcome("disaggregated", expected=512, stored=0), None, "recomputed", "kv_not_stored"),
    ],
)
def test_a_request_path_is_disaggregated_only_when_decode_loaded_every_full_chunk(
    outcome: PrefillOutcome, cached: int | None, path: str, reason: str
) -> None:
    assert outcome.verdict(cached) == (path, reason)
    headers = outcome.headers(cached)
    assert headers["x-disagg-path"] == path
    if reason:
        assert reason in headers.values()


def test_prefill_body_asks_for_the_prompt_token_ids_and_one_token() -> None:
    body = as_prefill({"model": "m", "prompt": "hi", "max_tokens": 100, "stream": True, "n": 3})
    assert body["return_token_ids"] is True and body["max_tokens"] == 1 and body["stream"] is False
    assert "n" not in body
    answer = {"choices": [{"prompt_token_ids": [1, 2, 3], "token_ids": [9]}]}
    assert prompt_token_ids(answer) == [1, 2, 3]
    assert prompt_token_ids({"choices": []}) is None
    assert prompt_token_ids(None) is None


def test_cached_tokens_reads_usage_or_says_zero() -> None:
    assert cached_tokens({"usage": {"prompt_tokens_details": {"cached_tokens": 256}}}) == 256
    assert cached_tokens({"usage": {"prompt_tokens_details": None}}) == 0
    assert cached_tokens({"usage": None}) == 0
    assert cached_tokens("garbage") == 0


def test_vocabulary_skips_added_tokens(tmp_path) -> None:
    vocab = {f"w{i}": i for i in range(40)}
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": vocab}, "added_tokens": [{"id": 0}, {"id": 1}]}))
    ids = vocabulary(tmp_path)
    assert 0 not in ids and 1 not in ids and len(ids) == 38


# -- the canary against a fake path ------------------------------------------------------------
def fake_path(*, stored: int | None = 256, cached: int = 256, prefill_status: int = 200, decode_status: int = 200,
              prefill_hangs: bool = False, decode_hangs: bool = False) -> httpx.AsyncClient:
    seen: list[list[int]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body["prompt"])
        if request.url.port == 1:  # prefill-worker
            if prefill_hangs:
                raise httpx.ReadTimeout("hang", request=request)
            headers = {} if stored is None else {"x-disagg-kv-stored-tokens": str(stored),
                                                 "x-disagg-kv-expected-tokens": "256"}
            return httpx.Response(prefill_status, json={"choices": []}, headers=headers)
        if decode_hangs:
            raise httpx.ReadTimeout("hang", request=request)
        return httpx.Response(decode_status, json={"usage": {"prompt_tokens_details": {"cached_tokens": cached}}})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client.seen = seen  # type: ignore[attr-defined]
    return client


def run_canary(client: httpx.AsyncClient):
    canary = PathCanary(client=client, model="m", vocab=list(range(100, 200)), chunk_size=256,
                        decode_url="http://127.0.0.1:2", timeout_s=1)
    return asyncio.run(canary.run("http://127.0.0.1:1"))


@pytest.mark.parametrize(
    "kwargs, hop",
    [
        ({}, ""),
        ({"prefill_hangs": True}, "prefill"),
        ({"prefill_status": 503}, "prefill"),
        ({"stored": 0}, "lmcache_store"),
        ({"decode_hangs": True}, "decode_engine"),
        ({"decode_status": 500}, "decode_engine"),
        ({"cached": 0}, "decode_load"),
        ({"stored": None, "cached": 0}, "decode_load"),
    ],
)
def test_canary_names_the_hop_that_broke(kwargs: dict, hop: str) -> None:
    result = run_canary(fake_path(**kwargs))
    assert result.ok == (hop == "")
    assert result.hop == hop
    assert result.expected == 256
    assert ("KV path works" if not hop else f"broken at {hop}") in result.describe()


def test_canary_prompts_are_one_chunk_plus_a_tail_and_never_repeat() -> None:
    client = fake_path()
    run_canary(client)
    run_canary(client)
    prompts = client.seen  # type: ignore[attr-defined]
    assert all(len(p) == 256 + 8 for p in prompts)
    assert prompts[0] == prompts[1]  # prefill and decode see the same prompt
    assert prompts[0] != prompts[2]  # the next canary is a new one


def test_a_gap_in_which_the_daemon_asked_nothing_is_not_the_engine_s_silence() -> None:
    """Seen in CI (2026-12-07): a decode-worker stopped (SIGSTOP) for 33 s judged its engine silent for 33 s the
    moment it went on, and failed over the requests waiting for it. Silence is what was observed: it does not grow
    while nobody asks, and a gap longer than ``blind_s`` starts the clocks again."""
    d = StallDetector(timeout_s=10, blind_s=11)
    assert d.observe(0.0, EngineLoad(busy=1, progress=5.0)) is None
    assert d.silent_for(33.0) == 0.0  # nobody asked since it answered
    assert d.observe(33.0, None) is None  # the first question after the gap: silence counts from here
    assert d.silent_for(33.0) == 0.0
    assert d.observe(35.0, None) is None and d.silent_for(36.0) == 2.0  # seen silent 33 -> 35, not 36
    assert "not answered for 10s" in (d.observe(43.0, None) or "")
    # No progress across a gap is not a stall either.
    d = StallDetector(timeout_s=10, blind_s=11)
    d.observe(0.0, EngineLoad(busy=1, progress=5.0))
    assert d.observe(40.0, EngineLoad(busy=1, progress=5.0)) is None
    assert d.observe(48.0, EngineLoad(busy=1, progress=5.0)) is None
    assert d.observe(50.0, EngineLoad(busy=1, progress=5.0)) is not None
    # Without blind_s (as before): the gap counts.
    d = StallDetector(timeout_s=10)
    d.observe(0.0, EngineLoad(busy=0, progress=0.0))
    assert "not answered for 33s" in (d.observe(33.0, None) or "")
