"""One prefill engine and two decode engines on one box (decode_worker.instances), under supervisord as `disaggctl up`
runs them: kill -9 of one decode engine under four clients sends its requests to the sibling decode-worker (path
``sibling``: that one's prefill call, its KV path, its engine) — none refused, none failed, none lost or hung — and the
killed one's KV path comes back by itself."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from benchmarks.harness.load import Load, summary
from benchmarks.harness.scrape import metric_value
from daemons.config import load_config
from daemons.kv.canary import vocabulary
from daemons.runtime.statefile import read_state

from .conftest import PORTS, ctl, words_prompt, write_config

pytestmark = pytest.mark.stack
log = logging.getLogger(__name__)

OFFSET = 5000  # ports 23000-24122: below the ephemeral range, apart from the other stacks' ports
A, B = "decode-worker@a", "decode-worker@b"
DEADLINE_S = 300.0  # an engine restart on two busy CPU cores is ~60-120 s


def _wait(what: str, condition, timeout: float = DEADLINE_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def two_decodes(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("siblings")
    ports = {name: {k: v + OFFSET for k, v in section.items()} for name, section in PORTS.items()}
    dw = ports["decode_worker"]
    ports["decode_worker"] = {"instances": {
        "a": dw,
        "b": {"port": dw["port"] + 10, "engine_port": dw["engine_port"] + 10, "metrics_port": dw["metrics_port"] + 10},
    }}
    ports["kv_path"] = {"canary_interval_s": 5, "canary_timeout_s": 20}
    config = write_config(d, **ports)
    proc = ctl(config, "up")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        proc = ctl(config, "wait-ready", "--timeout", "900", timeout=930)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield config, dw
    finally:
        ctl(config, "down", timeout=400)


def _serving(runtime_dir: Path, name: str) -> bool:
    rec = read_state(runtime_dir, name)
    return rec is not None and rec.details.get("engine_serving") is True


def test_a_killed_decode_engine_s_requests_go_to_the_sibling_decode_worker(two_decodes) -> None:  # type: ignore[no-untyped-def]
    config_path, dw = two_decodes
    cfg = load_config(config_path)
    runtime = cfg.runtime_dir
    _wait("both decode engines serving", lambda: _serving(runtime, A) and _serving(runtime, B))
    url = f"http://127.0.0.1:{dw['port']}"
    load = Load(url=url, model=cfg.model.name, vocab=vocabulary(cfg.model.path), clients=4, duration_s=900,
                prompt_tokens=600, max_tokens=8, deadline_s=180, think_s=1.0)

    async def scenario() -> None:
        load.stop = asyncio.Event()
        running = asyncio.create_task(load.run())
        try:
            await asyncio.sleep(10)  # requests flow on both paths before the fault
            engine = int(read_state(runtime, A).details["engine_pid"])  # type: ignore[union-attr]
            os.kill(engine, signal.SIGKILL)
            # The fault takes effect: decode-worker@a sees its engine gone before anything counts as recovered.
            await asyncio.to_thread(_wait, "decode-worker@a noticing its engine's death",
                                    lambda: not _serving(runtime, A), 120)
            await asyncio.to_thread(_wait, "decode-worker@a's engine serving again", lambda: _serving(runtime, A))
            await asyncio.to_thread(_wait, "the KV path back through decode-worker@a", kv_back)
        finally:
            load.stop.set()
            await asyncio.wait_for(running, 240)

    def kv_back() -> bool:
        body = {"model": cfg.model.name, "prompt": words_prompt(int(time.time() * 1000) % 10**6, 600),
                "max_tokens": 2, "temperature": 0.0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=180, trust_env=False)
        if r.status_code != 200 or r.headers.get("x-disagg-path") != "disaggregated":
            return False
        return (r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) > 0

    asyncio.run(scenario())
    got = summary(load.records)
    paths = Counter(r.path for r in load.records if r.outcome == "succeeded")
    assert got["refused"] == 0 and got["failed_cleanly"] == 0 and got["lost"] == 0 and got["hung"] == 0, got
    assert paths["sibling"] > 0, f"no request went to the sibling decode-worker: {dict(paths)}"
    assert paths["disaggregated"] > 0, dict(paths)
    # The sibling served them through its own front door (its prefill call, its decode engine).
    text = httpx.get(f"http://127.0.0.1:{dw['metrics_port'] + 10}/metrics", timeout=10, trust_env=False).text
    assert metric_value(text, "disagg_requests_total", 'route="/v1/completions",status="200"') >= paths["sibling"]
    log.info("sibling row: %d sent, paths %s", got["sent"], dict(paths))
