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
        self.active = 0
        self.queued = 0

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
            except asyncio.TimeoutError:
                raise Overloaded("queue_timeout") from None
            finally:
                self.queued -= 1
        else:
            await self._slots.acquire()
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._slots.release()
