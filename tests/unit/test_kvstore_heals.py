"""The KV store heals: lmcache-server's judgement of an LMCache that stops answering or loses an engine, the
workers' side of it (wait, mark planned stops), failover that does not need the KV path, LMCache sized for its
engines, and the stacks of a stuck process. Real child processes where a process is the point; no LMCache here
(the real one: tests/e2e/test_faults.py's compound row)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemons.children.stacks import process_state, thread_stacks
from daemons.config import load_config
from daemons.deployment import Deployment
from daemons.kv.kv_lookup import KVLookup
from daemons.lmcache_server import LMCacheServer, lmcache_argv
from daemons.prefill_worker import PrefillWorker
from daemons.runtime.lifecycle import DaemonFailed
from daemons.runtime.statefile import PeerView, StateRecord, write_state
from daemons.runtime.states import State

REPO = Path(__file__).resolve().parents[2]


def config_with(tmp_path: Path, model_dir: Path, **sections: dict):  # type: ignore[no-untyped-def]
    d = yaml.safe_load((REPO / "etc" / "disagg.yaml").read_text())
    d["model"]["path"] = str(model_dir)
    d["runtime_dir"] = str(tmp_path / "run")
    d["log_dir"] = str(tmp_path / "log")
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    p = tmp_path / "disagg.yaml"
    p.write_text(yaml.safe_dump(d))
    return load_config(p)


def record(name: str, state: State = State.READY, **details: object) -> StateRecord:
    return StateRecord(daemon=name, pid=1, state=state, endpoint="127.0.0.1:1", metrics="127.0.0.1:2",
                       config_digest="d", version="v", started_at=0.0, details=dict(details))


# -- LMCache sized for its engines ---------------------------------------------------------------------------
def test_lmcache_gets_a_store_and_load_thread_per_engine_rank_twice_over(tmp_path, model_dir):
    here = Deployment(config_with(tmp_path, model_dir))
    assert here.local_engine_ranks() == 2  # one prefill + one decode engine
    argv = lmcache_argv(here)
    assert argv[argv.index("--max-gpu-workers") + 1] == "4"  # a restarted engine is a new rank to LMCache
    assert argv[argv.index("--max-cpu-workers") + 1] == "4"
    more = Deployment(config_with(tmp_path, model_dir, decode_worker={"instances": {"a": {"port": 18010,
                      "engine_port": 18011, "metrics_port": 19110}, "b": {}}}, lmcache={"max_cpu_workers": 9}))
    assert more.local_engine_ranks() == 3 and more.lmcache_workers() == (6, 9)


def test_restarting_lmcache_on_an_engine_loss_is_for_gpu_engines_unless_said(tmp_path, model_dir):
    def restarts(**sections: object) -> bool:
        return Deployment(config_with(tmp_path, model_dir, **sections)).lmcache_restarts_on_engine_loss

    assert not restarts()  # CPU engines: no CUDA IPC
    assert restarts(lmcache={"restart_on_engine_loss": "always"})
    assert restarts(decode_worker={"device": "cuda:1"})
    assert not restarts(decode_worker={"device": "cuda:1"}, lmcache={"restart_on_engine_loss": "never"})


# -- lmcache-server's judgement ------------------------------------------------------------------------------
def server(tmp_path: Path, model_dir: Path, **lmcache: object) -> LMCacheServer:
    s = LMCacheServer(config_with(tmp_path, model_dir, lmcache={"restart_on_engine_loss": "always", **lmcache}))
    s.lifecycle.to(State.LOADING)
    s.lifecycle.to(State.READY)
    return s


def test_an_unanswering_lmcache_is_degraded_at_once_and_restarted_past_the_limit_with_a_backoff(tmp_path, model_dir):
    async def scenario() -> None:
        s = server(tmp_path, model_dir, unresponsive_restart_s=30)
        restarts: list[str] = []
        s.restart_lmcache = lambda why, reason, **kw: restarts.append(reason)  # type: ignore[method-assign]
        s.unanswered(False, "no answer in 6s")
        assert s.state is State.DEGRADED and "has not answered /healthcheck nor a lookup" in s.reason
        assert restarts == []
        s.unanswered_since = time.monotonic() - 31  # silent past the limit
        s.unanswered(True, "no answer in 6s")
        assert restarts == ["unresponsive"]
        s.restarts.extend([(time.monotonic(), "unresponsive")] * 2)
        assert s.unresponsive_limit_s() == 120  # doubled per restart for it within the window
        s.restarts.extend([(time.monotonic(), "unresponsive")] * 5)
        assert s.unresponsive_limit_s() == 240  # at most three doublings
    asyncio.run(scenario())


def test_restarts_in_place_are_bounded_then_the_daemon_exits_for_its_supervisor(tmp_path, model_dir):
    async def scenario() -> None:
        s = server(tmp_path, model_dir, restart_limit=2)

        async def no_restart(*_: object) -> None:
            return None

        s._restart_lmcache = no_restart  # type: ignore[method-assign]
        for _ in range(2):
            s.restart_lmcache("stuck", "unresponsive", grace_s=1)
            assert s.state is State.DEGRADED and s.reason.startswith("restarting LMCache: stuck")
            await s._restart  # type: ignore[misc]
            s._restart = None
        assert s.lm_metrics.restarts.labels(reason="unresponsive")._value.get() == 2
        with pytest.raises(DaemonFailed, match="restarted 2 times within 600s"):
            s.restart_lmcache("stuck again", "unresponsive", grace_s=1)
    asyncio.run(scenario())


def test_an_engine_that_dies_without_a_planned_stop_restarts_lmcache_a_planned_stop_does_not(tmp_path, model_dir):
    async def scenario() -> None:
        s = server(tmp_path, model_dir)
        restarts: list[str] = []
        s.restart_lmcache = lambda why, reason, **kw: restarts.append(why)  # type: ignore[method-assign]
        run = s.config.runtime_dir
        decode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        prefill = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            write_state(run, record("decode-worker", engine_pid=decode.pid))
            write_state(run, record("prefill-worker", engine_pid=prefill.pid))
            assert not await s.watch_engines()  # both alive: learned
            assert set(s.engines) == {decode.pid, prefill.pid}
            looked = s.details["engines_checked_at"]
            # prefill-worker stops its engine on purpose (says so first); decode's is killed.
            write_state(run, record("prefill-worker", engines_stopped=[prefill.pid]))
            for proc in (prefill, decode):
                proc.kill()
                proc.wait()
            assert await s.watch_engines()
            assert len(restarts) == 1 and f"decode-worker's (pid {decode.pid})" in restarts[0]
            assert str(prefill.pid) not in restarts[0] and not s.engines
            assert s.details["engines_checked_at"] > looked
            assert not await s.watch_engines()  # each loss restarts once
        finally:
            for proc in (prefill, decode):
                proc.kill()
    asyncio.run(scenario())


def test_a_planned_restart_s_mark_survives_the_next_process_rewriting_the_state_file(tmp_path, model_dir):
    """Seen on an H100 (2026-12-07): a planned restart of decode-worker marked its engine's stop and exited, and the
    next process rewrote the state file within a second, before lmcache-server had looked: LMCache was restarted
    for a planned stop. The next process keeps its predecessor's marks."""
    from daemons.decode_worker import DecodeWorker

    async def scenario() -> None:
        s = server(tmp_path, model_dir)
        restarts: list[str] = []
        s.restart_lmcache = lambda why, reason, **kw: restarts.append(why)  # type: ignore[method-assign]
        run = s.config.runtime_dir
        engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            write_state(run, record("decode-worker", engine_pid=engine.pid))
            assert not await s.watch_engines()
            # The old process marks the stop, stops its engine and exits; the next one starts and publishes.
            write_state(run, record("decode-worker", engine_pid=engine.pid, engines_stopped=[engine.pid]))
            engine.kill()
            engine.wait()
            successor = DecodeWorker(s.config)
            write_state(run, successor.state_record())
            assert not await s.watch_engines(), restarts
            assert restarts == [] and not s.engines
        finally:
            engine.kill()
    asyncio.run(scenario())


# -- the workers' side -----------------------------------------------------------------------------------------
def test_a_worker_starts_its_engine_only_once_lmcache_server_looked_after_the_loss(tmp_path, model_dir):
    config = config_with(tmp_path, model_dir, lmcache={"restart_on_engine_loss": "always"})
    worker = PrefillWorker(config)
    lost_at = time.time()

    def view(state: State, checked: float | None) -> PeerView:
        details = {} if checked is None else {"engines_checked_at": checked}
        return PeerView("lmcache-server", state.value, True, "", record("lmcache-server", state, **details))

    assert "degraded" in worker.kv_store_settled(view(State.DEGRADED, lost_at + 1), lost_at)
    assert "has not looked" in worker.kv_store_settled(view(State.READY, lost_at - 1), lost_at)
    assert "has not looked" in worker.kv_store_settled(view(State.READY, None), lost_at)
    assert worker.kv_store_settled(view(State.READY, lost_at + 1), lost_at) == ""
    cpu = PrefillWorker(config_with(tmp_path, model_dir))  # no restarts on a loss: ready is enough
    assert cpu.kv_store_settled(view(State.READY, None), lost_at) == ""


def test_a_prefill_engine_degraded_by_lmcache_still_takes_failover() -> None:
    def view(state: State, usable: bool = True, **details: object) -> PeerView:
        return PeerView("prefill-worker", state.value, usable, "", record("prefill-worker", state, **details))

    assert view(State.DEGRADED, engine_serving=True).serves_whole  # LMCache stuck: the engine serves
    assert not view(State.DEGRADED, engine_serving=False).serves_whole  # its engine does not answer
    assert not view(State.READY, usable=False, engine_serving=True).serves_whole  # stale, dead or unreachable
    assert view(State.READY).serves_whole and not view(State.DEGRADED).serves_whole  # an older record: by ready


# -- the probe's client and a stuck process's stacks ----------------------------------------------------------------
def test_a_lookup_client_that_dies_at_start_is_stopped_cleanly_and_lookups_fail_fast(tmp_path):
    async def scenario() -> None:
        lookup = KVLookup(server_url="tcp://127.0.0.1:9", model="m", mq_timeout_s=1, heartbeat_interval_s=1,
                          log_path=tmp_path / "lookup.log")
        lookup.argv = [sys.executable, "-c", "import sys; sys.exit(3)"]
        lookup.ensure_started()
        with pytest.raises(RuntimeError, match="not running"):
            await lookup.hit_tokens([1, 2], 1.0)
        await asyncio.sleep(0.5)
        await asyncio.wait_for(lookup.stop(), 10)  # no recursion between the start task and stop
        assert not lookup.alive
    asyncio.run(scenario())


def test_the_stacks_of_a_stuck_python_process_are_taken_without_stopping_it(tmp_path):
    log = tmp_path / "child.log"
    code = ("import faulthandler, signal, time\n"
            "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
            "def stuck_here():\n    time.sleep(60)\n"
            "print('up', flush=True)\nstuck_here()\n")
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "up" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        stacks = asyncio.run(thread_stacks(proc.pid, log, wait_s=1.0))
        assert "stuck_here" in stacks and ("Thread 0x" in stacks or "Current thread 0x" in stacks), stacks
        assert proc.poll() is None  # still running: the dump does not kill it
        proc.send_signal(signal.SIGSTOP)  # no handler runs, and it says so
        deadline = time.monotonic() + 10
        while process_state(proc.pid) != "T":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "stopped" in asyncio.run(thread_stacks(proc.pid, log, wait_s=0.1))
    finally:
        proc.kill()
        proc.wait()
    assert "gone" in asyncio.run(thread_stacks(proc.pid, log, wait_s=0.1))
