"""A daemon's lifecycle states and the only transitions between them.

The table is the law; the diagram below is generated from it (``diagram()``)
and a unit test checks that this text still matches:

  starting -> waiting | loading | ready | draining | stopped | failed
  waiting  -> waiting | loading | ready | degraded | draining | stopped | failed
  loading  -> waiting | loading | ready | degraded | draining | stopped | failed
  ready    -> ready | degraded | draining | failed
  degraded -> ready | degraded | draining | failed
  draining -> stopped | failed
  stopped  -> (terminal)
  failed   -> (terminal)

Which daemon walks which path: lmcache-server ``starting -> loading -> ready``;
prefill-worker ``starting -> waiting -> loading -> ready``; decode-worker
``starting -> waiting -> loading -> waiting`` (its front door is open while it
waits for prefill-worker and sends the KV-path canary) ``-> ready|degraded``.
A self-transition only changes the reason. ``failed`` keeps the first reason:
nothing overwrites it, not even the drain that follows.

:class:`Lifecycle` holds the current state and enforces the table (the model is
supervisor's ``states.py`` and ``_assertInState``): an illegal transition raises
:class:`IllegalTransition` when strict (tests, ``DISAGG_STRICT_TRANSITIONS=1``)
and is logged as an error and refused otherwise.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    STARTING = "starting"
    WAITING = "waiting"
    LOADING = "loading"
    READY = "ready"
    DEGRADED = "degraded"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def serving(self) -> bool:
        return self in (State.READY, State.DEGRADED)

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]


S = State
TRANSITIONS: dict[State, tuple[State, ...]] = {
    S.STARTING: (S.WAITING, S.LOADING, S.READY, S.DRAINING, S.STOPPED, S.FAILED),
    S.WAITING: (S.WAITING, S.LOADING, S.READY, S.DEGRADED, S.DRAINING, S.STOPPED, S.FAILED),
    S.LOADING: (S.WAITING, S.LOADING, S.READY, S.DEGRADED, S.DRAINING, S.STOPPED, S.FAILED),
    S.READY: (S.READY, S.DEGRADED, S.DRAINING, S.FAILED),
    S.DEGRADED: (S.READY, S.DEGRADED, S.DRAINING, S.FAILED),
    S.DRAINING: (S.STOPPED, S.FAILED),
    S.STOPPED: (),
    S.FAILED: (),
}
del S


class IllegalTransition(RuntimeError):
    """A transition the table does not allow: a bug in the daemon."""


def diagram() -> str:
    """The transition table as text, one line per state."""
    width = max(len(s.value) for s in State)
    lines = []
    for state, targets in TRANSITIONS.items():
        right = " | ".join(t.value for t in targets) if targets else "(terminal)"
        lines.append(f"{state.value:<{width}} -> {right}")
    return "\n".join(lines)


def strict_from_env() -> bool:
    return os.environ.get("DISAGG_STRICT_TRANSITIONS", "") == "1"


class Lifecycle:
    """The current state and reason of one daemon; every change goes through :meth:`to`."""

    def __init__(self, name: str, *, strict: bool = False,
                 on_change: Callable[[State, str, bool], None] | None = None) -> None:
        self.name = name
        self.strict = strict
        self.state = State.STARTING
        self.reason = ""
        self._on_change = on_change

    def allowed(self, target: State) -> bool:
        return target in TRANSITIONS[self.state]

    def to(self, target: State, reason: str = "") -> bool:
        """Move to ``target``; False (and an error logged, or raised when strict) when the table forbids it."""
        if self.state is target and self.reason == reason:
            return True  # nothing new: not a transition
        if not self.allowed(target):
            message = (f"{self.name}: illegal transition {self.state.value} -> {target.value}"
                       f"{f' ({reason})' if reason else ''}; staying {self.state.value}"
                       f"{f' ({self.reason})' if self.reason else ''}")
            if self.strict:
                raise IllegalTransition(message)
            log.error("%s (a bug: please report it)", message)
            return False
        changed_state = self.state is not target
        self.state, self.reason = target, reason
        level = logging.WARNING if target in (State.DEGRADED, State.FAILED) else logging.INFO
        log.log(level, "%s state -> %s%s", self.name, target.value, f" ({reason})" if reason else "")
        if self._on_change is not None:
            self._on_change(target, reason, changed_state)
        return True

    def fail(self, reason: str) -> bool:
        """End in ``failed`` with ``reason``, unless already terminal (the first reason is kept)."""
        if self.state.terminal:
            return False
        return self.to(State.FAILED, reason)
