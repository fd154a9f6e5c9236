"""daemons/children/mooncake_reads.py: a P2P read is finished only when every chunk is.

The fake engine answers ``transfer_check_status`` the way Mooncake's Python binding does (for the batch's first
transfer only); tests/e2e/test_mooncake_reads.py runs the real Mooncake engine and LMCache's client.
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemons.children import mooncake_reads


@dataclass(frozen=True)
class Address:
    offset: int
    size: int


@dataclass
class ReadResult:
    finished: bool
    succeeded_mask: list[bool] = field(default_factory=list)


class FakeMooncake:
    """Batches of transfers; ``transfer_check_status`` looks at transfer 0 only, like the binding."""

    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}  # batch id -> each transfer's status (0 in flight, 1, -1)
        self.submitted: list[tuple[str, list[int], list[int], list[int]]] = []
        self.fail_submit_at: int | None = None

    def batch_transfer_async_read(self, session: str, local: list[int], remote: list[int], lengths: list[int]) -> int:
        if self.fail_submit_at is not None and len(self.submitted) == self.fail_submit_at:
            return 0
        self.submitted.append((session, local, remote, lengths))
        batch_id = 100 + len(self.batches)
        self.batches[batch_id] = [0] * len(local)
        return batch_id

    def transfer_check_status(self, batch_id: int) -> int:
        return self.batches[batch_id][0]

    def land(self, batch_id: int, transfer: int = 0, status: int = 1) -> None:
        self.batches[batch_id][transfer] = status


class FakeClient:
    def __init__(self, engine: FakeMooncake) -> None:
        self._ctx = types.SimpleNamespace(mooncake_te_engine=engine, l1_memory_desc=types.SimpleNamespace(ptr=1000))
        self._remote_session_id = "10.0.0.2:17000"
        self._remote_buffer_ptr = 5000
        self._lock = threading.Lock()
        self._task_counter = 0
        self._tasks: dict[int, Any] = {}


def read(engine: FakeMooncake, *chunks: tuple[int, int, int]) -> tuple[FakeClient, int]:
    client = FakeClient(engine)
    task = mooncake_reads.submit_per_chunk(client, [Address(lo, n) for lo, _, n in chunks],
                                           [Address(ro, n) for _, ro, n in chunks])
    return client, task


def query(client: FakeClient, task: int) -> ReadResult:
    return mooncake_reads.query_per_chunk(client, task, ReadResult)


def test_as_mooncake_answers_a_batch_of_two_is_done_when_its_first_transfer_is() -> None:
    # What LMCache relies on as shipped (one batch for the read), with the fake's faithful status: the defect.
    engine = FakeMooncake()
    batch = engine.batch_transfer_async_read("peer", [1, 2], [3, 4], [64, 64])
    engine.land(batch, 0)
    assert engine.transfer_check_status(batch) == 1 and engine.batches[batch][1] == 0


def test_each_chunk_is_a_batch_of_its_own_at_its_own_addresses() -> None:
    engine = FakeMooncake()
    read(engine, (0, 64, 4096), (8192, 12288, 4096))
    assert engine.submitted == [("10.0.0.2:17000", [1000], [5064], [4096]),
                                ("10.0.0.2:17000", [9192], [17288], [4096])]


def test_a_read_is_not_finished_while_a_later_chunk_is_in_flight() -> None:
    engine = FakeMooncake()
    client, task = read(engine, (0, 0, 64), (64, 64, 64))
    first, second = client._tasks[task].batch_ids
    engine.land(first)
    assert query(client, task) == ReadResult(finished=False, succeeded_mask=[])
    engine.land(second)
    assert query(client, task) == ReadResult(finished=True, succeeded_mask=[True, True])
    assert task not in client._tasks  # forgotten once reported
    with pytest.raises(KeyError):
        query(client, task)


def test_a_failed_chunk_waits_for_the_others_and_fails_alone() -> None:
    engine = FakeMooncake()
    client, task = read(engine, (0, 0, 64), (64, 64, 64), (128, 128, 64))
    a, b, c = client._tasks[task].batch_ids
    engine.land(a, status=-1)
    engine.land(c)
    assert not query(client, task).finished  # b still writes into its buffer: nothing may be freed yet
    engine.land(b, status=-2)
    assert query(client, task) == ReadResult(finished=True, succeeded_mask=[False, False, True])


def test_lengths_must_pair() -> None:
    with pytest.raises(ValueError, match="equal length"):
        mooncake_reads.submit_per_chunk(FakeClient(FakeMooncake()), [Address(0, 64)], [])


def test_a_first_chunk_refused_raises_as_lmcache_expects_with_nothing_in_flight() -> None:
    engine = FakeMooncake()
    engine.fail_submit_at = 0
    client = FakeClient(engine)
    with pytest.raises(RuntimeError, match="Failed to submit async read"):
        mooncake_reads.submit_per_chunk(client, [Address(0, 64)], [Address(0, 64)])
    assert client._tasks == {} and engine.submitted == []


def test_a_chunk_refused_after_others_went_out_fails_without_freeing_what_is_in_flight() -> None:
    engine = FakeMooncake()
    engine.fail_submit_at = 1
    client, task = read(engine, (0, 0, 64), (64, 64, 64), (128, 128, 64))  # no exception: chunk 0 is in flight
    assert len(engine.submitted) == 1
    assert query(client, task) == ReadResult(finished=False, succeeded_mask=[])  # until chunk 0 has landed
    engine.land(100)
    assert query(client, task) == ReadResult(finished=True, succeeded_mask=[True, False, False])


def test_sizes_are_all_checked_before_any_chunk_is_submitted() -> None:
    engine = FakeMooncake()
    client = FakeClient(engine)
    with pytest.raises(ValueError, match="sizes must match"):
        mooncake_reads.submit_per_chunk(client, [Address(0, 64), Address(64, 64)], [Address(0, 64), Address(64, 32)])
    assert engine.submitted == []


def fake_lmcache_module() -> types.ModuleType:
    module = types.ModuleType(mooncake_reads.MODULE)

    class MooncakeTeTransferChannelClient:
        def submit_read(self, local: list[Any], remote: list[Any]) -> int:
            raise AssertionError("as shipped")

    module.MooncakeTeTransferChannelClient = MooncakeTeTransferChannelClient  # type: ignore[attr-defined]
    module.TransferChannelReadResult = ReadResult  # type: ignore[attr-defined]
    return module


def test_install_patches_the_module_lmcache_already_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_lmcache_module()
    monkeypatch.setitem(sys.modules, mooncake_reads.MODULE, module)
    monkeypatch.setattr(mooncake_reads, "log", mooncake_reads.log)
    assert mooncake_reads.install({}) is True
    client = module.MooncakeTeTransferChannelClient()
    client.__dict__.update(vars(FakeClient(FakeMooncake())))
    task = client.submit_read([Address(0, 64)], [Address(0, 64)])
    client._ctx.mooncake_te_engine.land(100)
    assert client.query_read_status(task) == ReadResult(finished=True, succeeded_mask=[True])


def test_install_waits_for_the_import_and_adds_its_finder_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, mooncake_reads.MODULE, raising=False)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, mooncake_reads._Finder)])
    assert mooncake_reads.install({}) and mooncake_reads.install({"DISAGG_MOONCAKE_READS": "per-chunk"})
    assert sum(isinstance(f, mooncake_reads._Finder) for f in sys.meta_path) == 1
    assert mooncake_reads._Finder().find_spec("json", None) is None  # any other module: not ours to touch


def test_as_shipped_leaves_lmcache_alone_and_a_bad_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_lmcache_module()
    monkeypatch.setitem(sys.modules, mooncake_reads.MODULE, module)
    original = module.MooncakeTeTransferChannelClient.submit_read
    assert mooncake_reads.install({"DISAGG_MOONCAKE_READS": "as-shipped"}) is False
    assert module.MooncakeTeTransferChannelClient.submit_read is original
    with pytest.raises(SystemExit, match="DISAGG_MOONCAKE_READS='batch'"):
        mooncake_reads.install({"DISAGG_MOONCAKE_READS": "batch"})


def test_an_lmcache_whose_client_looks_otherwise_starts_unfixed_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    module = types.ModuleType(mooncake_reads.MODULE)  # no MooncakeTeTransferChannelClient
    monkeypatch.setattr(mooncake_reads, "log", mooncake_reads.log)

    class Loader:
        def exec_module(self, m: types.ModuleType) -> None:
            m.executed = True  # type: ignore[attr-defined]

        def get_source(self, name: str) -> str:
            return "# LMCache's source"

    loader = mooncake_reads._Loader(Loader())
    with caplog.at_level("ERROR"):
        loader.exec_module(module)  # no exception: LMCache's import goes on
    assert module.executed  # type: ignore[attr-defined]
    assert "could not fix LMCache's P2P reads over Mooncake" in caplog.text
    assert loader.get_source(mooncake_reads.MODULE) == "# LMCache's source"  # the rest is the original loader's
