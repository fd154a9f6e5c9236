"""LMCache's P2P read over the real Mooncake engine (TCP, two engines on loopback) is finished only once every
chunk has landed (daemons/children/mooncake_reads.py).

As shipped, LMCache reads a prefetch's chunks in one Mooncake batch, and Mooncake's ``transfer_check_status``
answers for the batch's first transfer: a 4 KiB chunk followed by a 64 MiB one is "done" while the second is still
arriving (run this file with ``DISAGG_MOONCAKE_READS=as-shipped`` to see it fail: a race the small first chunk
wins, 3 of 3 times in every run so far). With the fix, the bytes are all there at the moment LMCache is told so,
whatever the timing.
"""

from __future__ import annotations

import os
import time
import types

import numpy as np
import pytest

from daemons.children import mooncake_reads

engine_module = pytest.importorskip("mooncake.engine", reason="LMCache's P2P extra is not installed (pip install .[p2p])")

SMALL, LARGE = 4096, 64 << 20
READ_DEADLINE_S = 120


def started_engine() -> object:
    engine = engine_module.TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    return engine


def test_a_read_of_a_small_and_a_large_chunk_is_done_only_with_every_byte_there() -> None:
    assert mooncake_reads.install(os.environ) is (os.environ.get(mooncake_reads.ENV) != mooncake_reads.AS_SHIPPED)
    from lmcache.v1.distributed.transfer_channel.api import TransferChannelAddress as Address
    from lmcache.v1.distributed.transfer_channel.impl import mooncake_te_impl

    source, dest = started_engine(), started_engine()
    src = np.random.default_rng(7).integers(0, 256, SMALL + LARGE, dtype=np.uint8)
    dst = np.zeros_like(src)
    source.register_memory(src.ctypes.data, src.nbytes)
    dest.register_memory(dst.ctypes.data, dst.nbytes)
    context = types.SimpleNamespace(mooncake_te_engine=dest, l1_memory_desc=types.SimpleNamespace(ptr=dst.ctypes.data))
    client = mooncake_te_impl.MooncakeTeTransferChannelClient(context, f"127.0.0.1:{source.get_rpc_port()}",
                                                              src.ctypes.data)
    chunks = [Address(0, SMALL), Address(SMALL, LARGE)]
    try:
        for _ in range(3):
            dst[:] = 0
            task = client.submit_read(chunks, chunks)
            deadline = time.monotonic() + READ_DEADLINE_S
            while not (result := client.query_read_status(task)).is_finished():
                assert time.monotonic() < deadline, f"the read did not finish in {READ_DEADLINE_S} s"
                time.sleep(0.001)
            landed = np.array_equal(dst, src)  # at the moment LMCache would publish the chunks
            assert result.succeeded_mask == [True, True]
            assert landed, "LMCache was told the read was done before every byte of the second chunk had landed"
    finally:
        dest.unregister_memory(dst.ctypes.data)
        source.unregister_memory(src.ctypes.data)
