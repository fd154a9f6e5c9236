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

from dataclasses import dataclass

_BUSY = ("vllm:num_requests_running", "vllm:num_requests_waiting")
# Engine steps (one per scheduled batch, each chunk of a long prefill included) and tokens computed.
_PROGRESS = ("vllm:iteration_tokens_total_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")


@dataclass(frozen=True)
class EngineLoad:
    busy: float  # requests running + waiting
    progress: float  # engine steps + prompt and generation tokens computed so far


def engine_load(metrics_text: str) -> EngineLoad:
    """Requests in the engine and tokens computed, from a vLLM /metrics page."""
    busy = progress = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _BUSY or name in _PROGRESS:
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            if name in _BUSY:
                busy += value
            else:
                progress += value
    return EngineLoad(busy, progress)


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
