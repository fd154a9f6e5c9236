"""Where a request goes before any engine is called: the front door's decisions, apart from its HTTP.

In order (:meth:`Placement.place`): a request from the box's one endpoint that found this front door full, to a
sibling with a free slot (one admission for the box); while this worker's decode engine cannot serve, whole to a
sibling decode-worker of the box, else to a prefill engine (failover, bounded by ``failover_max_in_flight``); one
that came in on the box's one endpoint to a sibling whose engine holds fewer requests (by load); a prompt too short to disaggregate
to the decode engine, or under load to the less busy side (:mod:`daemons.routing.engine_share`); while prefill is
backed up, to the decode engine (:mod:`daemons.routing.prefill_backlog`). None of these: the prefill call (the
front door makes it). Each decision is a :class:`PrefillOutcome` saying which engine and why; what it holds (load
counted on an engine, a failover slot, a share of the prefill engines) is given back by :meth:`Placement.release`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from daemons.edge.admission import Admission
from daemons.edge.door_settings import FrontDoorSettings
from daemons.metrics import FrontDoorMetrics
from daemons.names import RequestPath
from daemons.routing.engine_share import EngineShare
from daemons.routing.prefill_backlog import Backlog
from daemons.routing.prefill_router import PrefillChoice, PrefillOutcome, PrefillRouter
from daemons.routing.prompt_size import PromptSizer

log = logging.getLogger(__name__)

# The reason of a request the box's endpoint sent to a sibling's engine because it held fewer requests.
BY_LOAD = "load"
# ... and in turn, whatever the engines hold (decode_worker.routing round_robin: the baseline).
ROUND_ROBIN = "round_robin"
# ... and of one it sent to a sibling with a free slot because this front door had none (one admission for the box).
FULL_HERE = "full"


class NoEngine(Exception):
    """No engine can serve the request now: 503 + Retry-After. The message is the client's; ``detail`` (which
    may name internal addresses) is for the log only."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class Placement:
    """The front door's routing decisions and the counts they rest on (requests failing over, prompt tokens at
    prefill and on the decode engine, short prompts on prefill engines)."""

    def __init__(self, settings: Callable[[], FrontDoorSettings], *, router: PrefillRouter, metrics: FrontDoorMetrics,
                 admission: Admission, decode_down: Callable[[], str],
                 engine_pressed: Callable[[], bool] = lambda: False) -> None:
        s = settings()
        self.settings = settings  # the front door's, as SIGHUP last left them
        self.router = router
        self.metrics = metrics
        self.admission = admission
        # Why the decode engine cannot serve now ("" while it can): loading, reloading, silent. Then requests
        # fail over whole to a sibling or a prefill engine.
        self.decode_down = decode_down
        # Is the decode engine out of room by its own metrics (requests queued for capacity, KV cache nearly full)?
        # Then a request on the box's endpoint moves to a sibling with room, whatever the counts.
        self.engine_pressed = engine_pressed
        self.failovers = 0  # requests on the failover path now
        self.sizer = PromptSizer()
        self.backlog = Backlog(s.overflow_backlog_tokens, s.overflow_max_local_tokens)
        self.share = EngineShare(s.balance_short_prompts)
        router.in_turn = s.routing == ROUND_ROBIN
        metrics.prompt_tokens_in_flight.labels(where="prefill").set_function(lambda: self.backlog.prefill_tokens)
        metrics.prompt_tokens_in_flight.labels(where="decode").set_function(lambda: self.backlog.local_tokens)
        metrics.on_prefill_engines.set_function(lambda: self.share.on_prefill)
        metrics.failover_in_flight.set_function(lambda: self.failovers)

    def place(self, tokens: int, request_id: str, hop: dict[str, str] | None = None,
              balanced: bool = False, relay_to: PrefillChoice | None = None) -> PrefillOutcome | None:
        """Where a prompt of ``tokens`` (estimated) goes without a prefill call; None: make the prefill call.
        ``hop``: what a call to a sibling carries (None for a request a sibling passed here); ``balanced``: it came
        in on the box's one endpoint; ``relay_to``: a sibling that takes it because this front door is full."""
        if relay_to is not None and hop is not None:
            return self.to_sibling(relay_to, FULL_HERE, request_id, tokens, hop)
        down = self.decode_down()
        if down:
            return self.failover(down, request_id, tokens, hop)
        if balanced and hop is not None:
            moved = self.in_turn(request_id, tokens, hop) if self.router.in_turn else self.by_load(request_id, tokens,
                                                                                                    hop)
            if moved is not None:
                return moved
        short = self.short_prompt(tokens)
        if short is not None:
            return short
        if self.backlog.overflow(tokens):
            return PrefillOutcome("prefill_busy", local_tokens=tokens)
        return None

    # -- failover ----------------------------------------------------------------------
    def failover(self, why: str, request_id: str, tokens: int = 0, hop: dict[str, str] | None = None,
                 tried: Sequence[str] = ()) -> PrefillOutcome:
        """The whole request (a prompt of ``tokens``, estimated) elsewhere: the decode engine cannot serve it.

        First another decode-worker of the box whose engine serves (path sibling: its front door runs the request,
        KV path and all; ``hop`` is what that call carries, None for a request that already came from a sibling,
        which never goes on to a third), then a ready prefill engine (path failover). ``tried``: siblings that
        failed this request. Raises :class:`NoEngine` when none can: no prefill-worker ready, or failover at its
        bound."""
        if hop is not None:
            sibling = self.router.choose_sibling(exclude=tried)
            if sibling.url is not None:
                log.info("[%s] to %s: decode engine unavailable (%s)", request_id, sibling.daemon, why)
                return self.to_sibling(sibling, "engine_down", request_id, tokens, hop, reason=why)
        if self.failovers >= self.settings().failover_max_in_flight:
            raise NoEngine(f"decode engine unavailable and {self.failovers} requests already fail over "
                           f"to prefill engines (decode_worker.failover_max_in_flight)", why)
        choice = self.router.choose_any()
        if choice.url is None:
            raise NoEngine("decode engine unavailable and no prefill engine can serve", why)
        self.failovers += 1
        self.router.take(choice.daemon, tokens)
        log.info("[%s] failover to %s: decode engine unavailable (%s)", request_id, choice.daemon, why)
        return PrefillOutcome(RequestPath.FAILOVER, why, engine_url=f"{choice.url}/whole",
                              held=(choice.daemon, tokens), hop=hop)

    # -- the box's endpoint: by load ------------------------------------------------------
    def engine_requests(self) -> int:
        """Requests in progress on this worker's decode engine, by this front door's count: those it admitted, less
        those it relayed to a sibling or serves whole on a prefill engine. Published (``in_progress``) for the
        siblings' choice."""
        return max(0, self.admission.active - self.router.relayed() - self.failovers - self.share.on_prefill)

    def by_load(self, request_id: str, tokens: int, hop: dict[str, str]) -> PrefillOutcome | None:
        """A request that came in on the box's one endpoint goes to a sibling whose decode engine holds fewer
        requests (by LOAD_MARGIN or more) than this one's, or has room while this one has none (the engines' own
        metrics: :meth:`PrefillRouter.lighter_sibling`); None: it stays here."""
        mine = self.engine_requests() - 1  # the others on this engine (this request is admitted already)
        choice = self.router.lighter_sibling(mine, pressed=self.engine_pressed())
        if choice.url is None:
            return None
        log.debug("[%s] to %s by load (%d others in progress here)", request_id, choice.daemon, mine)
        return self.to_sibling(choice, BY_LOAD, request_id, tokens, hop)

    def in_turn(self, request_id: str, tokens: int, hop: dict[str, str]) -> PrefillOutcome | None:
        """routing round_robin: a request on the box's endpoint to the next engine in turn (this one's or a
        sibling's), whatever they hold; None: it stays here."""
        choice = self.router.next_in_turn()
        if choice.url is None:
            return None
        log.debug("[%s] to %s in turn", request_id, choice.daemon)
        return self.to_sibling(choice, ROUND_ROBIN, request_id, tokens, hop)

    def to_sibling(self, choice: PrefillChoice, why: str, request_id: str, tokens: int,
                   hop: dict[str, str], reason: str | None = None) -> PrefillOutcome:
        """The request relayed to ``choice``'s front door, counted there until released (path sibling) and in
        ``disagg_sibling_forwards_total{why}``; ``reason``: the outcome's, when it says more than ``why``."""
        assert choice.url is not None
        self.router.take(choice.daemon, tokens)
        self.metrics.sibling_forwards.labels(why=why).inc()
        return PrefillOutcome(RequestPath.SIBLING, reason or why, engine_url=choice.url, held=(choice.daemon, tokens),
                              hop=hop)

    # -- prefill ---------------------------------------------------------------------
    def short_prompt(self, tokens: int) -> PrefillOutcome | None:
        """Where a prompt of ``tokens`` (estimated) goes if it is too short to disaggregate: the decode engine
        while the box is quiet; under load, the decode engine or (balance_short_prompts) a prefill engine,
        whichever is less busy, else the prefill call. None: not short, or disaggregate it."""
        if self.settings().disaggregate_min_tokens <= 0 or tokens >= self.settings().disaggregate_min_tokens:
            return None
        others = self.admission.active - 1
        if others < self.settings().short_prompt_max_in_flight:
            return PrefillOutcome("short_prompt")
        if not self.share.enabled:
            return None
        if self.share.to_prefill(others, self.backlog.prefill_calls, len(self.router.working_prefills())):
            choice = self.router.choose()
            if choice.url is not None:
                self.share.taken()
                self.router.take(choice.daemon, tokens)
                return PrefillOutcome("decode_busy", engine_url=f"{choice.url}/whole", held=(choice.daemon, tokens))
        return PrefillOutcome("short_prompt")

    def release(self, outcome: PrefillOutcome | None) -> None:
        """A request leaves the whole-on-prefill path it was counted on (decode_busy, failover)."""
        if outcome is None:
            return
        if outcome.held is not None:  # once: the retry loop releases an outcome it then replaces
            self.router.give_back(*outcome.held)
            outcome.held = None
        if outcome.path == RequestPath.DECODE_BUSY:
            self.share.released()
        elif outcome.path == RequestPath.FAILOVER:
            self.failovers -= 1
