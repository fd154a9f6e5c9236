"""Where one request's time went, as a standard ``Server-Timing`` header (and the same numbers in histograms,
the access line and, for a stream whose client asks, a final SSE comment).

Stages, in the order a request meets them (each in milliseconds in the header):

- ``read``: the request's headers checked and its body read (a slow client shows here);
- ``queue``: waiting for an admission slot (``max_concurrent_requests``);
- ``prefill``: the prefill call, of which ``store``: prefill-worker waiting for LMCache to hold the prompt's
  chunks (absent when no prefill call was made: short prompts, failover, fallbacks decided before a call);
- ``decode``: the decode engine (or, failover and decode_busy, the engine that served it whole) from the call to
  its first token; for a request that is not streamed, to its whole answer;
- ``ttft``: arrival to first token (not streamed: to the answer): ``read + queue + prefill + decode`` and the
  front door's own few hundred microseconds;
- ``total``: arrival to the last byte (streams: known at the end only, in the final comment and the histogram);
- ``path``: no duration, ``desc`` = the request's path (``x-disagg-path``).

A stream's headers leave with its first token: they carry everything up to ``ttft``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from daemons.names import Stage

STAGES = tuple(s.value for s in Stage)  # daemons/names.py describes each
HEADER = "server-timing"
ASK_HEADER = "x-disagg-server-timing"  # a client that sends it (any value) gets the final SSE comment of a stream
COMMENT = ": server-timing "


@dataclass
class Timing:
    """One request's stage durations (seconds), measured on the monotonic clock from ``t0`` (arrival)."""

    t0: float = field(default_factory=time.monotonic)
    stages: dict[str, float] = field(default_factory=dict)
    wants_comment: bool = False  # the client asked for the final SSE comment (ASK_HEADER)
    _since: float | None = None

    def start(self) -> None:
        """A stage begins now (ended by :meth:`end`)."""
        self._since = time.monotonic()

    def end(self, stage: str) -> float:
        """The stage begun by :meth:`start` (or, without one, since arrival) ends now; its duration."""
        begun = self.t0 if self._since is None else self._since
        self.stages[stage] = time.monotonic() - begun
        self._since = None
        return self.stages[stage]

    def set(self, stage: str, seconds: float | None) -> None:
        if seconds is not None and seconds >= 0:
            self.stages[stage] = seconds

    def since_arrival(self, stage: str) -> float:
        self.stages[stage] = time.monotonic() - self.t0
        return self.stages[stage]

    def header(self, path: str = "") -> str:
        """``read;dur=0.2, queue;dur=0.0, prefill;dur=120.4, ..., path;desc="disaggregated"``."""
        parts = [f"{s};dur={self.stages[s] * 1000:.1f}" for s in STAGES if s in self.stages]
        if path:
            parts.append(f'path;desc="{path}"')
        return ", ".join(parts)


def parse(value: str) -> dict[str, float | str]:
    """A ``Server-Timing`` value as stage -> milliseconds (``path`` -> its description)."""
    out: dict[str, float | str] = {}
    for metric in value.split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        for param in params:
            key, _, v = param.partition("=")
            if key == "dur":
                try:
                    out[name] = float(v)
                except ValueError:
                    pass
            elif key == "desc":
                out[name] = v.strip('"')
    return out
