"""End to end on the real stack: three daemons under supervisord, real vLLM
engines, real LMCache server. Tests run in file order; the ones that stop a
daemon bring it back before they end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

from benchmarks.harness.scrape import metric_value
from daemons.children.engine import engine_argv, engine_env
from daemons.config import load_config
from daemons.deployment import Deployment
from daemons.ops.openai_client import sse_events
from daemons.runtime.statefile import read_state

from .conftest import PORTS, wait_http_ok, words_prompt

CHUNK = 256
PLAIN_PORT = 18201


@pytest.fixture(scope="module")
def plain_engine(stack, tmp_path_factory):
    """A plain colocated vLLM engine (no KV transfer) on the same model and settings."""
    config = load_config(stack.config)
    worker = config.decode_worker.model_copy(update={"engine_port": PLAIN_PORT})
    log_path = tmp_path_factory.mktemp("plain") / "engine.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(engine_argv(Deployment(config), worker, None), env=engine_env(worker), stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{PLAIN_PORT}"
    try:
        wait_http_ok(f"{url}/health", proc, log_path, 600, "plain engine")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_status_reports_all_ready(stack):
    status = stack.status()
    assert status["all_ready"] is True
    states = {d["daemon"]: d["state"] for d in status["daemons"]}
    assert states == {"lmcache-server": "ready", "prefill-worker": "ready", "decode-worker": "ready"}
    digests = {d["record"]["config_digest"] for d in status["daemons"]}
    assert len(digests) == 1


def test_kv_comes_from_lmcache_and_output_equals_colocated_run(stack, plain_engine):
    prompt = words_prompt(1, 2500)
    resp = stack.complete(prompt, max_tokens=16, ignore_eos=True, logprobs=1)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-disagg-path"] == "disaggregated"
    body = resp.json()
    usage = body["usage"]
    prompt_tokens, cached = usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
    # (b) every full chunk but at most one came from LMCache, not from decode's compute
    assert prompt_tokens > 4 * CHUNK
    assert cached >= (prompt_tokens // CHUNK) * CHUNK - CHUNK, usage
    assert cached <= prompt_tokens
    # (a) greedy output equals a plain colocated vLLM run of the same prompt
    plain = httpx.post(
        f"{plain_engine}/v1/completions",
        json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 16, "temperature": 0.0, "ignore_eos": True,
              "logprobs": 1},
        timeout=300, trust_env=False,
    ).json()
    assert plain["usage"]["prompt_tokens"] == prompt_tokens
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    ours, theirs = body["choices"][0], plain["choices"][0]
    assert ours["text"] == theirs["text"]
    assert ours["logprobs"]["tokens"] == theirs["logprobs"]["tokens"]
    assert len(ours["logprobs"]["tokens"]) == 16
    assert ours["logprobs"]["token_logprobs"] == pytest.approx(theirs["logprobs"]["token_logprobs"], abs=1e-3)


def test_front_door_metrics_count_reused_tokens(stack):
    before = stack.metrics("decode-worker")
    prompt = words_prompt(2, 1200)
    resp = stack.complete(prompt, max_tokens=4)
    assert resp.status_code == 200
    cached = resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    after = stack.metrics("decode-worker")
    name = "disagg_prompt_tokens_total"
    assert metric_value(after, name, 'source="kv_cache"') - metric_value(before, name, 'source="kv_cache"') == cached
    assert metric_value(after, "disagg_ready") == 1
    assert metric_value(after, "vllm_prompt_tokens_total") > 0  # the engine's own metrics, re-exposed
    prefill = stack.metrics("prefill-worker")
    assert metric_value(prefill, "disagg_prefill_requests_total", 'status="200"') >= 1
    lmcache = stack.metrics("lmcache-server")
    assert "lmcache_" in lmcache and metric_value(lmcache, "disagg_ready") == 1


def test_streaming_chat_with_usage_only_when_asked(stack):
    before = metric_value(stack.metrics("decode-worker"), "disagg_time_to_first_token_seconds_count")
    body = {
        "model": "tiny-llama", "max_tokens": 6, "temperature": 0.0, "stream": True,
        "messages": [{"role": "user", "content": words_prompt(3, 700)}],
    }
    for want_usage in (False, True):
        if want_usage:
            body["stream_options"] = {"include_usage": True}
        events = []
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=300,
                          trust_env=False) as resp:
            assert resp.status_code == 200
            assert resp.headers["x-disagg-path"] == "disaggregated"
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        usage_chunks = [c for c in chunks if c.get("usage") and not c.get("choices")]
        assert len(usage_chunks) == (1 if want_usage else 0)
        if want_usage:
            assert usage_chunks[0]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert sum(1 for c in chunks if c.get("choices")) >= 6
    after = metric_value(stack.metrics("decode-worker"), "disagg_time_to_first_token_seconds_count")
    assert after - before == 2


def test_bad_requests_get_clear_errors_and_lose_nothing(stack):
    r = httpx.post(f"{stack.base_url}/v1/completions", content=b"{not json", timeout=30, trust_env=False)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{stack.base_url}/v1/completions", json=[1, 2], timeout=30, trust_env=False)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = stack.complete("hello", max_tokens=-3)
    assert r.status_code == 400  # the engine's own validation, passed through
    r = httpx.post(f"{stack.base_url}/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=60,
                   trust_env=False)
    assert r.status_code == 404
    # Garbage on every public socket: nobody crashes or hangs.
    for port in (18000, 18100, 19100, 19101, 19102):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(os.urandom(4096) + b"\r\n\r\n")
            s.settimeout(5)
            try:
                s.recv(1024)
            except OSError:
                pass
    assert stack.status()["all_ready"] is True
    assert stack.complete(words_prompt(4, 300), max_tokens=2).status_code == 200


def test_models_and_health(stack):
    models = httpx.get(f"{stack.base_url}/v1/models", timeout=30, trust_env=False).json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    health = httpx.get(f"{stack.base_url}/health", timeout=30, trust_env=False)
    assert health.status_code == 200 and health.json()["state"] == "ready"


def test_prefill_down_falls_back_and_recovers(stack):
    before = metric_value(stack.metrics("decode-worker"), "disagg_fallbacks_total")
    assert "stopped" in stack.supervisorctl("stop", "prefill-worker")
    assert read_state(load_config(stack.config).runtime_dir, "prefill-worker").state.value == "stopped"
    stack.wait_state("decode-worker", ("degraded",), timeout=30)
    # (c) the request still succeeds; decode computed the whole prompt itself
    resp = stack.complete(words_prompt(5, 1500), max_tokens=4)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-disagg-path"] == "fallback"
    assert resp.headers["x-disagg-fallback-reason"] == "prefill_unavailable"
    assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    after = stack.metrics("decode-worker")
    assert metric_value(after, "disagg_fallbacks_total") == before + 1
    assert metric_value(after, "disagg_fallbacks_total", 'reason="prefill_unavailable"') >= 1
    status = stack.status()
    assert status["all_ready"] is False
    assert "prefill-worker" in next(d for d in status["daemons"] if d["daemon"] == "decode-worker")["reason"]
    # Back: the normal path resumes by itself.
    assert "started" in stack.supervisorctl("start", "prefill-worker")
    stack.wait_ready()
    resp = stack.complete(words_prompt(6, 1500), max_tokens=4)
    assert resp.headers["x-disagg-path"] == "disaggregated"
    assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_lmcache_down_falls_back_and_recovers(stack):
    assert "stopped" in stack.supervisorctl("stop", "lmcache-server")
    stack.wait_state("decode-worker", ("degraded",), timeout=30)
    assert stack.wait_state("prefill-worker", ("degraded",), timeout=30) == "degraded"
    resp = stack.complete(words_prompt(7, 800), max_tokens=4)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-disagg-fallback-reason"] == "lmcache_unavailable"
    assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert "started" in stack.supervisorctl("start", "lmcache-server")
    stack.wait_ready()
    # The engines' connectors reconnect to the new server on their own.
    deadline = time.monotonic() + 60
    while True:
        resp = stack.complete(words_prompt(8, 1500), max_tokens=4)
        assert resp.status_code == 200
        if resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0:
            break
        assert time.monotonic() < deadline, "KV reuse did not resume after lmcache-server came back"
        time.sleep(2)
    assert resp.headers["x-disagg-path"] == "disaggregated"


def test_sigterm_drains_in_flight_requests(stack):
    """A streaming request in flight when decode-worker gets SIGTERM finishes; then it exits 0."""
    result: dict[str, object] = {}
    streaming = threading.Event()
    max_tokens = 600  # long enough to be in flight for seconds after the SIGTERM lands, short of the drain deadline

    def stream() -> None:
        body = {"model": "tiny-llama", "prompt": words_prompt(9, 200), "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        events: list[str] = []
        with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, timeout=300,
                          trust_env=False) as resp:
            for event in sse_events(resp.iter_text()):
                events.append(event)
                if len(events) == 5:
                    streaming.set()  # the request is streaming now: the SIGTERM lands mid-stream
        result["events"] = events

    t = threading.Thread(target=stream)
    t.start()
    assert streaming.wait(120), "the stream never started"
    runtime_dir = load_config(stack.config).runtime_dir
    pid = read_state(runtime_dir, "decode-worker").pid
    os.kill(pid, signal.SIGTERM)
    t.join(300)
    events = result["events"]
    assert isinstance(events, list) and events[-1] == "data: [DONE]", events[-3:]
    # Every token arrived (an event may carry several: vLLM merges what the reader has not taken yet).
    usage = json.loads(events[-2].removeprefix("data:"))["usage"]
    assert usage["completion_tokens"] == max_tokens, usage
    deadline = time.monotonic() + 60
    while read_state(runtime_dir, "decode-worker").state.value != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    out = ""
    while time.monotonic() < deadline:
        out = stack.supervisorctl("status", "decode-worker")
        if "EXITED" in out:
            break
        time.sleep(0.5)
    assert "EXITED" in out, out  # exit 0 is expected: supervisord does not restart it
    # No process listens now, but the socket is held (disagg-sockets): a request made meanwhile is not
    # refused; it waits in the backlog and the next decode-worker answers it.
    waiting: dict[str, object] = {}

    def meanwhile() -> None:
        try:
            waiting["status"] = stack.complete("hello", max_tokens=1).status_code
        except httpx.HTTPError as exc:
            waiting["status"] = repr(exc)

    w = threading.Thread(target=meanwhile)
    w.start()
    time.sleep(2)
    assert w.is_alive()  # accepted into the backlog: waiting, not refused
    assert "started" in stack.supervisorctl("start", "decode-worker")
    w.join(300)
    assert waiting.get("status") == 200, waiting
    stack.wait_ready()


def test_prefill_worker_serves_a_whole_request_for_a_busy_decode_engine(stack):
    """Path decode_busy's other end: /whole/... passes the request to the prefill engine as it is and relays
    the answer, streamed or not; a caller gone mid-stream aborts the engine's request."""
    url = f"http://127.0.0.1:{PORTS['prefill_worker']['port']}/whole/v1/completions"
    body = {"model": "tiny-llama", "prompt": words_prompt(13, 60), "max_tokens": 12, "ignore_eos": True}
    resp = httpx.post(url, json=body, headers={"x-request-id": "whole-1"}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 12  # generated, not cut to one prefill token
    with httpx.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=120) as streamed:
        assert streamed.status_code == 200
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 12
    assert len(events) >= 12
    bad = httpx.post(url, json={**body, "max_tokens": -1}, timeout=60)
    assert bad.status_code == 400  # the engine's own refusal, relayed
    with httpx.stream("POST", url, json={**body, "max_tokens": 4000, "stream": True}, timeout=120) as gone:
        assert gone.status_code == 200
        next(gone.iter_lines())
    # The caller went away: the prefill engine aborts the request (nothing left running there).
    engine_metrics = f"http://127.0.0.1:{PORTS['prefill_worker']['engine_port']}/metrics"
    deadline = time.monotonic() + 60
    while metric_value(httpx.get(engine_metrics, timeout=10).text, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the prefill engine kept generating for a caller that left"
        time.sleep(0.5)
    counted = metric_value(stack.metrics("prefill-worker"), "disagg_prefill_whole_requests_total", 'status="200"')
    assert counted >= 3


def test_a_short_prompt_skips_the_prefill_call(stack):
    def prefill_calls() -> float:  # the front door's calls to prefill-worker (canaries are not counted here)
        return metric_value(stack.metrics("decode-worker"), "disagg_prefill_call_duration_seconds_count")

    before = prefill_calls()
    resp = stack.complete(words_prompt(11, 60), max_tokens=4)  # ~70 tokens: no full chunk to load
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-disagg-path"] == "short_prompt"
    assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert prefill_calls() == before, "a short prompt still went to prefill-worker"
    assert metric_value(stack.metrics("decode-worker"), "disagg_request_paths_total", 'path="short_prompt"') >= 1
    resp = stack.complete(words_prompt(12, 1200), max_tokens=4)  # long: disaggregated as before
    assert resp.headers["x-disagg-path"] == "disaggregated"
    assert prefill_calls() == before + 1


def test_greedy_answers_are_cross_checked_and_every_answer_says_where_its_time_went(stack):
    """Greedy requests that took the KV path carry the cross-check's verdict (never a mismatch on a healthy
    stack), and every answer a Server-Timing whose stages add up to its time to first token."""
    from daemons.edge import timing
    from daemons.ops.openai_client import complete, completion_body

    verdicts = []
    with httpx.Client(timeout=300, trust_env=False) as client:
        for i in range(12):
            body = completion_body("tiny-llama", words_prompt(700 + i, 700), 4, stream=i % 2 == 0)
            got = complete(client, stack.base_url, body)
            assert got.status == 200 and got.path == "disaggregated", (got.status, got.path, got.body[:200])
            verdicts.append(got.kv_check)
            t = got.server_timing
            parts = sum(float(t.get(s, 0.0)) for s in ("read", "queue", "prefill", "decode"))
            assert {"queue", "prefill", "store", "decode", "ttft"} <= set(t) and t["path"] == "disaggregated", t
            assert parts <= float(t["ttft"]) + 0.2, t
            assert got.headers_at is not None and float(t["ttft"]) <= (got.headers_at - got.t0) * 1000 + 0.2, t
    assert set(verdicts) <= {"match", "near_tie"} and verdicts.count("match") >= 1, verdicts
    metrics = stack.metrics("decode-worker")
    assert metric_value(metrics, "disagg_kv_crosschecks_total", 'result="mismatch"') == 0
    assert metric_value(metrics, "disagg_request_stage_seconds_count", 'stage="prefill"') >= 12
    # A chat stream, and a sampled request (no check: only its canary speaks for it).
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": words_prompt(800, 700)}],
            "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.Client(timeout=300, trust_env=False) as client:
        with client.stream("POST", f"{stack.base_url}/v1/chat/completions", json=chat,
                           headers={timing.ASK_HEADER: "1"}) as resp:
            text = resp.read().decode()
            assert resp.headers["x-disagg-kv-check"].split(";")[0] in ("match", "near_tie")
        assert "token_ids" not in text and '"logprob"' not in text  # what the check asked for stays inside
        assert timing.COMMENT in text and "total;dur=" in text
        sampled = stack.complete(words_prompt(801, 700), max_tokens=3, temperature=0.9)
        assert sampled.status_code == 200 and "x-disagg-kv-check" not in sampled.headers


def _negate_weights_past(path, keep_bytes: int) -> None:
    """Flip the sign of every float32 weight stored past the first ``keep_bytes`` of a safetensors file (so the
    config digest, which reads the first MiB, does not change): another model under the same name."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    first = max(keep_bytes, start)
    first += (3 - (first - start)) % 4  # the sign byte of the first whole float32 from there
    for pos in range(first, len(data), 4):
        data[pos] ^= 0x80
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a new inode: the engines that run keep the old weights they mapped


def _restart_prefill_engine(stack) -> None:
    cfg = load_config(stack.config)
    pid = int(read_state(cfg.runtime_dir, "prefill-worker").details["engine_pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # see the fault take effect before waiting for the way back
        record = read_state(cfg.runtime_dir, "prefill-worker")
        if record is None or record.details.get("engine_pid") != pid or record.state.value != "ready":
            break
        time.sleep(0.2)
    stack.wait_state("prefill-worker", ("ready",), timeout=600)


def test_a_prefill_engine_with_other_weights_is_caught_by_the_cross_check(stack, model_dir, tmp_path):
    """The prefill engine restarts on weights that differ past the first MiB (same name, same digest: nothing
    else notices; its KV reaches the decode engine and is loaded, cached tokens and all). The canary, which runs
    first on a restarted prefill-worker, finds the first tokens disagree (hop kv_mismatch); decode-worker is
    degraded and naming it, and computes prompts itself (kv_path_broken) until the weights are right again. No
    answer from that KV passes as disaggregated: a greedy one that took it says kv_mismatch. (The same verdict
    on a request, without the canary first, is tests/unit/test_crosscheck.py's.)"""
    weights = model_dir / "model.safetensors"
    saved = tmp_path / "model.safetensors"
    saved.write_bytes(weights.read_bytes())
    try:
        _negate_weights_past(weights, 1 << 20)
        _restart_prefill_engine(stack)
        deadline = time.monotonic() + 180
        seen = []
        while time.monotonic() < deadline:
            resp = stack.complete(words_prompt(900 + len(seen), 700), max_tokens=3)
            assert resp.status_code == 200, resp.text
            seen.append((resp.headers["x-disagg-path"], resp.headers.get("x-disagg-fallback-reason", ""),
                         resp.headers.get("x-disagg-kv-check", "")))
            assert seen[-1][0] != "disaggregated", seen  # never an answer from the wrong KV as a good one
            if seen[-1][1] == "kv_path_broken":
                break
            time.sleep(1)
        assert seen[-1][1] == "kv_path_broken", seen
        assert all(c.startswith("mismatch") for path, _, c in seen if path == "kv_mismatch"), seen
        reason = next(d for d in stack.status()["daemons"] if d["daemon"] == "decode-worker")["reason"]
        assert "kv_mismatch" in reason, reason
        metrics = stack.metrics("decode-worker")
        assert metric_value(metrics, "disagg_kv_path_canaries_total", 'result="kv_mismatch"') >= 1
    finally:
        os.replace(saved, weights)
        _restart_prefill_engine(stack)
    stack.wait_ready()  # the canary passes again on the right weights
    resp = stack.complete(words_prompt(960, 700), max_tokens=3)
    assert resp.headers["x-disagg-path"] == "disaggregated"
    assert resp.headers["x-disagg-kv-check"].split(";")[0] in ("match", "near_tie")


def test_a_second_daemon_started_by_hand_refuses_at_once_and_touches_nothing(stack, tmp_path):
    """An operator starts prefill-worker by hand beside the running service, with the same runtime_dir but another
    metrics port (so nothing else stops it first): it must refuse at once, naming the pid that runs, and leave the
    running daemon, its engine and its state file alone."""
    import sys

    import yaml

    cfg = load_config(stack.config)
    before = read_state(cfg.runtime_dir, "prefill-worker")
    assert before is not None
    engine = int(before.details["engine_pid"])
    doc = yaml.safe_load(stack.config.read_text())
    doc["prefill_worker"]["metrics_port"] = PORTS["prefill_worker"]["metrics_port"] + 50
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "daemons.prefill_worker", "--config", str(second)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert f"pid {before.pid}" in proc.stderr and "already runs" in proc.stderr, proc.stderr[-2000:]
    after = read_state(cfg.runtime_dir, "prefill-worker")
    assert after is not None and after.pid == before.pid and int(after.details["engine_pid"]) == engine
    os.kill(engine, 0)  # its engine is still there
    resp = stack.complete(words_prompt(31, 1500), max_tokens=4)
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "disaggregated", resp.headers
