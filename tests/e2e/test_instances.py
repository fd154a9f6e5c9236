"""Several workers of a kind on one box: two prefill-worker instances behind one
decode-worker, under supervisord as `disaggctl up` runs them (a program per instance, held sockets for each)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
import pytest

from benchmarks.harness.scrape import metric_value
from daemons.config import load_config
from daemons.runtime.statefile import read_state

from .conftest import PORTS, ctl, words_prompt, write_config

OFFSET = 3000  # ports 21000-22112: below the ephemeral range (32768+), where vLLM binds random ports


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
    ports["decode_worker"] = {**ports["decode_worker"], "balance_short_prompts": True, "short_prompt_max_in_flight": 0}
    config = write_config(d, **ports)
    # (issue 31) `disaggctl up` with instances exited 78: the shipped supervisord config had no program for one.
    proc = ctl(config, "up")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        programs = ctl(config, "supervisorctl", "status").stdout
        for name in ("disagg-sockets", "lmcache-server", "prefill-worker@a", "prefill-worker@b", "decode-worker"):
            assert name in programs, programs
        proc = ctl(config, "wait-ready", "--timeout", "900", timeout=930)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # Ready may come before decode-worker has seen the second instance: wait until its canary passed too.
        runtime_dir, deadline = load_config(config).runtime_dir, time.monotonic() + 300
        while (rec := read_state(runtime_dir, "decode-worker")) is None or rec.details.get("prefills_checked") != [
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
    assert read_state(config.runtime_dir, "decode-worker").state.value == "ready"
    for i in range(2):
        body = {"model": "tiny-llama", "prompt": words_prompt(310 + i, 600), "max_tokens": 2, "temperature": 0.0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300, trust_env=False)
        assert r.headers["x-disagg-path"] == "disaggregated"
