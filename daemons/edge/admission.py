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
from collections.abc import AsyncIterator


class Overloaded(Exception):
    """No slot for this request: the reason is ``queue_full`` or ``queue_timeout``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Admission:
    def __init__(self, max_concurrent: int, max_queued: int, queue_timeout_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self._slots = asyncio.Semaphore(max_concurrent)
        self._debt = 0  # slots to withhold as they come back (the cap was lowered below what is in use)
        self.active = 0
        self.queued = 0

    def resize(self, max_concurrent: int, max_queued: int, queue_timeout_s: float) -> None:
        """New limits, live (SIGHUP): a higher cap frees slots at once, a lower one as requests finish."""
        grow = max_concurrent - self.max_concurrent
        self.max_concurrent, self.max_queued, self.queue_timeout_s = max_concurrent, max_queued, queue_timeout_s
        while grow > 0:
            if self._debt:
                self._debt -= 1
            else:
                self._slots.release()
            grow -= 1
        self._debt -= min(0, grow)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the block; raises :class:`Overloaded` without waiting when the queue is full."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        if self.active >= self.max_concurrent or self.queued:
            if self.queued >= self.max_queued:
                raise Overloaded("queue_full")
            self.queued += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.queue_timeout_s)
            except TimeoutError:
                raise Overloaded("queue_timeout") from None
            finally:
                self.queued -= 1
        else:
            await self._slots.acquire()
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        if self._debt:
            self._debt -= 1
        else:
            self._slots.release()
