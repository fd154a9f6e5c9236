"""LMCache's P2P reads over Mooncake, done only when every chunk has landed.

LMCache (0.5.6) pulls a prefetch's chunks from the peer's L1 in *one* Mooncake batch
(``MooncakeTeTransferChannelClient.submit_read``: ``batch_transfer_async_read`` with one transfer per chunk) and
polls ``transfer_check_status(batch_id)``; 1 is taken as "every chunk is here", the chunks are published to the
engine and it reads them. But Mooncake's Python binding answers for the batch's *first* transfer only
(``transfer_engine_py.cpp``, ``transferCheckStatus``: ``getTransferStatus(batch_id, 0, ...)``; its whole-batch
``getBatchTransferStatus`` is not called), so the second chunk of a load can still be arriving when the decode
engine reads it: KV part old, part new, an answer from KV that means something else, with HTTP 200 (found with
``benchmarks/p2p_crosscheck.py --trace``; docs/hosts.md). Over TCP on loaded CPUs about 1 chunk in 30 was published
before its last bytes came, and 1 answer in 1,000 was visibly wrong.

The fix here, applied when LMCache imports the module (nothing is imported early): each chunk is read as a batch
of its own, and a read is finished when every one of them is, with each chunk's own success (LMCache's prefetch
controller keeps the chunks that landed and frees the others). One transfer a batch is exactly what Mooncake's
check answers for; it also frees each batch (the binding's ``freeBatchID`` of a batch still busy failed silently).
An LMCache whose client no longer looks as expected starts unfixed, with an error in its log.
``DISAGG_MOONCAKE_READS=as-shipped`` leaves LMCache's reads as they are (for comparing, or once a Mooncake with a
whole-batch check is installed).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# LMCache's own logger once patched (its handler writes LMCache's log); ours until then.
log: logging.Logger | logging.LoggerAdapter[Any] = logging.getLogger(__name__)

MODULE = "lmcache.v1.distributed.transfer_channel.impl.mooncake_te_impl"
ENV = "DISAGG_MOONCAKE_READS"
PER_CHUNK, AS_SHIPPED = "per-chunk", "as-shipped"
INVALID_BATCH_IDS = (0, (1 << 64) - 1)
# Mooncake's transfer_check_status: 0 in flight, 1 done, -1 failed, -2 timed out.
IN_FLIGHT, DONE = 0, 1
REFUSED = -3  # ours: a chunk Mooncake would not take


class ChunkReads:
    """One read of several chunks: a Mooncake batch each, and the status each ended with (None: in flight)."""

    def __init__(self) -> None:
        self.batch_ids: list[int] = []
        self.status: list[int | None] = []

    def add(self, batch_id: int) -> None:
        self.batch_ids.append(batch_id)
        self.status.append(None)

    def refuse(self, count: int) -> None:
        """``count`` more chunks that were never submitted: failed from the start (no batch to ask about)."""
        self.batch_ids.extend([-1] * count)
        self.status.extend([REFUSED] * count)

    def poll(self, check_status: Any) -> bool:
        """Ask Mooncake about every chunk still in flight; True once none is."""
        for i, batch_id in enumerate(self.batch_ids):
            if self.status[i] is None:
                status = int(check_status(batch_id))
                if status != IN_FLIGHT:
                    self.status[i] = status
        return all(s is not None for s in self.status)

    def succeeded(self) -> list[bool]:
        return [s == DONE for s in self.status]


def submit_per_chunk(client: Any, local_addresses: Sequence[Any], remote_addresses: Sequence[Any]) -> int:
    """``MooncakeTeTransferChannelClient.submit_read``, one batch per chunk. Every size is checked before anything
    is submitted; a first chunk Mooncake refuses raises as the original does (nothing is in flight). One refused
    after others went out does not raise (the caller would free buffers still being written): it and the chunks
    after it are failed, and the read finishes, with them failed, once the submitted ones have landed — bounded by
    LMCache's own load timeout, never blocking its loop here."""
    if len(local_addresses) != len(remote_addresses):
        raise ValueError("local_addresses and remote_addresses must have equal length "
                         f"({len(local_addresses)} != {len(remote_addresses)})")
    if any(local.size != remote.size for local, remote in zip(local_addresses, remote_addresses, strict=True)):
        raise ValueError("local and remote sizes must match")
    engine = client._ctx.mooncake_te_engine
    base = client._ctx.l1_memory_desc.ptr
    reads = ChunkReads()
    for local, remote in zip(local_addresses, remote_addresses, strict=True):
        batch_id = engine.batch_transfer_async_read(client._remote_session_id, [local.offset + base],
                                                    [remote.offset + client._remote_buffer_ptr], [local.size])
        if batch_id in INVALID_BATCH_IDS or batch_id < 0 or batch_id >= (1 << 63):
            if not reads.batch_ids:
                raise RuntimeError(f"Failed to submit async read (batch id {batch_id}). Peer "
                                   f"{client._remote_session_id} is probably not running, not reachable, or the "
                                   "remote metadata is invalid.")
            refused = len(local_addresses) - len(reads.batch_ids)
            log.error("P2P read from %s: Mooncake refused chunk %d of %d (batch id %s); it and the %d after it "
                      "fail", client._remote_session_id, len(reads.batch_ids) + 1, len(local_addresses), batch_id,
                      refused - 1)
            reads.refuse(refused)
            break
        reads.add(batch_id)
    with client._lock:
        task_id = client._task_counter
        client._task_counter += 1
        client._tasks[task_id] = reads
    return task_id


def query_per_chunk(client: Any, task_id: int, read_result: Any) -> Any:
    """``query_read_status`` for a read of :func:`submit_per_chunk`: finished once every chunk is, each chunk's
    own success in the mask."""
    with client._lock:
        if task_id not in client._tasks:
            raise KeyError(f"Unknown read task id: {task_id}")
        reads = client._tasks[task_id]
    if not reads.poll(client._ctx.mooncake_te_engine.transfer_check_status):
        return read_result(finished=False, succeeded_mask=[])
    with client._lock:
        client._tasks.pop(task_id, None)
    mask = reads.succeeded()
    if not all(mask):
        log.error("P2P read from %s: %d of %d chunks failed or timed out (Mooncake status %s)",
                  client._remote_session_id, mask.count(False), len(mask), reads.status)
    return read_result(finished=True, succeeded_mask=mask)


def patch(module: ModuleType) -> None:
    """Replace the client's read submission and polling in LMCache's Mooncake transfer channel."""
    global log
    log = getattr(module, "logger", log)
    cls = module.MooncakeTeTransferChannelClient
    read_result = module.TransferChannelReadResult

    def submit_read(self: Any, local_addresses: list[Any], remote_addresses: list[Any]) -> int:
        return submit_per_chunk(self, local_addresses, remote_addresses)

    def query_read_status(self: Any, task_id: int) -> Any:
        return query_per_chunk(self, task_id, read_result)

    submit_read.__doc__ = submit_per_chunk.__doc__
    query_read_status.__doc__ = query_per_chunk.__doc__
    cls.submit_read = submit_read
    cls.query_read_status = query_read_status
    # A warning, so that it is in LMCache's log at its default level: a known defect of the installed Mooncake
    # worked around, which an operator looking at wrong answers should find said.
    log.warning("LMCache's P2P reads over Mooncake: one batch per chunk, done when every chunk is (Mooncake's "
                "transfer_check_status answers for a batch's first transfer only; %s)", __name__)


def apply(module: ModuleType) -> bool:
    """:func:`patch`, or, for an LMCache whose client looks otherwise, an error said and LMCache left to start as
    shipped (refusing to start would take the host's KV store down for a fix it may not need)."""
    try:
        patch(module)
    except Exception:
        log.exception("could not fix LMCache's P2P reads over Mooncake (%s): they run as shipped, and a chunk "
                      "can be read before it has landed", __name__)
        return False
    return True


class _Loader(importlib.abc.Loader):
    """LMCache's own loader for the module, which then patches it; everything else is the original's."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        apply(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Patch LMCache's Mooncake reads when (if ever) LMCache imports them; False where the operator said
    ``DISAGG_MOONCAKE_READS=as-shipped``. A bad value is refused (SystemExit), not guessed at."""
    mode = environ.get(ENV, PER_CHUNK)
    if mode == AS_SHIPPED:
        log.warning("%s=%s: LMCache's P2P reads over Mooncake as shipped (a chunk can be read before it has "
                    "landed: daemons/children/mooncake_reads.py)", ENV, mode)
        return False
    if mode != PER_CHUNK:
        raise SystemExit(f"{ENV}={mode!r}: expected {PER_CHUNK!r} (default) or {AS_SHIPPED!r}")
    if MODULE in sys.modules:
        apply(sys.modules[MODULE])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return True
