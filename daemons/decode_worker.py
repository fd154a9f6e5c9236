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
import time

from .canary import CanaryResult, PathCanary, vocabulary
from .config import Config
from .frontdoor import FrontDoor
from .lifecycle import DaemonFailed, run_daemon
from .metrics import FrontDoorMetrics
from .statefile import PeerView, State
from .worker import EngineDaemon

log = logging.getLogger(__name__)

# After a failed prefill call, stay degraded (and keep trying per request) for this long.
PREFILL_FAILURE_MEMORY_S = 30.0
# While the canary fails, it runs at least this often.
CANARY_RETRY_S = 5.0
PREFILL_SIDE_HOPS = ("prefill", "lmcache_store")
DECODE_SIDE_HOPS = ("decode_engine", "decode_load")


class DecodeWorker(EngineDaemon):
    """Run the decode engine (KV consumer) and the OpenAI-compatible front door."""

    kind = "decode-worker"
    role = "kv_consumer"

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)
        self.prefill_names = list(config.workers("prefill-worker"))
        self._next_prefill = 0
        self.front_metrics = FrontDoorMetrics(self.registry)
        self.peers: dict[str, PeerView] = {}
        self.last_prefill_failure: tuple[float, str] | None = None
        kv = config.kv_path
        self.canary = PathCanary(
            client=self.http, model=config.model.name, vocab=vocabulary(config.model.path),
            chunk_size=config.lmcache.chunk_size, decode_url=self.engine.base_url, timeout_s=kv.canary_timeout_s,
        )
        self.canary_results: dict[str, CanaryResult] = {}  # by prefill-worker
        self.decode_side_failures = 0  # canaries in a row that broke at the decode side
        self._progress_at_first_failure: float | None = None
        self._canary_now = asyncio.Event()
        self._canary_task: asyncio.Task[None] | None = None
        self._fatal: str | None = None
        self._lmcache_generation: tuple[int, float] | None = None
        self._prefill_generations: dict[str, tuple[int, float] | None] = {}
        self.front_door = FrontDoor(
            engine_url=self.engine.base_url,
            client=self.http,
            metrics=self.front_metrics,
            prefill_url=self._prefill_url,
            prefill_blocker=self._prefill_blocker,
            on_prefill_result=self._on_prefill_result,
            prefill_timeout_s=self.worker.prefill_timeout_s,
            state=self._health,
            first_token_timeout_s=self.worker.first_token_timeout_s,
            request_timeout_s=self.worker.request_timeout_s,
            on_kv_miss=self._on_kv_miss,
        )

    # -- what the front door asks ------------------------------------------------------------
    def _peer_ready(self, daemon: str) -> bool:
        view = self.peers.get(daemon)
        return view is not None and view.usable and view.state == State.READY.value

    def _ready_prefills(self) -> list[PeerView]:
        return [self.peers[n] for n in self.prefill_names if self._peer_ready(n)]

    def _working_prefills(self) -> list[PeerView]:
        """Ready prefill workers whose last canary did not break on their side of the path."""
        return [v for v in self._ready_prefills()
                if (r := self.canary_results.get(v.daemon)) is None or r.ok or r.hop not in PREFILL_SIDE_HOPS]

    def _prefill_url(self) -> str | None:
        """A working prefill worker, round robin over them."""
        working = self._working_prefills()
        if not working:
            return None
        view = working[self._next_prefill % len(working)]
        self._next_prefill += 1
        return f"http://{view.record.endpoint}" if view.record else None

    def _decode_side_failure(self) -> CanaryResult | None:
        return next((r for r in self.canary_results.values() if not r.ok and r.hop in DECODE_SIDE_HOPS), None)

    def _prefill_blocker(self) -> str | None:
        if not self._peer_ready("lmcache-server"):
            return "lmcache_unavailable"
        if not self._ready_prefills():
            return "prefill_unavailable"
        if not self._working_prefills() or self._decode_side_failure() is not None:
            return "kv_path_broken"
        return None

    def _health(self) -> tuple[str, bool, str]:
        """What /health says: serving unless the decode engine itself fails the canary."""
        broken = self._decode_side_failure()
        serving = self.state.serving and not (broken is not None and broken.hop == "decode_engine")
        return self.state.value, serving, self.reason

    def _on_kv_miss(self, reason: str) -> None:
        self._canary_now.set()

    def _on_prefill_result(self, failure: str | None) -> None:
        if failure is None:
            if self.last_prefill_failure is not None:
                log.info("prefill calls succeed again: back on the disaggregated path")
            self.last_prefill_failure = None
        else:
            self.last_prefill_failure = (time.monotonic(), failure)
        self._update_state()

    # -- state -----------------------------------------------------------------------
    def _refresh_peers(self) -> None:
        for daemon in ("lmcache-server", *self.prefill_names):
            self.peers[daemon] = self.peer(daemon)
        record = self.peers["lmcache-server"].record
        if record is not None and self.peers["lmcache-server"].usable:
            generation = (record.pid, record.started_at)
            if self._lmcache_generation is not None and generation != self._lmcache_generation:
                log.warning("lmcache-server came back as a new process (pid %d -> %d): checking the KV path now",
                            self._lmcache_generation[0], record.pid)
                self.front_metrics.lmcache_restarts.inc()
                self.canary_results.clear()  # they speak of the old server
                self._canary_now.set()
            self._lmcache_generation = generation
        for name in self.prefill_names:
            view = self.peers[name]
            generation = (view.record.pid, view.record.started_at) if view.record and view.usable else None
            if generation is not None and generation != self._prefill_generations.get(name):
                # A prefill-worker that is new (or back): its path is unchecked until its canary passes.
                self.canary_results.pop(name, None)
                self._canary_now.set()
            self._prefill_generations[name] = generation

    def _problems(self) -> list[str]:
        problems = []
        # Ready needs lmcache-server and at least one prefill worker.
        needed = ["lmcache-server"] + ([] if self._ready_prefills() else self.prefill_names)
        for daemon in needed:
            if not self._peer_ready(daemon):
                view = self.peers.get(daemon)
                problems.append(f"{daemon} {view.state}: {view.reason}" if view else f"{daemon} unknown")
        if self.last_prefill_failure is not None:
            when, why = self.last_prefill_failure
            if time.monotonic() - when < PREFILL_FAILURE_MEMORY_S:
                problems.append(f"last prefill call failed ({why})")
            else:
                self.last_prefill_failure = None
        for name in self.prefill_names:
            result = self.canary_results.get(name)
            if not self._peer_ready(name):
                continue
            if result is None:
                problems.append(f"{name}: KV path not checked yet (canary pending)")
            elif not result.ok:
                problems.append(f"{name}: {result.describe()}")
        return problems

    def _update_state(self) -> None:
        if not self.state.serving:
            return
        problems = self._problems()
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
        self._refresh_peers()
        if waited:
            self.set_state(State.WAITING, "sending the KV-path canary")
            await self.run_canaries()
        # Serving from here on: ready if the peers and the KV path are, degraded otherwise.
        problems = self._problems() if waited else ["prefill-worker not ready"]
        self.set_state(State.DEGRADED if problems else State.READY,
                       "decode computes prompts itself: " + "; ".join(problems) if problems else "")
        self._canary_task = asyncio.create_task(self._canary_loop(), name="canary")

    async def run_canaries(self) -> None:
        """One canary through each ready prefill-worker; the results feed state and routing."""
        for view in self._ready_prefills():
            if view.record is None:
                continue
            result = await self.canary.run(f"http://{view.record.endpoint}")
            self._record_canary(view.daemon, result)
        for name in list(self.canary_results):
            if not self._peer_ready(name):
                del self.canary_results[name]  # its state file speaks for it now

    def _record_canary(self, prefill: str, result: CanaryResult) -> None:
        m = self.front_metrics
        m.canaries.labels(result="ok" if result.ok else result.hop).inc()
        m.canary_seconds.observe(result.seconds)
        previous = self.canary_results.get(prefill)
        self.canary_results[prefill] = result
        m.kv_path_ok.set(1 if all(r.ok for r in self.canary_results.values()) else 0)
        if not result.ok:
            log.warning("canary via %s: %s", prefill, result.describe())
        elif previous is None or not previous.ok:
            log.info("canary via %s: %s", prefill, result.describe())

    async def _canary_loop(self) -> None:
        interval = self.config.kv_path.canary_interval_s
        while not self.stopping:
            failing = any(not r.ok for r in self.canary_results.values())
            try:
                await asyncio.wait_for(self._canary_now.wait(), min(interval, CANARY_RETRY_S) if failing else interval)
            except asyncio.TimeoutError:
                pass
            self._canary_now.clear()
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
        broken = self._decode_side_failure()
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
        ok = await self.engine_ok()
        self._refresh_peers()
        self._update_state()
        return ok

    async def shut_down(self) -> None:
        if self._canary_task is not None:
            self._canary_task.cancel()
            await asyncio.gather(self._canary_task, return_exceptions=True)
        await super().shut_down()


def main(argv: list[str] | None = None) -> int:
    return run_daemon(DecodeWorker, argv)


if __name__ == "__main__":
    sys.exit(main())
