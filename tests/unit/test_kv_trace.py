"""benchmarks/kv_trace.py: which step changed a chunk, from the events the probes write (synthetic events here;
benchmarks/p2p_crosscheck.py --trace writes real ones)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import kv_trace


def ev(t: float, host: str, kind: str, **fields: Any) -> dict[str, Any]:
    return {"t": t, "host": host, "ev": kind, **fields}


def one_load(loaded: str, read: str, after: str | None = None) -> list[dict[str, Any]]:
    """Chunk a (stored "A") and chunk b (stored "B") of request r: b loaded as ``loaded``, read as ``read``."""
    return [
        ev(1.0, "prefill-a", "W", chunks=[["a", "A"], ["b", "B"]]),
        ev(2.0, "decode-a", "L", chunks=[["a", "A"], ["b", loaded]]),
        ev(3.0, "decode-a", "R0", rid="cmpl-xc1x-0", start=0, end=512, chunks=[["a", "-"], ["b", "-"]]),
        ev(4.0, "decode-a", "E1", rid="cmpl-xc1x-0", start=0, end=512, skip=0, blocks=[1, 2, 3, 4],
           read=["A", read], after=["A", after or read]),
        ev(5.0, "decode-a", "R1", rid="cmpl-xc1x-0", start=0, end=512, chunks=[["a", "-"], ["b", "-"]]),
    ]


def test_a_whole_chunk_changes_nowhere() -> None:
    events = one_load("B", "B")
    assert kv_trace.compare(events)["changes"] == []
    assert [(c["chunk"], c["torn_at_load"], c["torn_at_read"]) for c in kv_trace.chunk_fates(events)["cmpl-xc1x-0"]] \
        == [("a", False, False), ("b", False, False)]


def test_a_chunk_reported_loaded_early_but_whole_when_read() -> None:
    events = one_load("b-half", "B")
    steps = [c["step"] for c in kv_trace.compare(events)["changes"]]
    assert steps == ["p2p transfer (prefill L1 -> decode L1)"]
    b = kv_trace.chunk_fates(events)["cmpl-xc1x-0"][1]
    assert b["torn_at_load"] and not b["torn_at_read"]


def test_a_chunk_the_engine_read_before_it_landed() -> None:
    events = one_load("b-half", "b-more")
    b = kv_trace.chunk_fates(events)["cmpl-xc1x-0"][1]
    assert b == {"chunk": "b", "stored": "B", "loaded": "b-half", "read": "b-more", "torn_at_load": True,
                 "torn_at_read": True}


def test_a_scatter_that_did_not_land_in_the_blocks() -> None:
    steps = [c["step"] for c in kv_trace.compare(one_load("B", "B", after="stale"))["changes"]]
    assert steps == ["scatter into the decode engine's blocks"]


def test_load_reads_each_host_directory_and_skips_a_torn_line(tmp_path: Path) -> None:
    for host, event in (("prefill-a", {"t": 2.0, "ev": "W", "chunks": []}), ("decode-a", {"t": 1.0, "ev": "L"})):
        (tmp_path / host).mkdir()
        (tmp_path / host / "vm-1.jsonl").write_text(json.dumps(event) + "\n{\"t\": 3.0, \"ev\"")
    assert [(e["host"], e["ev"]) for e in kv_trace.load(tmp_path)] == [("decode-a", "L"), ("prefill-a", "W")]
