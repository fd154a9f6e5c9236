"""decode-worker: a vLLM engine as LMCache KV consumer plus the public front door.

Start: open the front door first, then wait for lmcache-server (the engine's connector registers with it),
load the engine, wait up to ``prefill_wait_s`` for prefill-worker, then send the KV-path canary
(:mod:`daemons.kv.canary`) through the whole path. Ready only while the dependencies are ready *and* the
last canary got its KV from LMCache; degraded (still serving) otherwise, with the broken hop in the reason.
The canary runs every ``kv_path.canary_interval_s`` (more often while it fails), at once when
lmcache-server comes back as a new process, and when a request saw its KV go missing. While it fails at a
prefill-side hop, or at the decode side through one prefill-worker while another passes, requests skip
that prefill-worker instead of waiting on it.

The service outlives its engine: while the decode engine cannot serve — loading, reloading, silent — the
front door stays open and requests go whole to a ready prefill engine (path ``failover``, bounded by
``failover_max_in_flight``); only with no engine to serve them do they get 503 + Retry-After. A decode
engine that died, is wedged (:mod:`daemons.children.stall`), or failed the canary at the decode side
through every prefill-worker ``restart_after_failures`` times in a row without computing anything, is
restarted here, in place, with a backoff; past ``engine_restart_limit`` restarts within
``engine_restart_window_s`` the daemon exits non-zero, for systemd/supervisord to restart it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import replace

from daemons.children.child_daemon import CodeChanged
from daemons.children.worker import EngineDaemon, engine_stall_detector
from daemons.config import Config, ConfigError
from daemons.config_sections import DecodeWorkerConfig
from daemons.edge.auth import ApiKeys
from daemons.edge.cluster_auth import cluster_headers
from daemons.edge.door_settings import LIVE_KEYS, SETTINGS_KEYS
from daemons.edge.frontdoor import FrontDoor, FrontDoorSettings
from daemons.edge.upstream import Upstream
from daemons.kv.canary import CanaryResult, PathCanary, vocabulary
from daemons.metrics import FrontDoorMetrics
from daemons.names import SHARED_FRONT_DOOR
from daemons.routing.placement import ROUND_ROBIN
from daemons.routing.prefill_router import LMCACHE, PrefillRouter
from daemons.runtime.cli import run_daemon
from daemons.runtime.httpserver import EdgeLimits, EmbeddedServer
from daemons.runtime.lifecycle import DaemonFailed
from daemons.runtime.listen import (
    bind_listening,
    inherited_socket,
    loopback_if_wildcard,
    url_host,
)
from daemons.runtime.remote_state import state_url
from daemons.runtime.statefile import PeerView
from daemons.runtime.states import State

log = logging.getLogger(__name__)

# While the canary fails, it runs at least this often.
CANARY_RETRY_S = 5.0
# An engine that has not answered its worker for this long is taken out of serving: requests fail over.
DECODE_SILENT_S = 10.0
# The longest wait between two failed engine starts.
ENGINE_BACKOFF_MAX_S = 30.0


def p2p_peers(view: PeerView | None) -> set[str]:
    """The hosts whose LMCache servers this host's lmcache-server has a P2P link to (from its state record)."""
    if view is None or view.record is None:
        return set()
    p2p = view.record.details.get("p2p")
    peers = p2p.get("peers") if isinstance(p2p, dict) else None
    return {str(p).split(".", 1)[0] for p in peers} if isinstance(peers, list) else set()


class DecodeWorker(EngineDaemon):
    """Run the decode engine (KV consumer) and the OpenAI-compatible front door."""

    kind = "decode-worker"
    role = "kv_consumer"
    worker: DecodeWorkerConfig

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)
        self.prefill_names = list(config.workers("prefill-worker"))
        # The box's other decode-workers (instances): failover and migration go to one whose engine serves first.
        siblings = {name: f"http://{url_host(loopback_if_wildcard(w.host))}:{w.port}"
                    for name, w in config.workers("decode-worker").items()
                    if name != self.name and self.deployment.is_local(name)}
        self.peers.names = [LMCACHE, *self.prefill_names, *siblings]
        # Prefill-workers on other hosts: judged from the record they serve (readiness over a socket).
        self.remote_prefills = {n: config.cluster.host_of(n) for n in self.prefill_names
                                if config.cluster is not None and not self.deployment.is_local(n)}
        self.peers.remote = {n: state_url(self.deployment.address_of(n), config.workers("prefill-worker")[n].port)
                             for n in self.remote_prefills}
        self.front_metrics = FrontDoorMetrics(self.registry)
        self.router = PrefillRouter(self.prefill_names, self.peers, self.front_metrics, on_change=self._update_state,
                                    siblings=siblings)
        kv = config.kv_path
        self.canary = PathCanary(
            client=self.http, model=config.model.name, vocab=vocabulary(config.model.path),
            chunk_size=config.lmcache.chunk_size, decode_url=self.engine_url, timeout_s=kv.canary_timeout_s,
            crosscheck_tolerance=self.worker.kv_crosscheck_tolerance if self.worker.kv_crosscheck else None,
        )
        self.decode_side_failures = 0  # canaries in a row that broke at the decode side
        self._progress_at_first_failure: float | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self.canaries_started = 0
        self._canary_turn = 0  # the prefill-worker next in turn for a quiet round's canary
        self._fatal: str | None = None
        self.engine_serving = False  # the decode engine is up and was healthy since its (re)start
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_reason = ""  # why the engine is being restarted ("" when it is not)
        self._reloads: deque[float] = deque()  # when the engine was restarted in place (the budget's window)
        self.engine_lost_at = self.started_at  # wall clock: the last loss of the engine (or this daemon's start)
        self.keys = ApiKeys(self.worker.api_keys_file)  # ApiKeyError (a ConfigError): exit 78
        w = self.worker
        # Across hosts, every call to a prefill-worker (prefill, failover, migration, canary, its state) carries the
        # cluster's secret; its local engine ignores the header.
        across = cluster_headers(config)  # ConfigError (exit 78): unreadable or short secret
        self.http.headers.update(across)
        self.peers.remote_headers = across
        self.upstream = Upstream(headers=across)  # the proxied calls' own pool (probes use httpx); admission bounds it
        self.canary.engine = self.upstream  # the canary's decode call is an engine call (never aborted while loading)
        self.front_door = FrontDoor(
            FrontDoorSettings.from_config(w, self.engine_url),
            client=self.upstream, metrics=self.front_metrics, router=self.router, health=self._health, keys=self.keys,
            decode_down=self.decode_down, engine_pressed=lambda: self.last_load is not None and self.last_load.pressed,
        )
        self.front_metrics.decode_engine_up.set_function(lambda: 0 if self.decode_down() else 1)

    def decode_down(self) -> str:
        """Why the decode engine cannot serve a request now ("" when it can): the front door fails over then."""
        if self._reload_reason:
            return f"reloading: {self._reload_reason}"
        if not self.engine_serving:
            return "loading"
        silent = self.stall.silent_for(time.monotonic())
        if silent >= DECODE_SILENT_S:
            return f"not answering for {silent:.0f}s"
        broken = self.router.decode_side_failure()
        if broken is not None and broken.hop == "decode_engine":
            return f"failing the canary ({broken.describe()})"
        return ""

    def _health(self) -> tuple[str, bool, str]:
        """What /health says: 200 while some engine can serve a request (the decode engine, or a prefill engine
        by failover), so a load balancer keeps sending what can be served."""
        if self.stopping or self.state.terminal:
            return self.state.value, False, self.reason
        down = self.decode_down()
        can_fail_over = (self.worker.failover_max_in_flight > 0 and bool(self.router.serving_prefills())
                         or bool(self.router.serving_siblings()))
        return self.state.value, not down or can_fail_over, self.reason

    # -- state -----------------------------------------------------------------------
    async def refresh_peers(self) -> None:
        changes = await self.peers.refresh()
        if LMCACHE in changes.renewed:
            log.warning("lmcache-server came back as a new process (pid %s): checking the KV path now",
                        self.peers.generations[LMCACHE][0])  # type: ignore[index]
        self.router.peers_changed(changes)
        self.router.prefills_judged()

    def degraded_reason(self, problems: list[str]) -> str:
        """What degraded means now: the decode engine computing prompts itself, or failing requests over."""
        if self.decode_down():
            return "; ".join(problems)
        return "decode computes prompts itself: " + "; ".join(problems)

    def _update_state(self) -> None:
        # Whether this engine takes requests now: a sibling decode-worker sends its failovers here only then.
        self.details["engine_serving"] = not self.stopping and not self.decode_down()
        # Requests on this engine now: the box's endpoint sends a sibling's requests here while it holds fewer.
        self.details["in_progress"] = self.front_door.placement.engine_requests()
        self.details["capacity"] = self.front_door.settings.max_concurrent_requests  # its slots, for the same reason
        self.details["routing"] = self.front_door.settings.routing  # decode_worker.routing as SIGHUP last left it
        # In the state file (disaggctl status): the prefill-workers whose KV path the last canary verified.
        self.details["prefills_checked"] = sorted(
            name for name, result in self.router.canary_results.items() if result.ok and self.peers.ready(name))
        if not self.state.serving:
            return
        problems = self.problems()
        if problems:
            self.set_state(State.DEGRADED, self.degraded_reason(problems))
        else:
            self.set_state(State.READY)

    async def start_up(self) -> None:
        # The front door first: from here on it answers (failover, or 503 + Retry-After) whatever the engine does.
        w = self.worker
        limits = EdgeLimits(keep_alive_s=w.keep_alive_timeout_s, header_timeout_s=w.header_timeout_s,
                            max_connections=w.max_connections)
        env = dict(os.environ)  # both sockets from the same activation variables (the first call clears them)
        sock = await asyncio.to_thread(inherited_socket, self.name, self.api_host, w.port, env)
        shared = await asyncio.to_thread(self._shared_socket, env)
        # The peers first: the requests waiting in a held socket's backlog fail over to a ready prefill engine
        # the moment the front door opens (a restarted decode-worker knows nothing of them before this).
        await self.refresh_peers()
        await self.serve_http(EmbeddedServer(self.front_door.app(), self.api_host, w.port, name="front door",
                                             drain_s=self.config.readiness.drain_timeout_s, limits=limits, sock=sock))
        if shared is not None:
            host, port = shared.getsockname()[:2]
            await self.serve_http(EmbeddedServer(self.front_door.app(shared=True), host, port,
                                                 name="front door (the box's endpoint)",
                                                 drain_s=self.config.readiness.drain_timeout_s, limits=limits,
                                                 sock=shared))
        if await self.wait_for("lmcache-server") is None:
            return
        if not await self._engine_until_up(f"loading {self.config.model.name} on {self.worker.device}"):
            return
        try:
            waited = await self.wait_for(self.prefill_names, timeout_s=self.worker.prefill_wait_s)
        except TimeoutError as exc:
            log.warning("serving degraded: %s", exc)
            waited = None
        if self.stopping:
            return
        await self.refresh_peers()
        if waited:
            self.set_state(State.WAITING, "sending the KV-path canary")
            await self.run_canaries()
        # Serving from here on: ready if the peers and the KV path are, degraded otherwise.
        problems = self.problems() if waited else ["prefill-worker not ready"]
        self.set_state(State.DEGRADED if problems else State.READY,
                       self.degraded_reason(problems) if problems else "")
        self._canary_task = asyncio.create_task(self._canary_loop(), name="canary")

    def _shared_socket(self, env: dict[str, str]) -> socket.socket | None:
        """The box's one endpoint (decode_worker.shared_port), every decode-worker of the host accepting on it: one
        socket from systemd or the socket holder, else bound here with SO_REUSEPORT beside the siblings' own.
        OSError (the port is taken by something else) fails the start like the front door's own port."""
        shared = self.deployment.shared_front_door()
        if shared is None:
            return None
        host, port = shared
        sock = inherited_socket(SHARED_FRONT_DOOR, host, port, env)
        if sock is None:
            sock = bind_listening(host, port, reuse_port=True)
            log.info("the box's endpoint %s:%d bound here (SO_REUSEPORT: the kernel spreads connections over the "
                     "decode-workers that bound it; none holds it across restarts)", host, port)
        return sock

    async def run_canaries(self, every: bool = True) -> None:
        """Canaries through the ready prefill-workers; the results feed state and routing.

        ``every``: one through each (at start, when asked for, while any fails). Otherwise, on the quiet schedule,
        one through each prefill-worker not checked yet and else one through the next in turn: each of M
        decode-workers sends one canary an interval, not one per prefill-worker (M x N), so each path is checked
        every N intervals, and this decode engine's side every interval."""
        ready = [view for view in self.router.ready_prefills() if view.record is not None]
        if not every and ready:
            unchecked = [view for view in ready if view.daemon not in self.router.canary_results]
            ready = unchecked or [ready[self._canary_turn % len(ready)]]
            self._canary_turn += not unchecked
        for view in ready:
            assert view.record is not None
            result = await self.canary.run(f"http://{view.record.endpoint}")
            self.router.record_canary(view.daemon, self._blame_p2p(view.daemon, result))
        self.router.forget_unready()

    def _blame_p2p(self, prefill: str, result: CanaryResult) -> CanaryResult:
        """A canary via another host whose KV did not arrive, while this host's LMCache has no P2P link to
        that host: the hop that broke is between the hosts (``p2p_fetch``), not this decode engine."""
        host = self.remote_prefills.get(prefill)
        if result.ok or result.hop != "decode_load" or host is None:
            return result
        peers = p2p_peers(self.peers.views.get(LMCACHE))
        if host in peers:
            return result
        return replace(result, hop="p2p_fetch", detail=f"{result.detail}; lmcache-server here has no P2P link "
                       f"to host {host} (its peers: {', '.join(sorted(peers)) or 'none'})")

    async def _canary_loop(self) -> None:
        interval = self.config.kv_path.canary_interval_s
        spacing = self.config.kv_path.canary_min_spacing_s
        check_now = self.router.check_now
        last = -spacing
        while not self.stopping:
            failing = any(not r.ok for r in self.router.canary_results.values())
            try:
                await asyncio.wait_for(check_now.wait(), min(interval, CANARY_RETRY_S) if failing else interval)
                asked = True
            except TimeoutError:
                asked = False
            gap = last + spacing - time.monotonic()
            if gap > 0:  # asked for again too soon: the asks until then are merged into one canary
                await asyncio.sleep(gap)
            check_now.clear()
            if self.stopping or not self.state.serving or not self.engine_serving:
                continue
            last = time.monotonic()
            self.canaries_started += 1
            try:
                await self.run_canaries(every=asked or failing or self.canaries_started == 1)
                await self._judge_decode_side()
            except Exception:  # noqa: BLE001 - the canary must not die with one bad round
                log.exception("canary round failed")
            self._update_state()

    async def _judge_decode_side(self) -> None:
        """Count decode-side canary failures; past the bound with no engine progress, give up (exit)."""
        broken = self.router.decode_side_failure()
        if broken is None:
            self.decode_side_failures = 0
            self._progress_at_first_failure = None
            return
        load = await self.engine_load()
        progress = load.progress if load is not None else None
        self.decode_side_failures += 1
        if self.decode_side_failures == 1:
            self._progress_at_first_failure = progress
            return
        if progress is not None and progress != self._progress_at_first_failure and broken.hop == "decode_engine":
            return  # busy, not wedged: it computes, only slower than the canary's deadline
        if self.decode_side_failures >= self.config.kv_path.restart_after_failures:
            self.reload_engine(f"it failed {self.decode_side_failures} canaries in a row ({broken.describe()})")

    def apply_config(self, new: Config, changed: dict[str, str]) -> set[str]:
        """Live: the front door's settings (deadlines, admission limits, routing thresholds, failover, migration)
        and the API keys (the file re-read, or another file)."""
        worker = new.worker(self.kind, self.id.instance)
        assert isinstance(worker, DecodeWorkerConfig)
        prefix = f"decode_worker.instances.{self.id.instance}." if self.id.instance else "decode_worker."
        live = {f"{prefix}{name}" for name in SETTINGS_KEYS} | {f"decode_worker.{name}" for name in SETTINGS_KEYS}
        door = self.front_door
        door.settings = FrontDoorSettings.from_config(worker, self.engine_url)
        s = door.settings
        door.admission.resize(s.max_concurrent_requests, s.max_queued_requests, s.queue_timeout_s)
        door.placement.backlog.overflow_backlog_tokens = s.overflow_backlog_tokens
        door.placement.backlog.overflow_max_local_tokens = s.overflow_max_local_tokens
        door.placement.share.enabled = s.balance_short_prompts
        self.router.in_turn = s.routing == ROUND_ROBIN
        applied = {key for key in changed if key in live}
        # The file set for this instance, or once for every instance (the section's key).
        keys_keys = {f"{prefix}api_keys_file", "decode_worker.api_keys_file"} & set(changed)
        running = {name for name in LIVE_KEYS if name != "api_keys_file"}
        try:
            keys = ApiKeys(worker.api_keys_file) if keys_keys else self.keys
            if keys is self.keys and keys.path is not None:
                keys.reload()
        except ConfigError as exc:
            log.error("reload: API keys: %s; the keys loaded before stay", exc)
        else:
            self.keys = door.keys = keys
            applied |= keys_keys
            running.add("api_keys_file")
        # Only what is live, and applied: a key reported as needing a restart (or a keys file that did not load) must
        # not half-apply (its new value used by the next engine restart in place, say) while the daemon runs the old.
        self.worker = self.worker.model_copy(update={name: getattr(worker, name) for name in running})
        return applied

    async def check(self) -> bool:
        if self._fatal:
            raise DaemonFailed(self._fatal)
        self.keys.reload_if_changed()
        ok = True
        if self.engine_serving and self._reload_task is None:
            try:
                ok = await self.engine_ok()
            except DaemonFailed as exc:  # the engine died or is wedged: restart it here, the front door stays open
                self.reload_engine(str(exc))
        await self.refresh_peers()
        self._update_state()
        return ok

    # -- the engine, kept up in place ----------------------------------------------------------
    def problems(self) -> list[str]:
        down = self.decode_down() if self.engine_serving or self._reload_reason else ""
        engine = [f"decode engine {down}: requests fail over to prefill engines"] if down else []
        if not down and self.engine_problem:
            engine = [self.engine_problem]
        return engine + self.router.problems()

    def reload_engine(self, why: str) -> None:
        """Restart the decode engine in the background (once at a time); the front door fails over meanwhile."""
        if self._reload_task is not None or self.stopping:
            return
        log.warning("decode engine must restart: %s", why)
        self._reload_reason = why
        self.engine_lost_at = time.time()
        self.engine_serving = False
        self.decode_side_failures = 0
        self._progress_at_first_failure = None
        self._update_state()
        self._reload_task = asyncio.create_task(self._reload(why), name="engine-reload")

    async def _reload(self, why: str) -> None:
        try:
            self.front_metrics.engine_reloads.inc()
            await self.stop_engine(self.config.readiness.drain_timeout_s)
            self.engine_lost_at = time.time()  # gone now: lmcache-server must look after this
            if await self._engine_until_up(f"reloading the decode engine ({why})"):
                log.info("decode engine back after a restart in place: checking the KV path")
                self.router.check_now.set()
        except DaemonFailed as exc:
            self._fatal = str(exc)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the daemon cannot go on without an engine
            log.exception("engine reload failed")
            self._fatal = f"decode engine reload failed: {type(exc).__name__}: {exc}"
        finally:
            self._reload_reason = ""
            self._reload_task = None
            self._update_state()

    def _spend_restart(self, why: str) -> None:
        """Count one engine (re)start against the budget; DaemonFailed when it is spent."""
        now = time.monotonic()
        window = self.worker.engine_restart_window_s
        while self._reloads and now - self._reloads[0] > window:
            self._reloads.popleft()
        if len(self._reloads) >= self.worker.engine_restart_limit:
            raise DaemonFailed(f"decode engine restarted {len(self._reloads)} times within {window:.0f}s "
                               f"(engine_restart_limit), now: {why}; exiting to be restarted")
        self._reloads.append(now)

    async def _engine_until_up(self, what: str) -> bool:
        """Start the engine until it is healthy, the front door serving meanwhile. Each start first waits for the
        KV store (:meth:`wait_kv_store`: never counted); a failed start costs one restart of the budget (then a
        backoff: 1, 2, 4, ... 30 s), unless LMCache was not ready or restarted meanwhile (the engine's connector
        cannot start without it: not the engine's fault). False if asked to stop first; DaemonFailed when the
        budget is spent."""
        failures = 0

        while not self.stopping:
            if not await self.wait_kv_store(self.engine_lost_at, self.child_problem):
                return False
            before = self.lmcache_generation()
            try:
                if not await self.start_child(what):
                    return False
            except CodeChanged:
                raise  # vLLM/LMCache upgraded under this daemon: exit, to start again on them (never retried)
            except (DaemonFailed, TimeoutError) as exc:
                await self.peers.view(LMCACHE)
                after = self.lmcache_generation()
                if after is None or after != before:
                    log.warning("decode engine did not start (%s) while LMCache was %s: not counted against "
                                "engine_restart_limit; again once it is ready", exc,
                                "not ready" if after is None else "restarted")
                else:
                    failures += 1
                    if failures > self.worker.engine_restart_limit:
                        # In a row, whatever the window: a start that takes longer than engine_restart_window_s
                        # (engine_startup_timeout_s can) would otherwise never fill it, and retry forever.
                        raise DaemonFailed(f"decode engine failed to start {failures} times in a row "
                                           f"(engine_restart_limit), the last: {exc}; exiting to be restarted") from None
                    self._spend_restart(str(exc))
                backoff = min(ENGINE_BACKOFF_MAX_S, 2.0 ** max(0, failures - 1))
                log.warning("decode engine did not start (%s): again in %.0fs", exc, backoff)
                self._reload_reason = self._reload_reason or str(exc)
                await self.stop_engine(self.config.readiness.drain_timeout_s)
                self.engine_lost_at = time.time()
                if await self.sleep_unless_stopped(backoff):
                    return False
                continue
            self.stall = engine_stall_detector(self.config)
            self.engine_problem = ""
            self.engine_serving = True
            self.details["engine_serving"] = True
            self._reload_reason = ""
            return True
        return False

    def lmcache_generation(self) -> tuple[int, object] | None:
        """Which LMCache lmcache-server runs, from its last verdict (pid, LMCache's start); None when not ready."""
        view = self.peers.views.get(LMCACHE)
        if view is None or not view.ready or view.record is None:
            return None
        return view.record.pid, view.record.details.get("lmcache_started_at")

    async def shut_down(self) -> None:
        if self._reload_task is not None:
            self._reload_task.cancel()
            await asyncio.gather(self._reload_task, return_exceptions=True)
        if self._canary_task is not None:
            self._canary_task.cancel()
            await asyncio.gather(self._canary_task, return_exceptions=True)
        await super().shut_down()
        await self.upstream.aclose()


def main(argv: list[str] | None = None) -> int:
    return run_daemon(DecodeWorker, argv)


if __name__ == "__main__":
    sys.exit(main())
