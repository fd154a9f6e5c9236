"""Where a request's prefill goes, and the one place that counts what became of it.

The front door asks :meth:`PrefillRouter.choose` before each request: a ready
prefill-worker whose KV path works, or the reason to skip prefill (the decode
engine then computes the prompt itself). Of several, the one with the fewest prompt
tokens this front door has on it now (prefill calls in flight and whole requests it
serves, :meth:`PrefillRouter.holding`) is chosen, ties in turn: a 7,000-token prompt
on one engine sends the next calls to the others, where round robin would queue
every other call behind it. It tells
:meth:`PrefillRouter.report` how the call went; every fallback is counted and
logged there, and only there. The router's judgement comes from the peers'
state files (:mod:`daemons.runtime.peers`), the KV-path canaries decode-worker sends
(:mod:`daemons.kv.canary`), and the last failed prefill call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from daemons.children.stall import engine_pressed
from daemons.kv.canary import CanaryResult
from daemons.kv.crosscheck import CHECK_HEADER, FirstToken, Verdict
from daemons.metrics import FrontDoorMetrics
from daemons.names import RequestPath
from daemons.runtime.peers import Changes, Peers
from daemons.runtime.statefile import PeerView
from daemons.runtime.states import State

log = logging.getLogger(__name__)

LMCACHE = "lmcache-server"
# After a failed prefill call, decode-worker stays degraded (and keeps trying per request) this long.
PREFILL_FAILURE_MEMORY_S = 30.0
# kv_mismatch: the KV through that prefill-worker means something else; skipping it, the decode engine computes the
# prompt itself (a right answer), whichever engine is the odd one.
PREFILL_SIDE_HOPS = ("prefill", "lmcache_store", "p2p_fetch", "kv_mismatch")
DECODE_SIDE_HOPS = ("decode_engine", "decode_load")
# Fallbacks decided before any call, from what status already says (no news: logged at INFO), and
# a request the prefill-worker rejected (the client's error, not the path's).
# The box's endpoint moves a request to a sibling's engine only when that engine holds this many fewer requests.
LOAD_MARGIN = 2
KNOWN_FALLBACKS = ("lmcache_unavailable", "kv_path_broken", "prefill_unavailable", "prefill_rejected")


def _published_pressed(view: PeerView) -> bool:
    """Did a worker's last state record say its engine is out of room (:func:`engine_pressed`)?"""
    details = view.record.details if view.record is not None else {}
    return engine_pressed(details.get("engine_queued"), details.get("kv_cache_usage"))


@dataclass
class PrefillOutcome:
    # "disaggregated" (prefill ran), "fallback", "short_prompt" (no prefill call: not worth it),
    # "prefill_busy" (no prefill call: prefill is backed up, the decode engine has room) or
    # "decode_busy" (a short prompt served start to end by a prefill engine: daemons.routing.engine_share)
    path: str
    reason: str = ""  # fallback reason
    seconds: float = 0.0  # the prefill call's duration (0: no call was made)
    store_s: float | None = None  # of that, prefill-worker's wait for LMCache to hold the chunks
    expected: int | None = None  # full-chunk tokens of the prompt (prefill-worker's header)
    stored: int | None = None  # of those, in LMCache when prefill answered
    rejection: tuple[int, bytes] | None = None  # the prefill engine refused the request: (status, body)
    local_tokens: int = 0  # prefill_busy: the prompt tokens the decode engine computes instead
    engine_url: str = ""  # decode_busy: the prefill-worker route that serves the whole request
    first_token: FirstToken | None = None  # a greedy request: the prefill engine's first token (the cross-check)
    kv_check: Verdict | None = None  # the cross-check's verdict, once the decode engine's first token is in
    held: tuple[str, int] | None = None  # failover/decode_busy/sibling: (daemon, prompt tokens) counted on it
    # What a call to another decode-worker's front door would carry (the client's key, the hop mark); sent only on
    # the sibling path. None: the request came from a sibling and goes to no other.
    hop: dict[str, str] | None = None

    def verdict(self, cached: int | None) -> tuple[str, str]:
        """(path, reason) once the decode engine said how many prompt tokens it loaded (None: not yet)."""
        if self.kv_check is not None and not self.kv_check.ok:
            return RequestPath.KV_MISMATCH, ""
        if self.path != RequestPath.DISAGGREGATED:  # no KV was meant to move: the path says all
            return self.path, self.reason
        if self.expected is not None and self.expected == 0:
            return "recomputed", "no_full_chunk"
        if self.stored is not None and self.expected is not None and self.stored < self.expected:
            return "recomputed", "kv_not_stored"
        if cached is not None and self.expected is not None and cached < self.expected:
            return "recomputed", "kv_not_loaded"
        return "disaggregated", ""

    def headers(self, cached: int | None = None) -> dict[str, str]:
        path, reason = self.verdict(cached)
        h = {"x-disagg-path": path}
        if reason:
            h["x-disagg-fallback-reason" if path == "fallback" else "x-disagg-recompute-reason"] = reason
        if self.kv_check is not None:
            h[CHECK_HEADER] = f"{self.kv_check.result}; delta={self.kv_check.delta:.3g}"
        return h


@dataclass(frozen=True)
class PrefillChoice:
    url: str | None = None  # where to send the prefill call
    skip: str = ""  # why no call is made (a fallback reason) when url is None
    daemon: str = ""  # the prefill-worker it goes to


class PrefillRouter:
    def __init__(self, prefill_names: list[str], peers: Peers, metrics: FrontDoorMetrics, *,
                 on_change: Callable[[], None] = lambda: None, siblings: Mapping[str, str] | None = None) -> None:
        self.prefill_names = list(prefill_names)
        # The box's other decode-workers and their front doors' URLs (failover and migration go there first).
        self.siblings = dict(siblings or {})
        self.peers = peers
        self.metrics = metrics
        self.on_change = on_change  # the router's verdict may have changed (decode-worker re-judges its state)
        self.canary_results: dict[str, CanaryResult] = {}  # by prefill-worker
        self.last_failure: tuple[float, str] | None = None
        self.check_now = asyncio.Event()  # the KV path needs a canary now
        self._lost: dict[str, asyncio.Event] = {}  # by prefill-worker: set when it stops being usable
        self._next = 0
        self._endpoint_turn = 0
        # decode_worker.routing round_robin: prefill engines, and the box's endpoint's engines, in turn (set on
        # every settings change); failover stays by load.
        self.in_turn = False
        # Prompt tokens this front door has on each prefill engine now: prefill calls in flight, whole requests.
        self.load: dict[str, int] = {}
        self.requests: dict[str, int] = {}  # requests in flight at each engine or sibling, by our count

    # -- what the front door asks ------------------------------------------------------------
    def ready_prefills(self) -> list[PeerView]:
        return [self.peers.views[n] for n in self.prefill_names if self.peers.ready(n)]

    def serving_prefills(self) -> list[PeerView]:
        """Prefill-workers whose engine can serve a whole request (failover), ready or not: one degraded because
        LMCache is down or stuck still serves (:attr:`PeerView.serves_whole`)."""
        return [v for n in self.prefill_names if (v := self.peers.views.get(n)) is not None and v.serves_whole]

    def blamed(self, prefill: str) -> bool:
        """Is ``prefill`` out of rotation? Its last canary broke on its side of the path, or at the decode side
        while a canary through another prefill-worker passed (so the decode engine is fine: this path is not)."""
        r = self.canary_results.get(prefill)
        if r is None or r.ok:
            return False
        if r.hop in PREFILL_SIDE_HOPS:
            return True
        return any(other.ok for name, other in self.canary_results.items() if name != prefill)

    def working_prefills(self) -> list[PeerView]:
        """Ready prefill workers whose KV path the canaries do not blame (:meth:`blamed`)."""
        return [v for v in self.ready_prefills() if not self.blamed(v.daemon)]

    def decode_side_failure(self) -> CanaryResult | None:
        """A canary failure that proves the decode side broken: it broke there through every prefill-worker
        canaried (one passing through any of them clears the decode engine). None otherwise."""
        results = list(self.canary_results.values())
        if any(r.ok for r in results):
            return None
        return next((r for r in results if not r.ok and r.hop in DECODE_SIDE_HOPS), None)

    def _least_loaded(self, views: Sequence[PeerView], by_load: bool = True) -> PeerView:
        """The view whose engine holds the fewest of our prompt tokens; ties in turn (round robin). Not
        ``by_load``: the next in turn, whatever it holds."""
        start = self._next % len(views)
        self._next += 1
        turn = [*views[start:], *views[:start]]
        if not by_load:
            return turn[0]
        return min(turn, key=lambda v: self.load.get(v.daemon, 0))  # min keeps the first of equals

    def take(self, prefill: str, tokens: int) -> None:
        """Count ``tokens`` of prompt (and one request) on ``prefill``'s engine (until :meth:`give_back`)."""
        self.load[prefill] = self.load.get(prefill, 0) + max(tokens, 1)
        self.requests[prefill] = self.requests.get(prefill, 0) + 1

    def give_back(self, prefill: str, tokens: int) -> None:
        if self.requests.get(prefill, 0) > 1:
            self.requests[prefill] -= 1
        else:
            self.requests.pop(prefill, None)
        left = self.load.get(prefill, 0) - max(tokens, 1)
        if left < 0:  # a bug in the counting: logged, and never let it skew the choice or fail the request
            log.error("prompt tokens on %s given back but never taken (%d): counted as 0", prefill, -left)
            left = 0
        if left:
            self.load[prefill] = left
        else:
            self.load.pop(prefill, None)

    @contextmanager
    def holding(self, prefill: str, tokens: int) -> Iterator[None]:
        """Count a prefill call's prompt on ``prefill`` while it is in flight."""
        self.take(prefill, tokens)
        try:
            yield
        finally:
            self.give_back(prefill, tokens)

    def choose(self) -> PrefillChoice:
        """The working prefill worker with the least of our prompt tokens on it (ties in turn), or why to skip
        prefill."""
        if not self.peers.ready(LMCACHE):
            return PrefillChoice(skip="lmcache_unavailable")
        if not self.ready_prefills():
            return PrefillChoice(skip="prefill_unavailable")
        working = self.working_prefills()
        if not working or self.decode_side_failure() is not None:
            return PrefillChoice(skip="kv_path_broken")
        view = self._least_loaded(working, by_load=not self.in_turn)
        if view.record is None:
            return PrefillChoice(skip="prefill_unavailable")
        return PrefillChoice(url=f"http://{view.record.endpoint}", daemon=view.daemon)

    def choose_any(self) -> PrefillChoice:
        """A prefill-worker whose engine serves, to take a request start to end (failover: the decode engine
        cannot), the least loaded (ties in turn). Neither its KV path nor LMCache need work: no KV moves on that
        path."""
        ready = [v for v in self.serving_prefills() if v.record is not None]
        if not ready:
            return PrefillChoice(skip="prefill_unavailable")
        view = self._least_loaded(ready)
        assert view.record is not None
        return PrefillChoice(url=f"http://{view.record.endpoint}", daemon=view.daemon)

    def serving_siblings(self, exclude: Sequence[str] = ()) -> list[PeerView]:
        """The box's other decode-workers whose engines serve now (by their state records), but ``exclude``."""
        return [v for n in self.siblings if n not in exclude
                and (v := self.peers.views.get(n)) is not None and v.serves_whole]

    def choose_sibling(self, exclude: Sequence[str] = ()) -> PrefillChoice:
        """Another decode-worker of the box whose engine serves (its front door takes a request whole, KV path and
        all), the least loaded by our count (ties in turn); none past ``exclude``."""
        serving = self.serving_siblings(exclude)
        if not serving:
            return PrefillChoice(skip="no_sibling")
        view = self._least_loaded(serving)
        return PrefillChoice(url=self.siblings[view.daemon], daemon=view.daemon)

    def relayed(self) -> int:
        """Requests this front door has at siblings now (relayed to their front doors)."""
        return sum(self.requests.get(name, 0) for name in self.siblings)

    def _sibling_loads(self) -> list[tuple[int, int | None, PeerView]]:
        """(load, capacity, view) of each serving sibling that publishes its load, lightest first (ties: config order).

        A sibling's load is what its state record says (``in_progress``: requests on its engine, as of its last
        heartbeat) plus what this front door relayed to it since, which it counts itself; its capacity is its
        ``max_concurrent_requests`` (``capacity``, None when not published)."""
        loads = []
        for view in self.serving_siblings():
            details = view.record.details if view.record is not None else {}
            published, capacity = details.get("in_progress"), details.get("capacity")
            if not isinstance(published, int) or isinstance(published, bool):
                continue
            cap = capacity if isinstance(capacity, int) and not isinstance(capacity, bool) else None
            loads.append((published + self.requests.get(view.daemon, 0), cap, view))
        return sorted(loads, key=lambda item: item[0])

    def lighter_sibling(self, mine: int, margin: int = LOAD_MARGIN, pressed: bool = False) -> PrefillChoice:
        """A sibling whose decode engine holds at least ``margin`` fewer requests than ``mine`` (the others in
        progress on this front door's engine), the lightest; else none (skip ``balanced``). The margin keeps a
        request where it is when moving it saves little (the hop costs a relay), and two front doors from trading
        requests on stale counts. A sibling that publishes no load is not chosen by load.

        The engines' own metrics come first: a sibling whose engine is out of room (requests queued for capacity,
        or its KV cache nearly full: :func:`engine_pressed`, as it last published) takes nothing by load; while
        this engine is out of room (``pressed``), a sibling with room takes the request whatever the counts."""
        loads = [item for item in self._sibling_loads() if not _published_pressed(item[2])]
        if not loads or (not pressed and mine - loads[0][0] < margin):
            return PrefillChoice(skip="balanced")
        view = loads[0][2]
        return PrefillChoice(url=self.siblings[view.daemon], daemon=view.daemon)

    def next_in_turn(self) -> PrefillChoice:
        """routing round_robin: this engine and the serving siblings in turn, whatever they hold; skip ``in_turn``
        when it is this engine's turn."""
        serving = self.serving_siblings()
        turn = self._endpoint_turn % (len(serving) + 1)
        self._endpoint_turn += 1
        if turn == 0:
            return PrefillChoice(skip="in_turn")
        view = serving[turn - 1]
        return PrefillChoice(url=self.siblings[view.daemon], daemon=view.daemon)

    def roomy_sibling(self) -> PrefillChoice:
        """The lightest sibling with a free slot (its load below its published capacity): where a request goes that
        found this front door full on the box's endpoint; none (skip ``full``) when every sibling is full too."""
        for load, capacity, view in self._sibling_loads():
            if capacity is not None and load < capacity:
                return PrefillChoice(url=self.siblings[view.daemon], daemon=view.daemon)
        return PrefillChoice(skip="full")

    def report(self, outcome: PrefillOutcome, request_id: str) -> PrefillOutcome:
        """How a request's prefill went: counted, logged, remembered. Returns ``outcome``."""
        m = self.metrics
        if outcome.path != "fallback":
            m.prefill_call.labels(outcome="ok").observe(outcome.seconds)
            if self.last_failure is not None:
                log.info("prefill calls succeed again: back on the disaggregated path")
                self.last_failure = None
                self.on_change()
            return outcome
        reason = outcome.reason
        m.fallbacks.labels(reason=reason).inc()
        if outcome.seconds:
            m.prefill_call.labels(outcome="rejected" if reason == "prefill_rejected" else "failed").observe(
                outcome.seconds)
        if reason in KNOWN_FALLBACKS:
            log.info("[%s] fallback: decode engine computes the prompt itself (%s)", request_id, reason)
        else:
            log.warning("[%s] fallback: decode engine computes the prompt itself (%s)", request_id, reason)
            self.last_failure = (time.monotonic(), reason)
            self.on_change()
        return outcome

    def lost_signal(self, prefill: str) -> asyncio.Event:
        """Set once ``prefill`` is found unusable (dead, hung, unreachable): calls in flight to it give up
        then instead of waiting out their deadline (a cut link drops packets silently)."""
        event = self._lost.get(prefill)
        if event is None or event.is_set():
            event = self._lost[prefill] = asyncio.Event()
        return event

    def prefills_judged(self) -> None:
        """After the peers were judged: wake the calls waiting on prefill-workers found unusable."""
        for name, event in self._lost.items():
            if not event.is_set() and not self.peers.ready(name):
                view = self.peers.views.get(name)
                # A draining prefill-worker takes no new call but finishes those it has: they are not lost.
                if view is not None and not view.usable and view.state != State.DRAINING.value:
                    log.warning("%s is %s (%s): its prefill calls in flight fall back now", name, view.state,
                                view.reason)
                    event.set()

    def kv_missed(self, reason: str) -> None:
        """A request's KV did not arrive (or the decode engine timed out): check the path now."""
        self.check_now.set()

    # -- what decode-worker tells it ------------------------------------------------------------
    def peers_changed(self, changes: Changes) -> None:
        """New peer processes: what the canary said of the old ones no longer holds."""
        if LMCACHE in changes.renewed:
            self.metrics.lmcache_restarts.inc()
            self.canary_results.clear()  # they speak of the old server
            self.check_now.set()
        for name in changes.usable_again:
            if name in self.prefill_names:
                # A prefill-worker that is new (or back): its path is unchecked until its canary passes.
                self.canary_results.pop(name, None)
                self.check_now.set()

    def record_canary(self, prefill: str, result: CanaryResult) -> None:
        m = self.metrics
        m.canaries.labels(result="ok" if result.ok else result.hop).inc()
        m.canary_seconds.observe(result.seconds)
        previous = self.canary_results.get(prefill)
        self.canary_results[prefill] = result
        m.kv_path_ok.set(1 if all(r.ok for r in self.canary_results.values()) else 0)
        if not result.ok:
            log.warning("canary via %s: %s", prefill, result.describe())
        elif previous is None or not previous.ok:
            log.info("canary via %s: %s", prefill, result.describe())

    def forget_unready(self) -> None:
        """Drop canary results of prefill-workers that are not ready: their state files speak for them."""
        for name in list(self.canary_results):
            if not self.peers.ready(name):
                del self.canary_results[name]

    def problems(self) -> list[str]:
        """Why decode-worker is not ``ready`` as far as the prefill path goes (empty: it is)."""
        problems = []
        # Ready needs lmcache-server and at least one prefill worker.
        needed = [LMCACHE] + ([] if self.ready_prefills() else self.prefill_names)
        problems += [self.peers.describe(n) for n in needed if not self.peers.ready(n)]
        if self.last_failure is not None:
            when, why = self.last_failure
            if time.monotonic() - when < PREFILL_FAILURE_MEMORY_S:
                problems.append(f"last prefill call failed ({why})")
            else:
                self.last_failure = None
        for name in self.prefill_names:
            result = self.canary_results.get(name)
            if not self.peers.ready(name):
                continue
            if result is None:
                problems.append(f"{name}: KV path not checked yet (canary pending)")
            elif not result.ok:
                problems.append(f"{name}: {result.describe()}")
        return problems
