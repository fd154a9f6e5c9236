"""decode-worker: a vLLM engine as LMCache KV consumer plus the public front door.

Start: wait for lmcache-server (the engine's connector registers with it),
load the engine, open the front door, then wait up to ``prefill_wait_s`` for
prefill-worker, then send the KV-path canary (:mod:`daemons.canary`) through
the whole path. Ready only while the dependencies are ready *and* the last
canary got its KV from LMCache; degraded (still serving, the decode engine
computing prompts itself) otherwise, with the broken hop in the reason. The
canary runs every ``kv_path.canary_interval_s`` (more often while it fails),
at once when lmcache-server comes back as a new process, and when a request
saw its KV go missing. While it fails at a prefill-side hop, requests skip
that prefill-worker instead of waiting on it.

Recovery: the decode engine failing the canary at the decode side
(``decode_engine``/``decode_load``) ``restart_after_failures`` times in a row,
without computing anything meanwhile, makes decode-worker exit non-zero:
systemd/supervisord restart it with a fresh engine (see :mod:`daemons.stall`
for the other wedge rule). Exiting, rather than restarting the engine inside
the daemon, keeps one place that restarts things (with its start limits and
its process-group kill) and costs the front door the same engine load time.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import replace

from .admission import Admission
from .auth import ApiKeys
from .canary import CanaryResult, PathCanary, vocabulary
from .cli import run_daemon
from .config import Config
from .frontdoor import FrontDoor
from .lifecycle import DaemonFailed
from .metrics import FrontDoorMetrics
from .engine_share import EngineShare
from .prefill_backlog import Backlog
from .prefill_router import LMCACHE, PrefillRouter
from .remote_state import state_url
from .statefile import PeerView
from .states import State
from .upstream import Upstream
from .worker import EngineDaemon

log = logging.getLogger(__name__)

# While the canary fails, it runs at least this often.
CANARY_RETRY_S = 5.0


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

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)
        self.prefill_names = list(config.workers("prefill-worker"))
        self.peers.names = [LMCACHE, *self.prefill_names]
        # Prefill-workers on other hosts: judged from the record they serve (readiness over a socket).
        self.remote_prefills = {n: config.cluster.host_of(n) for n in self.prefill_names
                                if config.cluster is not None and not config.is_local(n)}
        self.peers.remote = {n: state_url(config.address_of(n), config.workers("prefill-worker")[n].port)
                             for n in self.remote_prefills}
        self.front_metrics = FrontDoorMetrics(self.registry)
        self.router = PrefillRouter(self.prefill_names, self.peers, self.front_metrics, on_change=self._update_state)
        kv = config.kv_path
        self.canary = PathCanary(
            client=self.http, model=config.model.name, vocab=vocabulary(config.model.path),
            chunk_size=config.lmcache.chunk_size, decode_url=self.engine_url, timeout_s=kv.canary_timeout_s,
        )
        self.decode_side_failures = 0  # canaries in a row that broke at the decode side
        self._progress_at_first_failure: float | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self._fatal: str | None = None
        self.keys = ApiKeys(self.worker.api_keys_file)  # ApiKeyError (a ConfigError): exit 78
        w = self.worker
        self.upstream = Upstream(w.max_concurrent_requests)  # the proxied calls' own pool (probes use httpx)
        self.front_door = FrontDoor(
            engine_url=self.engine_url,
            client=self.upstream,
            metrics=self.front_metrics,
            router=self.router,
            prefill_timeout_s=self.worker.prefill_timeout_s,
            health=self._health,
            first_token_timeout_s=self.worker.first_token_timeout_s,
            request_timeout_s=self.worker.request_timeout_s,
            admission=Admission(w.max_concurrent_requests, w.max_queued_requests, w.queue_timeout_s),
            keys=self.keys,
            max_body_bytes=w.max_body_bytes,
            disaggregate_min_tokens=w.disaggregate_min_tokens,
            short_prompt_max_in_flight=w.short_prompt_max_in_flight,
            backlog=Backlog(w.overflow_backlog_tokens, w.overflow_max_local_tokens),
            share=EngineShare(w.balance_short_prompts),
        )

    def _health(self) -> tuple[str, bool, str]:
        """What /health says: serving unless the decode engine itself fails the canary."""
        broken = self.router.decode_side_failure()
        serving = self.state.serving and not (broken is not None and broken.hop == "decode_engine")
        return self.state.value, serving, self.reason

    # -- state -----------------------------------------------------------------------
    async def refresh_peers(self) -> None:
        changes = await self.peers.refresh()
        if LMCACHE in changes.renewed:
            log.warning("lmcache-server came back as a new process (pid %s): checking the KV path now",
                        self.peers.generations[LMCACHE][0])  # type: ignore[index]
        self.router.peers_changed(changes)
        self.router.prefills_judged()

    def problems(self) -> list[str]:
        return ([self.engine_problem] if self.engine_problem else []) + self.router.problems()

    def _update_state(self) -> None:
        # In the state file (disaggctl status): the prefill-workers whose KV path the last canary verified.
        self.details["prefills_checked"] = sorted(
            name for name, result in self.router.canary_results.items() if result.ok and self.peers.ready(name))
        if not self.state.serving:
            return
        problems = self.problems()
        if problems:
            self.set_state(State.DEGRADED, "decode computes prompts itself: " + "; ".join(problems))
        else:
            self.set_state(State.READY)

    async def start_up(self) -> None:
        if not await self.start_serving(self.front_door.app(), "front door"):
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
                       "decode computes prompts itself: " + "; ".join(problems) if problems else "")
        self._canary_task = asyncio.create_task(self._canary_loop(), name="canary")

    async def run_canaries(self) -> None:
        """One canary through each ready prefill-worker; the results feed state and routing."""
        for view in self.router.ready_prefills():
            if view.record is None:
                continue
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
        check_now = self.router.check_now
        while not self.stopping:
            failing = any(not r.ok for r in self.router.canary_results.values())
            try:
                await asyncio.wait_for(check_now.wait(), min(interval, CANARY_RETRY_S) if failing else interval)
            except asyncio.TimeoutError:
                pass
            check_now.clear()
            if self.stopping or not self.state.serving:
                continue
            try:
                await self.run_canaries()
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
            self._fatal = (f"decode engine failed {self.decode_side_failures} canaries in a row "
                           f"({broken.describe()}); exiting to be restarted with a fresh engine")

    async def check(self) -> bool:
        if self._fatal:
            raise DaemonFailed(self._fatal)
        self.keys.reload_if_changed()
        ok = await self.engine_ok()
        await self.refresh_peers()
        self._update_state()
        return ok

    async def shut_down(self) -> None:
        if self._canary_task is not None:
            self._canary_task.cancel()
            await asyncio.gather(self._canary_task, return_exceptions=True)
        await super().shut_down()
        await self.upstream.aclose()


def main(argv: list[str] | None = None) -> int:
    return run_daemon(DecodeWorker, argv)


if __name__ == "__main__":
    sys.exit(main())
