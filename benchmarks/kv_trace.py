"""Where a KV chunk changed on its way from the prefill engine to the decode engine, from the events that
``benchmarks/harness/kv_trace/sitecustomize.py`` wrote (one directory per host, JSON lines).

A chunk is fingerprinted at each place LMCache moves it: admitted to the prefill host's L1 (``W``), loaded over P2P
into the decode host's L1 (``L``), handed to the decode engine (``R0``), still the same when the engine says it is
done reading (``R1``), read by the engine (``E1.read``) and found in its KV blocks after the scatter
(``E1.after``). :func:`compare` names every step at which a chunk's fingerprint changed; an empty list of changes
for a request the cross-check failed means LMCache delivered the prefill engine's bytes to the decode engine's
blocks, and the wrong answer came from elsewhere (what the prefill engine stored, or the decode engine's compute).

    python -m benchmarks.kv_trace TRACE_DIR [--prefill-host prefill-a] [--decode-host decode-a]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

CHUNK_TOKENS = 256


def load(trace_dir: Path) -> list[dict[str, Any]]:
    """Every event under ``trace_dir/<host>/*.jsonl``, each with its ``host``; a torn last line is skipped."""
    events: list[dict[str, Any]] = []
    for path in sorted(trace_dir.glob("*/*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            event["host"] = path.parent.name
            events.append(event)
    events.sort(key=lambda e: e.get("t", 0.0))
    return events


def _first_digest(events: Iterable[dict[str, Any]], kind: str, host: str) -> tuple[dict[str, str], list[dict]]:
    """chunk -> digest of its first ``kind`` event on ``host``; and chunks seen again with another digest."""
    first: dict[str, str] = {}
    rewritten: list[dict[str, Any]] = []
    for e in events:
        if e.get("ev") != kind or e.get("host") != host:
            continue
        for chunk, dig in e.get("chunks", []):
            if chunk not in first:
                first[chunk] = dig
            elif first[chunk] != dig:
                rewritten.append({"event": kind, "chunk": chunk, "first": first[chunk], "again": dig, "t": e["t"]})
    return first, rewritten


def _engine_reads(events: list[dict[str, Any]], decode_host: str) -> Iterator[tuple[dict[str, Any], list[list[str]]]]:
    """Each decode engine read (``E1``) with the chunks LMCache handed it for the same key (its ``R0`` before)."""
    prepared: dict[tuple[str, int, int], list[list[str]]] = {}
    for e in events:
        if e.get("host") != decode_host:
            continue
        ident = (e.get("rid", ""), e.get("start", -1), e.get("end", -1))
        if e.get("ev") == "R0":
            prepared[ident] = e["chunks"]
        elif e.get("ev") == "E1":
            yield e, prepared.get(ident, [])


def compare(events: list[dict[str, Any]], prefill_host: str = "prefill-a",
            decode_host: str = "decode-a") -> dict[str, Any]:
    """Each step at which a chunk's fingerprint changed, and how many of each step were seen."""
    stored, rewritten = _first_digest(events, "W", prefill_host)
    loaded, reloaded = _first_digest(events, "L", decode_host)
    changes: list[dict[str, Any]] = []

    def change(step: str, e: dict[str, Any], chunk: str, before: str, after: str, **more: Any) -> None:
        changes.append({"step": step, "rid": e.get("rid", ""), "chunk": chunk, "before": before, "after": after,
                        "t": e["t"], **more})

    for chunk, dig in loaded.items():
        if chunk in stored and stored[chunk] != dig:
            change("p2p transfer (prefill L1 -> decode L1)", {"t": 0.0}, chunk, stored[chunk], dig)

    prepared: dict[tuple[str, int, int], list[list[str]]] = {}
    counts: collections.Counter[str] = collections.Counter(e.get("ev", "?") for e in events)
    for e in events:
        if e.get("host") != decode_host:
            continue
        ident = (e.get("rid", ""), e.get("start", -1), e.get("end", -1))
        if e["ev"] == "R0":
            prepared[ident] = e["chunks"]
            for chunk, dig in e["chunks"]:
                source = loaded.get(chunk) or stored.get(chunk)
                if source is not None and dig not in (source, "-"):  # "-": not in L1's table (a P2P load's)
                    change("in decode L1 before the engine read it", e, chunk, source, dig)
        elif e["ev"] == "R1":
            for (chunk, dig), (_, before) in zip(e["chunks"], prepared.get(ident, []), strict=False):
                if dig != before and "-" not in (dig, before):
                    change("while the decode engine read it", e, chunk, before, dig)
    for e, handed in _engine_reads(events, decode_host):
        skip = int(e.get("skip", 0))
        for i, (read, after) in enumerate(zip(e["read"], e["after"], strict=True)):
            chunk = handed[i][0] if i < len(handed) else f"#{i}"
            if i < len(handed) and handed[i][1] != "-" and read != handed[i][1]:
                change("between LMCache's slot and the engine's read", e, chunk, handed[i][1], read)
            if i * CHUNK_TOKENS >= skip and after != read:  # a chunk the scatter skipped keeps what it held
                change("scatter into the decode engine's blocks", e, chunk, read, after, blocks=e.get("blocks", []))
    return {
        "events": dict(counts),
        "chunks_stored": len(stored),
        "chunks_loaded": len(loaded),
        "loaded_not_stored_here": sum(1 for c in loaded if c not in stored),
        "stored_again_differently": rewritten[:20],
        "loaded_again_differently": reloaded[:20],
        "changes": changes,
        "probe_errors": [e for e in events if e.get("ev") == "probe-error"][:20],
    }


def chunk_fates(events: list[dict[str, Any]], prefill_host: str = "prefill-a",
                decode_host: str = "decode-a") -> dict[str, list[dict[str, Any]]]:
    """Each decode-engine retrieve (by request id): every chunk's digest as stored on the prefill host, as loaded
    on the decode host, as read by the decode engine; ``torn_at_load`` / ``torn_at_read`` where they differ from
    what was stored."""
    stored, _ = _first_digest(events, "W", prefill_host)
    loaded, _ = _first_digest(events, "L", decode_host)
    fates: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e, handed in _engine_reads(events, decode_host):
        for i, read in enumerate(e["read"]):
            chunk = handed[i][0] if i < len(handed) else ""
            fate = {"chunk": chunk, "stored": stored.get(chunk, ""), "loaded": loaded.get(chunk, ""), "read": read}
            fate["torn_at_load"] = bool(fate["stored"] and fate["loaded"] and fate["loaded"] != fate["stored"])
            fate["torn_at_read"] = bool(fate["stored"] and read != fate["stored"])
            fates[e.get("rid", "")].append(fate)
    return dict(fates)


def requests_of(events: list[dict[str, Any]], needle: str) -> list[dict[str, Any]]:
    """Every event of a request whose id contains ``needle`` (the front door's id is inside the engines')."""
    return [e for e in events if needle and needle in str(e.get("rid", ""))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("--prefill-host", default="prefill-a")
    parser.add_argument("--decode-host", default="decode-a")
    args = parser.parse_args(argv)
    result = compare(load(args.trace_dir), args.prefill_host, args.decode_host)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 1 if result["changes"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
