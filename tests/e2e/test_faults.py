"""The fault matrix, under load, on the real stack (real vLLM engines, LMCache, supervisord).

Four clients (streaming and not) send unique prompts through the front door
while one fault at a time hits the stack: ``kill -9``, ``SIGSTOP`` (longer than
the deadline that should notice it) and ``SIGTERM`` of each daemon, ``kill -9``
and ``SIGSTOP`` of each engine and of LMCache's server. For every fault: no
request hangs, none is lost (accepted, then no answer) except those in flight
inside a front door killed with ``kill -9``, and the disaggregated path with
cached tokens > 0 comes back by itself within the bound. The table is written
to ``var/fault-matrix.md`` (README shows a run of it).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.faults import HEADER, Fault, Row, run_fault
from benchmarks.load import Load
from daemons.canary import vocabulary
from daemons.config import load_config
from daemons.statefile import read_state
from tests.e2e.conftest import REPO, ctl, write_config

pytestmark = pytest.mark.stack

# Its own ports: the session's shared stack may be up at the same time.
FAULT_PORTS = {
    "lmcache": {"port": 28555, "http_port": 28080},
    "lmcache_server": {"metrics_port": 29100},
    "prefill_worker": {"port": 28100, "engine_port": 28101, "metrics_port": 29101},
    "decode_worker": {"port": 28000, "engine_port": 28001, "metrics_port": 29102, "prefill_timeout_s": 10,
                      "first_token_timeout_s": 60, "request_timeout_s": 120},
    # Deadlines short enough for a CI run, long enough for two busy CPU cores.
    "kv_path": {"canary_interval_s": 5, "canary_timeout_s": 20, "engine_stall_timeout_s": 20,
                "restart_after_failures": 3},
}
RECOVERY_BOUND_S = 300.0  # an engine restart on 2 CPU cores is ~60-90 s, plus the canary
HOLD_S = 25.0  # SIGSTOP: longer than heartbeat_timeout_s (15) and engine_stall_timeout_s (20)
CLIENT_DEADLINE_S = 180.0  # a request past this is hung (> request_timeout_s + prefill_timeout_s)


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    directory = tmp_path_factory.mktemp("faults")
    config = write_config(directory, **FAULT_PORTS)
    proc = ctl(config, "up")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        wait_all_ready(config, 900)
        yield config
    finally:
        ctl(config, "down", timeout=400)


def wait_all_ready(config: Path, timeout: float) -> None:
    proc = ctl(config, "wait-ready", "--timeout", str(timeout), timeout=timeout + 30)
    assert proc.returncode == 0, f"stack not ready after {timeout:.0f}s:\n{proc.stdout}\n{proc.stderr}"


def supervisorctl(config: Path, *words: str) -> None:
    from daemons.ctl import supervisorctl as sctl

    sctl(load_config(config, require_model=False), *words)


def faults(config: Path) -> list[tuple[Fault, bool]]:
    """(fault, whether it takes the front door's process down: in-flight requests there may be lost)."""
    cfg = load_config(config)

    def daemon(name: str) -> Callable[[], int]:
        return lambda: _record(cfg, name).pid

    def child(name: str, key: str) -> Callable[[], int]:
        return lambda: int(_record(cfg, name).details[key])

    def start(name: str) -> Callable[[], None]:
        return lambda: supervisorctl(config, "start", name)

    k, stop, term = signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM
    return [
        (Fault("kill -9 lmcache-server", daemon("lmcache-server"), k), False),
        (Fault("kill -9 LMCache server process", child("lmcache-server", "child_pid"), k), False),
        (Fault("kill -9 prefill-worker", daemon("prefill-worker"), k), False),
        (Fault("kill -9 prefill engine", child("prefill-worker", "engine_pid"), k), False),
        (Fault("kill -9 decode-worker", daemon("decode-worker"), k), True),
        (Fault("kill -9 decode engine", child("decode-worker", "engine_pid"), k), False),
        (Fault(f"SIGSTOP lmcache-server {HOLD_S:.0f}s", daemon("lmcache-server"), stop, HOLD_S), False),
        (Fault(f"SIGSTOP LMCache server process {HOLD_S:.0f}s", child("lmcache-server", "child_pid"), stop, HOLD_S),
         False),
        (Fault(f"SIGSTOP prefill-worker {HOLD_S:.0f}s", daemon("prefill-worker"), stop, HOLD_S), False),
        (Fault(f"SIGSTOP prefill engine {HOLD_S:.0f}s", child("prefill-worker", "engine_pid"), stop, HOLD_S), False),
        (Fault(f"SIGSTOP decode-worker {HOLD_S:.0f}s", daemon("decode-worker"), stop, HOLD_S), False),
        (Fault(f"SIGSTOP decode engine {HOLD_S:.0f}s", child("decode-worker", "engine_pid"), stop, HOLD_S), False),
        (Fault("SIGTERM lmcache-server (then start)", daemon("lmcache-server"), term, after=start("lmcache-server")),
         False),
        (Fault("SIGTERM prefill-worker (then start)", daemon("prefill-worker"), term, after=start("prefill-worker")),
         False),
        (Fault("SIGTERM decode-worker (then start)", daemon("decode-worker"), term, after=start("decode-worker")),
         False),
    ]


def _record(cfg, name: str):  # type: ignore[no-untyped-def]
    record = read_state(cfg.runtime_dir, name)
    assert record is not None, f"no state file for {name}"
    return record


def test_every_fault_under_load_ends_with_the_kv_path_back(fault_stack: Path) -> None:
    cfg = load_config(fault_stack)
    vocab = vocabulary(cfg.model.path)
    url = f"http://127.0.0.1:{cfg.decode_worker.port}"
    rows: list[tuple[Row, bool]] = []
    table = Path(REPO / "var" / "fault-matrix.md")
    table.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for fault, kills_front_door in faults(fault_stack):
        wait_all_ready(fault_stack, 600)
        load = Load(url, cfg.model.name, vocab, clients=4, prompt_tokens=600, max_tokens=8,
                    deadline_s=CLIENT_DEADLINE_S)
        row = asyncio.run(run_fault(load, fault, warmup_s=4, recovery_bound_s=RECOVERY_BOUND_S))
        rows.append((row, kills_front_door))
        table.write_text(f"{HEADER}\n" + "\n".join(r.line() for r, _ in rows) +
                         f"\n\n({time.monotonic() - t0:.0f}s, {sys.platform})\n")
        print(row.line(), flush=True)
    report = table.read_text()
    for row, kills_front_door in rows:
        assert row.hung == 0, f"{row.fault}: {row.hung} hung requests\n{report}"
        assert row.lost <= (4 if kills_front_door else 0), f"{row.fault}: {row.lost} lost requests\n{report}"
        assert row.succeeded > 0, f"{row.fault}: nothing succeeded\n{report}"
        assert row.recovered, f"{row.fault}: KV path not back within {RECOVERY_BOUND_S:.0f}s\n{report}"
    wait_all_ready(fault_stack, 600)

