"""A fingerprint of every KV chunk where LMCache moves it, for finding where a chunk changes on its way.

Benchmark-only diagnostics (``benchmarks/p2p_crosscheck.py --trace``): put this directory on ``PYTHONPATH`` with
``DISAGG_KV_TRACE_DIR`` set and every Python process of the stack imports it at start (``site``). It patches LMCache's
modules as they are imported, and nothing else; in a process that never imports them it does nothing. Each event
is one JSON line in ``$DISAGG_KV_TRACE_DIR/<hostname>-<pid>.jsonl``; ``benchmarks/kv_trace.py`` reads them.

Where a chunk is fingerprinted (``digest``: blake2b of its bytes, 8 bytes, hex):

======  ===============================  ==========================================================================
event   process                          when
======  ===============================  ==========================================================================
``W``   LMCache server                   a write admitted to L1 (an engine's store; P2P loads are ``L``)
``S``   LMCache server                   an engine's store committed: its request id and its chunks
``L``   LMCache server                   a prefetch (a P2P load from the peer) admitted to L1, read-locked
``L+``  LMCache server                   the same memory 5 ms later (``moved``: chunks whose bytes changed since)
``R0``  LMCache server                   a retrieve prepared: the L1 objects the engine is about to read
``R1``  LMCache server                   that retrieve committed, before the read locks go: the same objects
``E0``  engine (LMCache's connector)     the shared-memory slots the engine read, as it read them
``E1``  engine (LMCache's connector)     the engine's KV blocks after the scatter, gathered back
======  ===============================  ==========================================================================

A chunk that reaches the decode engine whole has one digest from ``W`` on the prefill host to ``E1`` on the
decode host. The standard library and what the patched process already imports (torch): nothing here may change
what LMCache does, only look.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

TRACE_DIR = os.environ.get("DISAGG_KV_TRACE_DIR", "")
_lock = threading.Lock()
_out: Any = None


def emit(event: str, **fields: Any) -> None:
    global _out
    line = json.dumps({"t": time.time(), "ev": event, "pid": os.getpid(), **fields}, default=str)
    with _lock:
        if _out is None:
            _out = open(os.path.join(TRACE_DIR, f"{socket.gethostname()}-{os.getpid()}.jsonl"), "a", buffering=1)
        _out.write(line + "\n")


def digest(tensor: Any) -> str:
    import torch

    flat = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(memoryview(flat), digest_size=8).hexdigest()


def chunk_id(key: Any) -> str:
    return key.chunk_hash.hex() if isinstance(key.chunk_hash, (bytes, bytearray)) else str(key.chunk_hash)


def _safe(fn: Callable[..., None]) -> Callable[..., None]:
    """A probe never breaks what it looks at: its own failure is an event, not an exception."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            emit("probe-error", probe=fn.__name__, error=f"{type(exc).__name__}: {exc}")

    return run


# -- LMCache server: L1 ---------------------------------------------------------------------------------------
def patch_l1_manager(module: Any) -> None:
    cls = module.L1Manager
    ok = module.L1Error.SUCCESS
    finish_write, finish_and_read = cls.finish_write, cls.finish_write_and_reserve_read

    @_safe
    def after_write(self: Any, result: dict[Any, Any]) -> None:
        chunks = []
        for key, err in result.items():
            entry = self._objects.get(key)
            if err == ok and entry is not None and not entry.is_temporary:
                chunks.append([chunk_id(key), digest(entry.memory_obj.tensor)])
        if chunks:
            emit("W", chunks=chunks)

    @_safe
    def later(loaded: list[tuple[str, Any, str]], delay: float) -> None:
        """The same memory ``delay`` s after the load was reported done: a digest that moved means bytes landed
        after the completion. (The object stays read-locked until the engine's retrieve commits, tens of ms.)"""
        time.sleep(delay)
        # An object the engine has already read and LMCache freed is skipped (its tensor would warn and be None).
        now = [(cid, digest(obj.tensor), first) for cid, obj, first in loaded
               if getattr(obj, "is_valid", lambda: True)()]
        emit("L+", delay=delay, chunks=[[cid, dig] for cid, dig, _ in now],
             moved=[[cid, dig] for cid, dig, first in now if dig != first])

    @_safe
    def after_load(result: dict[Any, Any]) -> None:
        loaded = [(chunk_id(key), obj, digest(obj.tensor)) for key, (err, obj) in result.items()
                  if err == ok and obj is not None]
        if loaded:
            emit("L", chunks=[[cid, dig] for cid, _, dig in loaded])
            threading.Thread(target=later, args=(loaded, 0.005), daemon=True).start()

    def traced_finish_write(self: Any, keys: list[Any], *args: Any, **kwargs: Any) -> Any:
        result = finish_write(self, keys, *args, **kwargs)
        after_write(self, result)
        return result

    def traced_finish_and_read(self: Any, keys: list[Any], *args: Any, **kwargs: Any) -> Any:
        result = finish_and_read(self, keys, *args, **kwargs)
        after_load(result)
        return result

    cls.finish_write = traced_finish_write
    cls.finish_write_and_reserve_read = traced_finish_and_read


# -- LMCache server: an engine's store and retrieve -----------------------------------------------------------
def patch_engine_driven_transfer(module: Any) -> None:
    cls = module.EngineDrivenTransferModule
    commit_store, prepare_retrieve, commit_retrieve = cls.commit_store, cls.prepare_retrieve, cls.commit_retrieve

    def objects(self: Any, key: Any) -> list[list[str]]:
        """Each chunk of ``key`` as L1 holds it now ("-": not resident)."""
        l1 = self._ctx.storage_manager._l1_manager
        chunks = []
        for k in self._resolve_single_group_obj_keys(key):
            entry = l1._objects.get(k)
            chunks.append([chunk_id(k), digest(entry.memory_obj.tensor) if entry is not None else "-"])
        return chunks

    @_safe
    def seen(self: Any, event: str, key: Any, instance_id: int) -> None:
        emit(event, rid=key.request_id, start=key.start, end=key.end, instance=instance_id,
             chunks=objects(self, key))

    def traced_commit_store(self: Any, key: Any, instance_id: int, *args: Any, **kwargs: Any) -> Any:
        result = commit_store(self, key, instance_id, *args, **kwargs)
        if result:
            seen(self, "S", key, instance_id)
        return result

    def traced_prepare_retrieve(self: Any, key: Any, instance_id: int, *args: Any, **kwargs: Any) -> Any:
        response = prepare_retrieve(self, key, instance_id, *args, **kwargs)
        if getattr(response, "success", False):
            seen(self, "R0", key, instance_id)
        else:
            emit("R0-miss", rid=key.request_id, start=key.start, end=key.end, instance=instance_id)
        return response

    def traced_commit_retrieve(self: Any, key: Any, instance_id: int, *args: Any, **kwargs: Any) -> Any:
        seen(self, "R1", key, instance_id)
        return commit_retrieve(self, key, instance_id, *args, **kwargs)

    # request_handler decorators keep their marks on the function objects: copy them to the wrappers.
    for name, wrapper in (("commit_store", traced_commit_store), ("prepare_retrieve", traced_prepare_retrieve),
                          ("commit_retrieve", traced_commit_retrieve)):
        original = getattr(cls, name)
        functools.update_wrapper(wrapper, original)
        setattr(cls, name, wrapper)


# -- the engine: what it read and what its blocks hold after ---------------------------------------------------
def patch_worker_transfer(module: Any) -> None:
    scatter = module.scatter_cpu_to_paged_kv
    gather = module.gather_paged_kv_to_cpu
    cls = module.EngineDrivenTransferContext
    submit_retrieve = cls.submit_retrieve
    current: dict[str, Any] = {}

    @_safe
    def after_scatter(kv_caches: Any, block_ids: list[int], chunks: list[Any], blocks_per_chunk: int,
                      skip: int, kwargs: dict[str, Any]) -> None:
        back = gather(kv_caches, list(block_ids[: len(chunks) * blocks_per_chunk]), blocks_per_chunk,
                      layout_hints=kwargs.get("layout_hints"), engine_kv_format=kwargs.get("engine_kv_format"),
                      engine_type=kwargs.get("engine_type", module.EngineType.VLLM))
        key = current.get("key")
        emit("E1", rid=getattr(key, "request_id", ""), start=getattr(key, "start", -1),
             end=getattr(key, "end", -1), skip=skip, blocks=list(block_ids[: len(chunks) * blocks_per_chunk]),
             read=[digest(c) for c in chunks], after=[digest(c) for c in back])

    def traced_scatter(kv_caches: Any, block_ids: list[int], chunks: list[Any], blocks_per_chunk: int,
                       skip_first_n_tokens: int = 0, **kwargs: Any) -> Any:
        result = scatter(kv_caches, block_ids, chunks, blocks_per_chunk, skip_first_n_tokens=skip_first_n_tokens,
                         **kwargs)
        after_scatter(kv_caches, block_ids, chunks, blocks_per_chunk, skip_first_n_tokens, kwargs)
        return result

    def traced_submit_retrieve(self: Any, request_id: str, key: Any, *args: Any, **kwargs: Any) -> Any:
        current["key"] = key
        try:
            future = submit_retrieve(self, request_id, key, *args, **kwargs)
        finally:
            current.pop("key", None)
        emit("E", rid=getattr(key, "request_id", request_id), start=key.start, end=key.end,
             ok=bool(future.result()) if future.query() else None)
        return future

    module.scatter_cpu_to_paged_kv = traced_scatter
    cls.submit_retrieve = traced_submit_retrieve


# -- patch each module as it is imported ---------------------------------------------------------------------
PATCHES: dict[str, Callable[[Any], None]] = {
    "lmcache.v1.distributed.l1_manager": patch_l1_manager,
    "lmcache.v1.multiprocess.modules.engine_driven_transfer": patch_engine_driven_transfer,
    "lmcache.v1.multiprocess.transfer_context.worker_transfer": patch_worker_transfer,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, patch: Callable[[Any], None]) -> None:
        self.loader, self.patch = loader, patch

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        try:
            self.patch(module)
            emit("patched", module=module.__name__)
        except Exception as exc:  # noqa: BLE001 - the module works unpatched
            emit("probe-error", probe=f"patch {module.__name__}", error=f"{type(exc).__name__}: {exc}")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


if TRACE_DIR:
    sys.meta_path.insert(0, _Finder())
