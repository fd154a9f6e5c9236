"""Admission control at the front door: a bounded number of requests in
progress, a bounded queue in front of them, and a clear "no" past that.

``max_concurrent`` requests hold a slot (prefill call, decode, the whole
stream); up to ``max_queued`` more wait for one, each at most ``queue_timeout_s``.
A request that finds the queue full, or waits too long, is refused at once
with 429 and ``Retry-After``: a client learns the box is full in
milliseconds instead of every request getting slower until all of them time
out. Probes (``/health``, ``/metrics``) never queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class Overloaded(Exception):
    """No slot for this request: the reason is ``queue_full`` or ``queue_timeout``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Admission:
    """Slots counted against the cap itself (no semaphore holding permits): a cap lowered live (SIGHUP) admits no one
    until fewer than the new cap are in progress; a raised one wakes waiters at once."""

    def __init__(self, max_concurrent: int, max_queued: int, queue_timeout_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()  # first come, first served

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def resize(self, max_concurrent: int, max_queued: int, queue_timeout_s: float) -> None:
        """New limits, live (SIGHUP): a higher cap admits waiters at once, a lower one nobody new until the requests
        in progress are fewer than it."""
        self.max_concurrent, self.max_queued, self.queue_timeout_s = max_concurrent, max_queued, queue_timeout_s
        self._wake()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the block; raises :class:`Overloaded` without waiting when the queue is full."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        if self.active < self.max_concurrent and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise Overloaded("queue_full")
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await asyncio.wait_for(granted, self.queue_timeout_s)
        except TimeoutError:
            if granted.done() and not granted.cancelled():
                return  # granted at the deadline (Python 3.12's wait_for can say timeout then): it counts, it is ours
            raise Overloaded("queue_timeout") from None
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted, but its caller left: the slot goes to the next one
            raise
        finally:
            if granted in self._waiters:
                self._waiters.remove(granted)

    @property
    def full(self) -> bool:
        """Would the next request wait (every slot taken, or others waiting already)?"""
        return self.active >= self.max_concurrent or bool(self._waiters)

    def take_beyond(self, extra: int) -> bool:
        """A slot past the cap, for a request this front door only relays elsewhere (the box's endpoint sends it to a
        sibling with room): at most ``extra`` such; False past that. Released like any other; waiters get slots only
        once the requests in progress, these included, are fewer than the cap."""
        if self.active >= self.max_concurrent + extra:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active < self.max_concurrent:
            granted = self._waiters.popleft()
            if not granted.done():
                self.active += 1  # on the waiter's behalf: nobody can take its slot meanwhile
                granted.set_result(None)
