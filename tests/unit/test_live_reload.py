"""SIGHUP-changed settings are really live, and only they (issue 30.3): admission lowered with requests in progress,
the upstream pool never the bound (a real socket), a failed reload said as such, a key that needs a restart not
half-applied."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import yaml

from daemons.config import load_config
from daemons.decode_worker import DecodeWorker
from daemons.edge.admission import Admission, Overloaded


def test_a_lowered_cap_admits_no_one_until_fewer_are_in_progress() -> None:
    async def scenario() -> None:
        adm = Admission(10, 4, 0.05)
        for _ in range(2):
            await adm.acquire()
        adm.resize(5, 4, 0.05)
        for _ in range(3):
            await adm.acquire()  # 2 + 3 = the new cap
        with pytest.raises(Overloaded, match="queue_timeout"):  # queued, and no slot comes: the cap is full
            await adm.acquire()
        assert adm.active == 5
        adm.resize(6, 4, 0.05)  # raised: one more, at once
        await adm.acquire()
        assert adm.active == 6
    asyncio.run(scenario())


def test_a_raised_cap_admits_the_waiters_at_once_and_a_waiter_that_leaves_gives_its_slot_back() -> None:
    async def scenario() -> None:
        adm = Admission(1, 4, 30)
        await adm.acquire()
        waiters = [asyncio.create_task(adm.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        assert adm.queued == 3
        waiters[2].cancel()  # a client that left while queued
        adm.resize(3, 4, 30)
        await asyncio.wait_for(asyncio.gather(*waiters[:2]), 5)
        await asyncio.gather(waiters[2], return_exceptions=True)
        assert adm.active == 3 and adm.queued == 0
        for _ in range(3):
            adm.release()
        assert adm.active == 0
    asyncio.run(scenario())


def test_the_upstream_pool_never_bounds_what_admission_allows_after_a_reload(decode_config: Path) -> None:
    """A real engine-like server holds every request until sixteen are in. decode-worker's pool was sized from the
    cap at start (4 + 8): a reload raising the cap to 20 left calls past 12 waiting for a connection, failing as if
    the engine were broken."""
    doc = yaml.safe_load(decode_config.read_text())
    doc["decode_worker"]["max_concurrent_requests"] = 4
    worker = DecodeWorker(load_config(write(decode_config, doc)), strict=True)
    doc["decode_worker"]["max_concurrent_requests"] = 20
    write(decode_config, doc)
    n = 16

    async def scenario() -> None:
        assert "decode_worker.max_concurrent_requests" not in await worker.reload_config()  # live
        arrived, all_in = 0, asyncio.Event()

        async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal arrived
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)  # the JSON body: {}
            arrived += 1
            if arrived == n:
                all_in.set()
            try:
                await asyncio.wait_for(all_in.wait(), 10)
            except TimeoutError:
                pass
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(engine, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = worker.upstream
        async with server:
            answers = await asyncio.gather(*(upstream.post(f"http://127.0.0.1:{port}/x", {}, timeout_s=30)
                                             for _ in range(n)))
        await upstream.aclose()
        assert all_in.is_set() and [a.status_code for a in answers] == [200] * n
    asyncio.run(scenario())


def write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def decode_config(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "etc" / "disagg.yaml").read_text())
    doc.update(runtime_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "log"))
    doc["model"]["path"] = str(model)
    return write(tmp_path / "disagg.yaml", doc)


def test_a_key_that_needs_a_restart_is_not_half_applied(decode_config: Path) -> None:
    worker = DecodeWorker(load_config(decode_config), strict=True)
    before = worker.worker
    doc = yaml.safe_load(decode_config.read_text())
    doc["decode_worker"].update(max_concurrent_requests=before.max_concurrent_requests + 7,
                                engine_restart_limit=before.engine_restart_limit + 3,
                                extra_engine_args=["--max-num-batched-tokens", "4096"])
    write(decode_config, doc)
    pending = asyncio.run(worker.reload_config())
    assert "decode_worker.engine_restart_limit" in pending and "decode_worker.extra_engine_args" in pending
    assert worker.worker.engine_restart_limit == before.engine_restart_limit  # said to need a restart: not applied
    assert worker.worker.extra_engine_args == before.extra_engine_args
    assert worker.worker.max_concurrent_requests == before.max_concurrent_requests + 7  # live
    assert worker.front_door.admission.max_concurrent == before.max_concurrent_requests + 7


def test_a_reload_that_fails_says_so_and_the_daemon_goes_on(decode_config: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    worker = DecodeWorker(load_config(decode_config), strict=True)

    def broken(*_: object) -> set[str]:
        raise RuntimeError("the API keys file vanished mid-read")

    worker.apply_config = broken  # type: ignore[method-assign]
    doc = yaml.safe_load(decode_config.read_text())
    doc["decode_worker"]["queue_timeout_s"] = 3
    write(decode_config, doc)

    async def scenario() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, worker._on_hup)
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "reload_failed" in worker.details:
                break
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert "the API keys file vanished" in worker.details["reload_failed"]
    assert any("reload failed: RuntimeError" in r.getMessage() for r in caplog.records)


def test_what_the_reference_marks_live_a_reload_applies_and_nothing_else(decode_config: Path) -> None:
    """docs/reference/configuration.md's "on SIGHUP" column (LIVE_KEYS): every decode_worker key of a plain type
    changed at once; a reload applies exactly those marked live and names every other as needing a restart."""
    from daemons.config_sections import DecodeWorkerConfig
    from daemons.edge.door_settings import LIVE_KEYS

    worker = DecodeWorker(load_config(decode_config), strict=True)
    before = worker.worker
    doc = yaml.safe_load(decode_config.read_text())
    changed = {}
    for name in DecodeWorkerConfig.model_fields:
        value = getattr(before, name)
        if isinstance(value, bool):
            changed[name] = not value
        elif isinstance(value, int) and name not in ("port", "engine_port", "metrics_port"):
            changed[name] = value + 1
        elif isinstance(value, float):
            changed[name] = value + 1.5
        elif name == "routing":
            changed[name] = "round_robin" if value == "load" else "load"
    assert {"max_concurrent_requests", "routing", "engine_restart_limit", "first_token_timeout_s"} <= set(changed)
    doc["decode_worker"].update(changed)
    write(decode_config, doc)
    pending = set(asyncio.run(worker.reload_config()))
    live = {name for name in changed if name in LIVE_KEYS}
    assert pending == {f"decode_worker.{name}" for name in changed if name not in LIVE_KEYS}
    assert live and all(getattr(worker.worker, name) == changed[name] for name in live)
    assert all(getattr(worker.worker, name) == getattr(before, name) for name in changed if name not in LIVE_KEYS)


def test_the_sections_api_keys_file_is_live_for_an_instance_too_and_never_half_applied(decode_config: Path,
                                                                                       tmp_path: Path) -> None:
    """decode_worker.api_keys_file set once for every instance: a reload of decode-worker@a took the section's key for
    one that needs a restart (the instance's own key was the only one it looked for), kept the old keys, and yet
    recorded the new path as running. Live (the reference says so): the new file's keys, the old file's refused; a
    file that cannot be read leaves the old keys and the old path."""
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    k1.write_text("key-one-0123456789abcdef\n")
    k2.write_text("key-two-0123456789abcdef\n")
    k1.chmod(0o600)
    k2.chmod(0o600)
    doc = yaml.safe_load(decode_config.read_text())
    doc["decode_worker"].update(api_keys_file=str(k1), instances={
        "a": {}, "b": {"port": 18020, "engine_port": 18021, "metrics_port": 19121}})
    worker = DecodeWorker(load_config(write(decode_config, doc)), instance="a", strict=True)
    assert worker.keys.path == k1
    doc["decode_worker"]["api_keys_file"] = str(k2)
    write(decode_config, doc)
    assert "decode_worker.api_keys_file" not in asyncio.run(worker.reload_config())
    assert worker.keys.path == k2 and worker.worker.api_keys_file == k2
    assert worker.keys.allows("Bearer key-two-0123456789abcdef") and not worker.keys.allows("Bearer key-one-0123456789abcdef")
    doc["decode_worker"]["api_keys_file"] = str(tmp_path / "missing")
    write(decode_config, doc)
    asyncio.run(worker.reload_config())
    assert worker.keys.path == k2 and worker.worker.api_keys_file == k2  # the old keys run: the old path is said
