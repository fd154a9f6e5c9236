"""Is an engine wedged, or only busy? Judged from what vLLM itself exports.

A live process is not a working engine: after an LMCache server restart a
request could park in the decode engine for good ("deferred", nothing running,
/health 200), and a prefill engine could accept requests and never finish one.
An engine is *wedged* when it holds requests (running or waiting) and its token
counters (engine steps, prompt + generation tokens computed) have not moved for
``timeout_s``, or when its API has not answered /health for ``timeout_s``. A
busy engine moves its counters every step, so load alone never trips this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_BUSY = ("vllm:num_requests_running", "vllm:num_requests_waiting")
# Engine steps (one per scheduled batch, each chunk of a long prefill included) and tokens computed.
_PROGRESS = ("vllm:iteration_tokens_total_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")


# Requests the engine's scheduler could not take for want of room (KV blocks, max_num_seqs): not those waiting for
# their KV to arrive (reason "deferred"), which a disaggregated decode engine always has some of.
_QUEUED = ("vllm:num_requests_waiting_by_reason", 'reason="capacity"')
# Requests waiting for an LMCache lookup or load: an abort of one then kills vLLM 0.26 + LMCache 0.5.3
# (daemons/edge/upstream.py waits for none before it closes an abandoned engine call).
_DEFERRED = 'reason="deferred"'
_KV_USAGE = "vllm:kv_cache_usage_perc"  # 1.0: every KV block in use
# An engine whose KV cache is this full, or that queues requests for room, takes no more by load.
KV_PRESSED = 0.95


def engine_pressed(queued: object, kv_usage: object) -> bool:
    """Is an engine out of room (requests queued for capacity, or its KV cache at KV_PRESSED)? From its own
    metrics, or what a sibling published of them; unknown values say no."""
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    return (number(queued) and queued > 0) or (number(kv_usage) and kv_usage >= KV_PRESSED)  # type: ignore[operator]


@dataclass(frozen=True)
class EngineLoad:
    busy: float  # requests running + waiting
    progress: float  # engine steps + prompt and generation tokens computed so far
    queued: float = 0.0  # requests waiting for room (not for their KV)
    kv_usage: float | None = None  # share of the KV cache in use, 0-1 (None: not exported)
    # Requests waiting for an LMCache lookup or load (None: not exported); not part of an observation's identity.
    deferred: float | None = field(default=None, compare=False)

    @property
    def pressed(self) -> bool:
        return engine_pressed(self.queued, self.kv_usage)


def engine_load(metrics_text: str) -> EngineLoad:
    """Requests in the engine, tokens computed, requests queued for room or deferred and KV-cache use, from a vLLM
    /metrics page."""
    busy = progress = queued = 0.0
    kv_usage: float | None = None
    deferred: float | None = None
    for line in metrics_text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in _BUSY and name not in _PROGRESS and name not in (_QUEUED[0], _KV_USAGE):
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        if name in _BUSY:
            busy += value
        elif name in _PROGRESS:
            progress += value
        elif name == _KV_USAGE:
            kv_usage = max(kv_usage or 0.0, value)
        elif _QUEUED[1] in line:
            queued += value
        elif _DEFERRED in line:
            deferred = (deferred or 0.0) + value
    return EngineLoad(busy, progress, queued, kv_usage, deferred)


class StallDetector:
    """Feed it one observation per heartbeat; it says when the engine is wedged."""

    def __init__(self, timeout_s: float, blind_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        # Longer than this between two observations, and nobody was looking: the daemon itself was stopped (SIGSTOP)
        # or its loop stalled. That gap is not the engine's silence nor its lack of progress. None: no such gap.
        self.blind_s = blind_s
        self._last_asked: float | None = None
        self._last_answer: float | None = None
        self._last_progress: float | None = None
        self._progress_value: float | None = None

    def silent_for(self, now: float) -> float:
        """Seconds the engine was seen not answering: from its last answer (its first question, if it never
        answered) to the last time it was asked; 0 while it answered last. A daemon that asked nothing for a while
        (stopped itself) has not seen its engine silent meanwhile."""
        if self._last_answer is None or self._last_asked is None:
            return 0.0
        return max(0.0, min(now, self._last_asked) - self._last_answer)

    def observe(self, now: float, load: EngineLoad | None) -> str | None:
        """``load`` None: the engine did not answer. Returns why it is wedged, or None."""
        blind = self.blind_s is not None and self._last_asked is not None and now - self._last_asked > self.blind_s
        self._last_asked = now
        if blind:  # the clocks start again from here
            if self._last_answer is not None:
                self._last_answer = now
            if self._last_progress is not None:
                self._last_progress = now
        if load is None:
            if self._last_answer is None:
                self._last_answer = now
            silent = now - self._last_answer
            if silent >= self.timeout_s:
                return f"engine has not answered for {silent:.0f}s"
            return None
        self._last_answer = now
        if load.busy <= 0 or load.progress != self._progress_value:
            self._progress_value = load.progress
            self._last_progress = now
            return None
        assert self._last_progress is not None
        stuck = now - self._last_progress
        if stuck >= self.timeout_s:
            return (f"engine holds {load.busy:.0f} request(s) and computed no token for {stuck:.0f}s "
                    "(wedged, not busy)")
        return None
