"""Several workers of a kind on one box: two prefill-worker and two decode-worker instances, under supervisord as
`disaggctl up` runs them (a program per instance, held sockets for each), both decode-workers also on the box's one
endpoint (decode_worker.shared_port). Requests go to decode-worker@a's own front door or to the shared port;
decode-worker@b is a's sibling, which takes a's requests while a's decode engine is down, and the ones the shared
port sends it because its engine holds fewer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks.harness.load import Load, summary
from benchmarks.harness.scrape import metric_value
from daemons.config import load_config
from daemons.kv.canary import vocabulary
from daemons.names import RequestPath
from daemons.runtime.statefile import read_state

from .conftest import PORTS, ctl, words_prompt, write_config

OFFSET = 3000  # ports 21000-22112: below the ephemeral range (32768+), where vLLM binds random ports
DECODE, SIBLING = "decode-worker@a", "decode-worker@b"
SHARED_PORT = PORTS["decode_worker"]["port"] + OFFSET + 20  # the box's one endpoint
# A held stream's length: ~150 s on two CI cores, three times what the longest test holding them runs (its premise,
# requests in progress on one engine, is not a matter of timing: the test checks it held to the end).
STREAM_TOKENS = 12000
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def two_prefills(tmp_path_factory, model_dir):
    d = tmp_path_factory.mktemp("instances")
    ports = {name: {k: v + OFFSET for k, v in section.items()} for name, section in PORTS.items()}
    pf = ports["prefill_worker"]
    ports["prefill_worker"] = {"instances": {
        "a": pf,
        "b": {"port": pf["port"] + 10, "engine_port": pf["engine_port"] + 10, "metrics_port": pf["metrics_port"] + 10},
    }}
    # Short prompts under load go whole to the less busy side (test_short_prompts_under_load_...): here
    # "under load" is any other request in progress.
    dw = ports["decode_worker"]
    # Streams long enough to outlast any test here (STREAM_TOKENS), whatever the machine's speed: room for them in
    # the model's length, the front door's bound and the decode engines' KV cache (4 x 12.6k tokens, 8 KiB each).
    ports["decode_worker"] = {"balance_short_prompts": True, "short_prompt_max_in_flight": 0,
                              "max_output_tokens": STREAM_TOKENS, "kv_cache_memory_bytes": 1 << 30,
                              "shared_port": SHARED_PORT, "instances": {
        "a": dw,
        "b": {"port": dw["port"] + 10, "engine_port": dw["engine_port"] + 10, "metrics_port": dw["metrics_port"] + 10},
    }}
    config = write_config(d, model={"max_model_len": 16384}, **ports)
    # (issue 31) `disaggctl up` with instances exited 78: the shipped supervisord config had no program for one.
    proc = ctl(config, "up")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        programs = ctl(config, "supervisorctl", "status").stdout
        for name in ("disagg-sockets", "lmcache-server", "prefill-worker@a", "prefill-worker@b", DECODE, SIBLING):
            assert name in programs, programs
        proc = ctl(config, "wait-ready", "--timeout", "900", timeout=930)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # Ready may come before decode-worker has seen the second instance: wait until its canary passed too.
        runtime_dir, deadline = load_config(config).runtime_dir, time.monotonic() + 300
        while (rec := read_state(runtime_dir, DECODE)) is None or rec.details.get("prefills_checked") != [
                "prefill-worker@a", "prefill-worker@b"] or rec.state.value != "ready":
            assert time.monotonic() < deadline, rec
            time.sleep(0.5)
        yield config, pf
    finally:
        ctl(config, "down", timeout=400)


def engine_running(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    return metric_value(text, "vllm:num_requests_running")


def test_short_prompts_under_load_are_served_whole_by_the_less_busy_side(two_prefills):
    """balance_short_prompts on the real stack: six short streamed prompts held open one after the other go
    decode, prefill, prefill, decode, prefill, prefill (requests in progress, the prefill side shared by the
    two instances); the prefill engines generate them; clients leaving abort every engine's request."""
    config_path, pf = two_prefills
    url = f"http://127.0.0.1:{PORTS['decode_worker']['port'] + OFFSET}"
    decode_metrics = f"http://127.0.0.1:{PORTS['decode_worker']['metrics_port'] + OFFSET}/metrics"
    engine_ports = [PORTS["decode_worker"]["engine_port"] + OFFSET, pf["engine_port"], pf["engine_port"] + 10]
    paths, readers = [], []
    with httpx.Client(timeout=120, trust_env=False) as client, contextlib.ExitStack() as streams:
        for i in range(6):
            # Long enough to stay in progress for the whole test (~70 prompt tokens, 4,000 to generate).
            body = {"model": "tiny-llama", "prompt": words_prompt(400 + i, 60), "max_tokens": 4000,
                    "ignore_eos": True, "stream": True}
            resp = streams.enter_context(client.stream("POST", f"{url}/v1/completions", json=body))
            assert resp.status_code == 200, resp.read()
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # generating
            paths.append(resp.headers["x-disagg-path"])
            readers.append(lines)  # a line iterator dropped closes its stream (the engine would abort it)
        assert paths == ["short_prompt", "decode_busy", "decode_busy", "short_prompt", "decode_busy", "decode_busy"]
        text = httpx.get(decode_metrics, timeout=10, trust_env=False).text
        assert metric_value(text, "disagg_requests_on_prefill_engines") == 4
        # Each engine generates two of them (a canary passing through may add one for a moment).
        assert all(engine_running(p) >= 2 for p in engine_ports), [engine_running(p) for p in engine_ports]
        for port in (pf["metrics_port"], pf["metrics_port"] + 10):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
            assert metric_value(text, "disagg_prefill_whole_requests_total", 'status="200"') == 2
    # The clients went away mid-stream: every engine aborts its requests, the counts go back to 0.
    deadline = time.monotonic() + 60
    while any(engine_running(p) for p in engine_ports) or metric_value(
            httpx.get(decode_metrics, timeout=10, trust_env=False).text, "disagg_requests_on_prefill_engines"):
        assert time.monotonic() < deadline, [engine_running(p) for p in engine_ports]
        time.sleep(0.5)


def _serving(runtime_dir: Path, name: str) -> bool:
    rec = read_state(runtime_dir, name)
    return rec is not None and rec.details.get("engine_serving") is True


def _wait(what: str, condition, timeout: float = 300.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout  # an engine restart on two busy CPU cores is ~60-120 s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.5)


def test_a_killed_decode_engine_s_requests_go_to_the_sibling_decode_worker(two_prefills):
    """kill -9 of decode-worker@a's engine under four clients of disaggregated-length prompts: its requests go to
    decode-worker@b's front door (path sibling: b's prefill call, b's engine loading the KV), none refused, failed,
    lost or hung; a's engine comes back and so does its KV path."""
    config_path, _pf = two_prefills
    cfg = load_config(config_path)
    runtime = cfg.runtime_dir
    _wait("both decode engines serving", lambda: _serving(runtime, DECODE) and _serving(runtime, SIBLING))
    url = f"http://127.0.0.1:{PORTS['decode_worker']['port'] + OFFSET}"
    # Two clients on decode-worker@a's own port (its requests must go to the sibling), two on the box's endpoint
    # (either front door takes them; a's pass theirs to b).
    load, shared = (Load(url=u, model=cfg.model.name, vocab=vocabulary(cfg.model.path), clients=2, duration_s=900,
                         prompt_tokens=600, max_tokens=8, deadline_s=180, think_s=1.0)
                    for u in (url, f"http://127.0.0.1:{SHARED_PORT}"))

    def kv_back() -> bool:
        body = {"model": cfg.model.name, "prompt": words_prompt(int(time.time() * 1000) % 10**6, 600),
                "max_tokens": 2, "temperature": 0.0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=180, trust_env=False)
        if r.status_code != 200 or r.headers.get("x-disagg-path") != "disaggregated":
            return False
        return (r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) > 0

    async def scenario() -> None:
        load.stop = shared.stop = asyncio.Event()
        running = asyncio.gather(load.run(), shared.run())
        try:
            await asyncio.sleep(10)  # requests flow on the disaggregated path before the fault
            engine = int(read_state(runtime, DECODE).details["engine_pid"])  # type: ignore[union-attr]
            os.kill(engine, signal.SIGKILL)
            # The fault takes effect (a sees its engine gone) before anything counts as recovered.
            await asyncio.to_thread(_wait, "decode-worker@a noticing its engine's death",
                                    lambda: not _serving(runtime, DECODE), 120)
            await asyncio.to_thread(_wait, "decode-worker@a's engine serving again", lambda: _serving(runtime, DECODE))
            await asyncio.to_thread(_wait, "the KV path back through decode-worker@a", kv_back)
        finally:
            load.stop.set()
            await asyncio.wait_for(running, 240)

    asyncio.run(scenario())
    got, via_shared = summary(load.records), summary(shared.records)
    paths = Counter(r.path for r in load.records if r.outcome == "succeeded")
    log.info("sibling row: a's port %s; the box's endpoint %s", got, via_shared)
    for row in (got, via_shared):
        assert row["refused"] == 0 and row["failed_cleanly"] == 0 and row["lost"] == 0 and row["hung"] == 0, row
        assert row["sent"] > 0
    assert paths["sibling"] > 0, f"no request went to the sibling decode-worker: {dict(paths)}"
    assert paths["disaggregated"] > 0, dict(paths)
    # The sibling served them through its own front door (its prefill call, its decode engine).
    metrics = PORTS["decode_worker"]["metrics_port"] + OFFSET + 10
    text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10, trust_env=False).text
    assert metric_value(text, "disagg_requests_total", 'route="/v1/completions",status="200"') >= paths["sibling"]
    text = httpx.get(f"http://127.0.0.1:{metrics - 10}/metrics", timeout=10, trust_env=False).text
    assert metric_value(text, "disagg_sibling_forwards_total", 'why="engine_down"') >= paths["sibling"]


def published_load(runtime_dir: Path, name: str) -> object:
    rec = read_state(runtime_dir, name)
    return None if rec is None else rec.details.get("in_progress")


def engine_successes(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    return metric_value(text, "vllm:request_success_total")


def test_the_box_s_endpoint_sends_requests_to_the_decode_engine_with_fewer_in_progress(two_prefills):
    """decode_worker.shared_port: four long streams held on decode-worker@a's engine (through a's own port), then
    requests on the box's one endpoint: whichever front door takes one, it is decoded on b's engine (a passes it to
    b, path sibling, why load), with its KV loaded there (cached_tokens > 0)."""
    config_path, _pf = two_prefills
    cfg = load_config(config_path)
    runtime = cfg.runtime_dir
    _wait("both decode engines serving", lambda: _serving(runtime, DECODE) and _serving(runtime, SIBLING))
    own = f"http://127.0.0.1:{PORTS['decode_worker']['port'] + OFFSET}"
    engine_a, engine_b = (PORTS["decode_worker"]["engine_port"] + OFFSET + d for d in (0, 10))
    metrics_a = PORTS["decode_worker"]["metrics_port"] + OFFSET
    with httpx.Client(timeout=180, trust_env=False) as client, contextlib.ExitStack() as streams:
        readers = []
        for i in range(4):
            # 606 prompt tokens + STREAM_TOKENS: in progress for the whole test.
            body = {"model": cfg.model.name, "prompt": words_prompt(900 + i, 600), "max_tokens": STREAM_TOKENS,
                    "ignore_eos": True, "stream": True}
            resp = streams.enter_context(client.stream("POST", f"{own}/v1/completions", json=body))
            assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "disaggregated", resp.read()
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            readers.append(lines)
        # The fault-free premise, seen before anything counts: a's engine holds the four, b's none, both published.
        _wait("a publishing its four requests, b none", lambda: published_load(runtime, DECODE) == 4
              and published_load(runtime, SIBLING) == 0, 60)
        before_b, before_a = engine_successes(engine_b), door_paths(metrics_a)
        paths = Counter()
        for i in range(4):
            body = {"model": cfg.model.name, "prompt": words_prompt(950 + i, 600), "max_tokens": 2,
                    "temperature": 0.0}
            # A new connection each (a kept-alive one would stay with the front door that accepted it).
            r = client.post(f"http://127.0.0.1:{SHARED_PORT}/v1/completions", json=body, headers={"connection": "close"})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, r.json()
            paths[r.headers["x-disagg-path"]] += 1
        log.info("the box's endpoint under a's load: paths %s", dict(paths))
        assert set(paths) <= {"sibling", "disaggregated"}, dict(paths)
        # None of them stayed on a's engine: what a's front door took it passed to b (its paths counted only
        # sibling, each a forward by load); b's engine decoded all four (a canary passing through may add one).
        after_a = door_paths(metrics_a)
        assert after_a["sibling"] - before_a["sibling"] == paths["sibling"], (before_a, after_a)
        assert after_a["load"] - before_a["load"] == paths["sibling"], (before_a, after_a)
        assert {k: v for k, v in after_a.items() if k not in ("sibling", "load")} == {
            k: v for k, v in before_a.items() if k not in ("sibling", "load")}, (before_a, after_a)
        assert engine_successes(engine_b) - before_b >= 4
        # Which front door accepts is the kernel's choice (above, b may have taken them all). With b's daemon
        # stopped (SIGSTOP: it accepts nothing, its engine runs on), every connection is a's: a passes each to b's
        # own port, whose held socket keeps it until b goes on.
        before_a = door_paths(metrics_a)
        # b's record says its engine is free when it is stopped: a stopped daemon's record stays as it was, and
        # a judges b by it (a record caught with one request in progress would keep the third request at a). And a
        # has read that record: a reads its siblings' records once a heartbeat, so a view from before b's last
        # request ended (a CI run saw it) would keep the third at a too.
        b = read_state(runtime, SIBLING).pid  # type: ignore[union-attr]
        b_stopped = False
        try:
            for _attempt in range(5):
                _wait("b publishing no request in progress", lambda: published_load(runtime, SIBLING) == 0, 60)
                os.kill(b, signal.SIGSTOP)
                b_stopped = True
                _wait("decode-worker@b stopped", lambda: Path(f"/proc/{b}/stat").read_text().split(")")[1].split()[0]
                      == "T", 10)
                if published_load(runtime, SIBLING) == 0:  # its last record, written before it stopped
                    break
                os.kill(b, signal.SIGCONT)  # caught between a record with one in progress and the stop: again
                b_stopped = False
            assert b_stopped, "b never stopped with a record of no request in progress"
            _after_two_heartbeats(runtime, DECODE)  # a's view of b is b's last record
            assert published_load(runtime, DECODE) == 4, "a's four streams ended before the test did (STREAM_TOKENS)"
            # New connections (a kept-alive one from above may be b's), sent at once.
            with httpx.Client(timeout=180, trust_env=False) as fresh, ThreadPoolExecutor(3) as pool:
                sent = [pool.submit(fresh.post, f"http://127.0.0.1:{SHARED_PORT}/v1/completions", json={
                    "model": cfg.model.name, "prompt": words_prompt(970 + i, 600), "max_tokens": 2,
                    "temperature": 0.0}, headers={"connection": "close"}) for i in range(3)]
                try:
                    _wait("a passing the three to b", lambda: door_paths(metrics_a)["load"] - before_a["load"] == 3,
                          120)
                finally:
                    os.kill(b, signal.SIGCONT)  # before the pool waits for answers that need b
                answers = [f.result(timeout=180) for f in sent]
        finally:
            os.kill(b, signal.SIGCONT)
        for r in answers:
            assert r.status_code == 200 and r.headers["x-disagg-path"] == "sibling", r.text
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, r.json()
        after_a = door_paths(metrics_a)
        assert after_a["sibling"] - before_a["sibling"] == 3 and after_a["load"] - before_a["load"] == 3
        assert published_load(runtime, DECODE) == 4, "a's four streams ended before the test did (STREAM_TOKENS)"


def _after_two_heartbeats(runtime_dir: Path, name: str) -> None:
    """Until ``name`` has written its state record twice more: it refreshes its view of the peers before each, so
    its view is then younger than this call."""
    seen = [read_state(runtime_dir, name).heartbeat_monotonic]  # type: ignore[union-attr]

    def advanced() -> bool:
        now = read_state(runtime_dir, name).heartbeat_monotonic  # type: ignore[union-attr]
        if now != seen[-1]:
            seen.append(now)
        return len(seen) >= 3

    _wait(f"{name} writing its state record twice", advanced, 60)


def door_paths(metrics_port: int) -> Counter[str]:
    """A front door's answered requests by path, and (``load``) those it passed to a sibling by load."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10, trust_env=False).text
    counts: Counter[str] = Counter()
    for path in RequestPath:
        counts[path.value] = int(metric_value(text, "disagg_request_paths_total", f'path="{path.value}"'))
    counts["load"] = int(metric_value(text, "disagg_sibling_forwards_total", 'why="load"'))
    return counts


def test_decode_spreads_prefill_over_instances_and_survives_one_going(two_prefills):
    config_path, pf = two_prefills
    config = load_config(config_path)
    status = ctl(config_path, "status").stdout
    assert "prefill-worker@a" in status and "prefill-worker@b" in status
    url = f"http://127.0.0.1:{PORTS['decode_worker']['port'] + OFFSET}"
    for i in range(4):
        body = {"model": "tiny-llama", "prompt": words_prompt(300 + i, 600), "max_tokens": 2, "temperature": 0.0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300, trust_env=False)
        assert r.status_code == 200 and r.headers["x-disagg-path"] == "disaggregated"
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    for metrics_port in (pf["metrics_port"], pf["metrics_port"] + 10):
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10, trust_env=False).text
        assert metric_value(text, "disagg_prefill_requests_total", 'status="200"') >= 1
        assert 'daemon="prefill-worker@' in text  # build info names the instance
    # One instance goes: decode stays ready and keeps the disaggregated path.
    a = read_state(config.runtime_dir, "prefill-worker@a")
    os.kill(a.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while read_state(config.runtime_dir, "prefill-worker@a").state.value != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(config.readiness.heartbeat_interval_s * 2)
    assert read_state(config.runtime_dir, DECODE).state.value == "ready"
    for i in range(2):
        body = {"model": "tiny-llama", "prompt": words_prompt(310 + i, 600), "max_tokens": 2, "temperature": 0.0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300, trust_env=False)
        assert r.headers["x-disagg-path"] == "disaggregated"
