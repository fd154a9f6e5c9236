"""decode-worker: a vLLM engine as LMCache KV consumer plus the public front door.

Start: wait for lmcache-server (the engine's connector registers with it),
load the engine, open the front door, then wait up to ``prefill_wait_s`` for
prefill-worker. Ready when both dependencies are ready; degraded (still
serving, the decode engine computing prompts itself) while either is not, or
while the last prefill call failed. The normal path resumes by itself when
they come back: every heartbeat re-reads their state files.
"""

from __future__ import annotations

import logging
import sys
import time

from .config import Config
from .frontdoor import FrontDoor
from .lifecycle import run_daemon
from .metrics import FrontDoorMetrics
from .statefile import PeerView, State
from .worker import EngineDaemon

log = logging.getLogger(__name__)

# After a failed prefill call, stay degraded (and keep trying per request) for this long.
PREFILL_FAILURE_MEMORY_S = 30.0


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
        self.front_door = FrontDoor(
            engine_url=self.engine.base_url,
            client=self.http,
            metrics=self.front_metrics,
            prefill_url=self._prefill_url,
            prefill_blocker=self._prefill_blocker,
            on_prefill_result=self._on_prefill_result,
            prefill_timeout_s=self.worker.prefill_timeout_s,
            state=lambda: (self.state.value, self.state.serving, self.reason),
        )

    # -- what the front door asks ------------------------------------------------------------
    def _peer_ready(self, daemon: str) -> bool:
        view = self.peers.get(daemon)
        return view is not None and view.usable and view.state == State.READY.value

    def _ready_prefills(self) -> list[PeerView]:
        return [self.peers[n] for n in self.prefill_names if self._peer_ready(n)]

    def _prefill_url(self) -> str | None:
        """A ready prefill worker, round robin over those that are ready."""
        ready = self._ready_prefills()
        if not ready:
            return None
        view = ready[self._next_prefill % len(ready)]
        self._next_prefill += 1
        return f"http://{view.record.endpoint}" if view.record else None

    def _prefill_blocker(self) -> str | None:
        if not self._peer_ready("lmcache-server"):
            return "lmcache_unavailable"
        if not self._ready_prefills():
            return "prefill_unavailable"
        return None

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

    def _update_state(self) -> None:
        if not self.state.serving:
            return
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
        # Serving from here on: ready if the peers are, degraded otherwise.
        self.set_state(State.READY if waited else State.DEGRADED, "" if waited else "prefill-worker not ready")
        self._update_state()

    async def check(self) -> bool:
        ok = await self.engine_ok()
        self._refresh_peers()
        self._update_state()
        return ok


def main(argv: list[str] | None = None) -> int:
    return run_daemon(DecodeWorker, argv)


if __name__ == "__main__":
    sys.exit(main())
