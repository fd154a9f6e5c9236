"""Stop working for a client that has gone away.

Starlette runs a non-streaming handler to its end even when the client has
closed the connection; a front door that waits on an engine then keeps the
engine generating for nobody. :func:`unless_disconnected` runs the work and
watches the connection: when the client goes, the work is cancelled, which
closes our connection to the engine, and vLLM aborts a request whose client
went away. A streaming response is watched by Starlette itself once it has
started; this covers the time before that (prefill, waiting for the first token).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def _disconnected(request: Request) -> None:
    # Called once the body has been read: the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled (:class:`ClientGone`) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
