"""Daemon.run() driven through every lifecycle path with fakes (no engine, no LMCache):
start, dependency wait, child death before and after serving, SIGTERM, exceptions.
Each test asserts the states walked, the final state file and the exit status."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from daemons.config import Config, parse_config
from daemons.runtime import states
from daemons.runtime.httpserver import EmbeddedServer
from daemons.runtime.lifecycle import Daemon, DaemonFailed
from daemons.runtime.statefile import PeerView, StateRecord, read_state
from daemons.runtime.states import IllegalTransition, Lifecycle, State

DEADLINE_S = 20.0  # no test here may take longer: a hang is a failure


@pytest.fixture
def config(tmp_path: Path) -> Config:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    doc = {"runtime_dir": str(tmp_path / "run"), "log_dir": str(tmp_path / "log"), "model": {"path": str(model)},
           "readiness": {"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 5, "dependency_timeout_s": 2,
                         "drain_timeout_s": 1}}
    return parse_config(doc, tmp_path / "disagg.yaml")


class FakeDaemon(Daemon):
    """A daemon whose start-up and health check are whatever the test says; its API is a real server."""

    kind = "prefill-worker"

    def __init__(self, config: Config, *, start_up: Callable[[FakeDaemon], Awaitable[None]],
                 check: Callable[[FakeDaemon], Awaitable[bool]] | None = None) -> None:
        super().__init__(config, strict=True)
        self._start_up, self._check = start_up, check
        self.walked: list[State] = [self.state]  # where every daemon begins
        self.shut_down_called = False
        changed = self.status.changed

        def record(state: State, reason: str, new_state: bool) -> None:
            if new_state:
                self.walked.append(state)
            changed(state, reason, new_state)

        self.lifecycle._on_change = record

    @property
    def endpoint(self) -> str:
        return "127.0.0.1:1"

    @property
    def metrics_address(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    async def start_up(self) -> None:
        await self._start_up(self)

    async def check(self) -> bool:
        return await self._check(self) if self._check else True

    async def shut_down(self) -> None:
        self.shut_down_called = True

    async def open_api(self) -> None:
        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            pass
        await self.serve_http(EmbeddedServer(app, "127.0.0.1", 0, name="fake API", drain_s=1))


def run(daemon: Daemon) -> int:
    return asyncio.run(asyncio.wait_for(daemon.run(), DEADLINE_S))


def final(daemon: Daemon) -> StateRecord:
    record = read_state(daemon.config.runtime_dir, daemon.name)
    assert record is not None
    return record


async def serve_then_stop(d: FakeDaemon) -> None:
    d.set_state(State.LOADING, "loading")
    await d.open_api()
    d.set_state(State.READY)
    asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)


def test_start_serve_and_sigterm_drain_then_stop(config: Config) -> None:
    d = FakeDaemon(config, start_up=serve_then_stop)
    assert run(d) == 0
    assert d.walked == [State.STARTING, State.LOADING, State.READY, State.DRAINING, State.STOPPED]
    assert final(d).state is State.STOPPED and final(d).reason == "stopped on request"
    assert d.shut_down_called


def fake_peer(views: list[str]) -> Callable[[str], PeerView]:
    """Each call judges the peer by the next state in ``views`` (the last one repeats)."""
    def assess(name: str) -> PeerView:
        state = views.pop(0) if len(views) > 1 else views[0]
        return PeerView(name, state, state == "ready", "fake", None)
    return assess


async def wait_then_serve(d: FakeDaemon) -> None:
    if await d.wait_for("lmcache-server") is None:
        return
    await serve_then_stop(d)


def test_dependency_wait_then_serve(config: Config) -> None:
    d = FakeDaemon(config, start_up=wait_then_serve)
    d.peers.assess = fake_peer(["absent", "loading", "ready"])  # type: ignore[method-assign]
    assert run(d) == 0
    assert d.walked[:4] == [State.STARTING, State.WAITING, State.LOADING, State.READY]
    assert final(d).state is State.STOPPED


def test_dependency_never_ready_fails_with_the_reason(config: Config) -> None:
    d = FakeDaemon(config, start_up=wait_then_serve)
    d.peers.assess = fake_peer(["loading"])  # type: ignore[method-assign]
    assert run(d) == 1
    assert d.walked == [State.STARTING, State.WAITING, State.FAILED]
    assert final(d).state is State.FAILED and "lmcache-server not ready after 2s" in final(d).reason


def test_sigterm_while_waiting_for_a_dependency_stops_cleanly(config: Config) -> None:
    async def start_up(d: FakeDaemon) -> None:
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)
        await wait_then_serve(d)

    d = FakeDaemon(config, start_up=start_up)
    d.peers.assess = fake_peer(["loading"])  # type: ignore[method-assign]
    assert run(d) == 0
    assert d.walked == [State.STARTING, State.WAITING, State.STOPPED]


def test_child_death_while_loading_fails_without_draining(config: Config) -> None:
    async def start_up(d: FakeDaemon) -> None:
        d.set_state(State.LOADING, "loading")
        raise DaemonFailed("engine exited with status 1: CUDA out of memory")

    d = FakeDaemon(config, start_up=start_up)
    assert run(d) == 1
    assert d.walked == [State.STARTING, State.LOADING, State.FAILED]
    assert final(d).reason == "engine exited with status 1: CUDA out of memory"
    assert d.shut_down_called  # whatever was started is stopped


def test_child_death_after_serving_ends_failed_not_draining(config: Config) -> None:
    """The engine dies after the API opened: the drain that follows must not overwrite ``failed``."""
    async def start_up(d: FakeDaemon) -> None:
        d.set_state(State.LOADING, "loading")
        await d.open_api()
        d.set_state(State.READY)

    async def check(d: FakeDaemon) -> bool:
        if d.state is State.READY:
            raise DaemonFailed("engine killed by signal 9")
        return True

    d = FakeDaemon(config, start_up=start_up, check=check)
    assert run(d) == 1
    assert d.walked == [State.STARTING, State.LOADING, State.READY, State.FAILED]
    assert final(d).state is State.FAILED and final(d).reason == "engine killed by signal 9"
    assert d.shut_down_called


@pytest.mark.parametrize("exc", [KeyError("model"), ZeroDivisionError("bug"), GeneratorExit()])
def test_any_unexpected_exception_in_start_up_ends_failed(config: Config, exc: BaseException) -> None:
    async def start_up(d: FakeDaemon) -> None:
        d.set_state(State.LOADING, "loading")
        await d.open_api()
        raise exc

    d = FakeDaemon(config, start_up=start_up)
    assert run(d) == 1
    assert final(d).state is State.FAILED and type(exc).__name__ in final(d).reason
    assert State.STOPPED not in d.walked and State.DRAINING not in d.walked


def test_a_check_that_raises_something_else_is_unhealthy_not_fatal(config: Config) -> None:
    calls = []

    async def check(d: FakeDaemon) -> bool:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("flaky probe")
        return True

    async def start_up(d: FakeDaemon) -> None:
        await serve_then_stop(d)

    d = FakeDaemon(config, start_up=start_up, check=check)
    assert run(d) == 0 and len(calls) >= 2
    assert final(d).state is State.STOPPED


def test_a_port_in_use_fails_with_a_clear_reason(config: Config) -> None:
    async def start_up(d: FakeDaemon) -> None:
        d.set_state(State.LOADING, "loading")
        raise OSError("front door: could not listen on 127.0.0.1:8000 (port in use?)")

    d = FakeDaemon(config, start_up=start_up)
    assert run(d) == 1
    assert "port in use" in final(d).reason


# -- the table ---------------------------------------------------------------------------------
def test_the_docstring_diagram_is_the_table() -> None:
    assert textwrap.indent(states.diagram(), "  ") in (states.__doc__ or "")


def test_failed_is_terminal_and_keeps_its_first_reason() -> None:
    lc = Lifecycle("x", strict=True)
    lc.to(State.LOADING)
    assert lc.fail("engine died")
    assert not lc.fail("drain error")  # the first reason stays
    with pytest.raises(IllegalTransition):
        lc.to(State.DRAINING)
    assert (lc.state, lc.reason) == (State.FAILED, "engine died")


@pytest.mark.parametrize("path", [
    [State.READY, State.LOADING], [State.READY, State.STOPPED], [State.DEGRADED, State.WAITING],
    [State.READY, State.DRAINING, State.READY], [State.STOPPED, State.READY],
])
def test_illegal_transitions_raise_when_strict(path: list[State]) -> None:
    lc = Lifecycle("x", strict=True)
    lc.to(State.LOADING)
    for state in path[:-1]:
        lc.to(state)
    with pytest.raises(IllegalTransition):
        lc.to(path[-1])


def test_illegal_transitions_are_logged_and_refused_in_production(caplog: pytest.LogCaptureFixture) -> None:
    lc = Lifecycle("prefill-worker", strict=False)
    lc.to(State.LOADING)
    lc.to(State.READY)
    assert not lc.to(State.LOADING, "again")
    assert lc.state is State.READY
    assert "illegal transition ready -> loading" in caplog.text


def test_every_state_can_fail_until_terminal() -> None:
    for state in State:
        assert (State.FAILED in states.TRANSITIONS[state]) != state.terminal


def test_a_drain_grace_keeps_serving_while_health_says_503_then_stops_accepting(config: Config, tmp_path: Path) -> None:
    import socket

    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    cfg = config.model_copy(update={"readiness": config.readiness.model_copy(update={"drain_grace_s": 1.5})})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen: list[tuple[float, int, int]] = []  # (time since SIGTERM, /health status, /work status)

    async def serve_and_probe(d: FakeDaemon) -> None:
        async def health(_):  # type: ignore[no-untyped-def]
            return JSONResponse({}, status_code=200 if d.state.serving else 503)

        async def work(_):  # type: ignore[no-untyped-def]
            return JSONResponse({"ok": True})

        app = Starlette(routes=[Route("/health", health), Route("/work", work)])
        d.set_state(State.LOADING, "loading")
        await d.serve_http(EmbeddedServer(app, "127.0.0.1", port, name="api", drain_s=1))
        d.set_state(State.READY)
        t0 = asyncio.get_running_loop().time()
        os.kill(os.getpid(), signal.SIGTERM)

        async def probe() -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=1) as client:
                while True:
                    now = asyncio.get_running_loop().time() - t0
                    try:
                        h, w = (await client.get("/health")).status_code, (await client.get("/work")).status_code
                    except httpx.TransportError:
                        seen.append((now, 0, 0))
                        return
                    seen.append((now, h, w))
                    await asyncio.sleep(0.1)

        asyncio.get_running_loop().create_task(probe())

    d = FakeDaemon(cfg, start_up=serve_and_probe)
    assert run(d) == 0
    served = [(t, h, w) for t, h, w in seen if h]
    assert served and all(h == 503 and w == 200 for _, h, w in served[1:])  # 503 for balancers, still serving
    assert served[-1][0] >= 1.0  # for the grace, then connections are refused
    assert seen[-1][1] == 0
    assert d.walked[-2:] == [State.DRAINING, State.STOPPED]


def test_sighup_reloads_and_the_daemon_goes_on(config: Config, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "disagg.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude={"source"})))
    from daemons.config import load_config

    cfg = load_config(path)
    reloads: list[list[str]] = []

    async def serve_hup_then_stop(d: FakeDaemon) -> None:
        d.set_state(State.LOADING, "loading")
        d.set_state(State.READY)
        doc = yaml.safe_load(path.read_text())
        doc["readiness"]["drain_timeout_s"] = 2
        path.write_text(yaml.safe_dump(doc))
        original = d.reload_config

        async def recorded() -> list[str]:
            reloads.append(await original())
            return reloads[-1]

        d.reload_config = recorded  # type: ignore[method-assign]
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if reloads:
                break
            await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    d = FakeDaemon(cfg, start_up=serve_hup_then_stop)
    assert run(d) == 0  # SIGHUP did not stop it; SIGTERM did
    assert reloads == [["readiness.drain_timeout_s"]]  # nothing of it changes live: needs a restart
    assert d.walked[-2:] == [State.DRAINING, State.STOPPED]


def test_a_long_drain_keeps_the_watchdog_fed_and_the_state_file_fresh(config: Config, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """(issue 30.5) The heartbeat used to stop before the drain: no STOPPING=1, no watchdog pings (systemd's SIGABRT
    past WatchdogSec), and a draining daemon's state file went stale for its peers."""
    import socket
    import threading
    import time

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def read() -> None:  # as systemd does: the socket's queue (10 datagrams) never fills
        while not done.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WatchdogSec=0.4: a ping every 0.2 s at most
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    seen: dict[str, float] = {}

    class SlowDrain(FakeDaemon):
        async def shut_down(self) -> None:  # the engine takes 1.5 s to stop
            seen["heartbeat_before"] = final(self).heartbeat
            seen["start"] = time.monotonic()
            await asyncio.sleep(1.5)
            seen["heartbeat_after"] = final(self).heartbeat
            seen["end"] = time.monotonic()

    d = SlowDrain(config, start_up=serve_then_stop)
    try:
        assert run(d) == 0
    finally:
        time.sleep(0.3)
        done.set()
        reader.join(5)
        sock.close()
    assert "STOPPING=1" in messages
    stopping = messages.index("STOPPING=1")
    # Pings during the 1.5 s drain (every 0.1 s: the heartbeat's own interval is shorter than the watchdog's).
    assert messages[stopping:].count("WATCHDOG=1") >= 5, messages[stopping:]
    assert seen["heartbeat_after"] - seen["heartbeat_before"] >= 1.0  # the state file stayed fresh
