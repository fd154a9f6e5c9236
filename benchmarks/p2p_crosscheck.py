"""Many rounds of concurrent greedy requests over LMCache's P2P layer, every answer's KV cross-check counted.

One CI run saw one answer of eight concurrent greedy requests fail the KV cross-check on two hosts (docs/hosts.md:
the decode engine, having loaded every full chunk over P2P, chose a token outside the prefill engine's top five).
This runs the same round (tests/e2e/test_hosts.py: eight unique 600-word prompts at once, 16 tokens, temperature 0)
many times on the same two-host layout (network namespaces, benchmarks/harness/two_hosts.py), optionally with other
processes busy on the cores as in CI (the one-box stack ran beside the two hosts there), and writes what every answer
said: its path, its cross-check verdict and delta, its cached tokens.

    sudo .venv/bin/python -m benchmarks.p2p_crosscheck [--rounds 100] [--busy 1] [--trace] [--out FILE]

With ``--trace`` every KV chunk is fingerprinted wherever LMCache moves it (benchmarks/harness/kv_trace/,
benchmarks/kv_trace.py), and the summary says at which step, if any, a chunk changed on its way.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import multiprocessing
import random
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import kv_trace
from benchmarks.harness.netns import available
from benchmarks.harness.two_hosts import API_KEY, DECODE_ADDR, REQUEST_TIMEOUT_S, Cluster
from daemons.ops.make_model import _WORDS

log = logging.getLogger("p2p_crosscheck")
REPO = Path(__file__).resolve().parents[1]
FRONT_DOOR = f"http://{DECODE_ADDR}:8000"
TRACE_HOOKS = REPO / "benchmarks" / "harness" / "kv_trace"


def prompt(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    return f"Request {seed}. " + " ".join(rng.choice(_WORDS) for _ in range(n_words))


def request_id(seed: int) -> str:
    """The id the front door forwards to both engines (inside their request ids, so in the KV trace too)."""
    return f"xc{seed}x"


def ask(seed: int, words: int, max_tokens: int) -> dict[str, Any]:
    body = {"model": "tiny-llama", "prompt": prompt(seed, words), "max_tokens": max_tokens, "temperature": 0.0}
    try:
        resp = httpx.post(f"{FRONT_DOOR}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S, trust_env=False,
                          headers={"Authorization": f"Bearer {API_KEY}", "x-request-id": request_id(seed)})
    except httpx.HTTPError as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}", "request_id": request_id(seed)}
    out: dict[str, Any] = {"status": resp.status_code, "path": resp.headers.get("x-disagg-path", ""),
                           "check": resp.headers.get("x-disagg-kv-check", ""), "request_id": request_id(seed)}
    if resp.status_code == 200:
        details = resp.json()["usage"].get("prompt_tokens_details") or {}
        out["cached"] = int(details.get("cached_tokens") or 0)
    return out


def busy_loop(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1000003


def delta(check: str) -> float | None:
    """The cross-check's log-probability gap (``inf`` for a token outside the prefill engine's top five)."""
    return float(check.split("delta=")[1].split(";")[0].split()[0]) if "delta=" in check else None


def traced(trace_dir: Path, failed_lines: list[str], answers: list[dict[str, Any]]) -> dict[str, Any]:
    """What the fingerprints say: every change of a chunk on its way; each answer's chunks (torn or whole) beside
    its cross-check; each failed request's events."""
    events = kv_trace.load(trace_dir)
    result = kv_trace.compare(events, "prefill-a", "decode-a")
    result["trace_dir"] = str(trace_dir)
    fates = kv_trace.chunk_fates(events, "prefill-a", "decode-a")
    by_answer: dict[str, list[dict[str, Any]]] = {}
    for rid, chunks in fates.items():
        ours = re.search(r"xc\d+x", rid)  # request_id() inside the engine's id (canaries have none)
        if ours:
            by_answer.setdefault(ours.group(), []).extend(chunks)
    table: dict[str, dict[str, Any]] = {}
    for a in answers:
        chunks = by_answer.get(a["request_id"], [])
        kind = ("torn when the engine read it" if any(c["torn_at_read"] for c in chunks) else
                "torn at load, whole when read" if any(c["torn_at_load"] for c in chunks) else
                "whole" if chunks else "no P2P chunk traced")
        row = table.setdefault(kind, {"answers": 0, "checks": collections.Counter(), "largest_deltas": []})
        row["answers"] += 1
        row["checks"][a.get("check", "").split(";")[0] or a.get("path", "?")] += 1
        d = delta(a.get("check", ""))
        if d is not None:
            row["largest_deltas"] = sorted(row["largest_deltas"] + [d], reverse=True)[:8]
    result["answers_by_chunk_fate"] = {k: {**v, "checks": dict(v["checks"])} for k, v in table.items()}
    result["chunks_traced"] = sum(len(c) for c in by_answer.values())
    result["chunks_torn_at_load"] = sum(c["torn_at_load"] for cs in by_answer.values() for c in cs)
    result["chunks_torn_at_read"] = sum(c["torn_at_read"] for cs in by_answer.values() for c in cs)
    result["failed_requests"] = {}
    for line in failed_lines:
        door_id = line.split("[", 2)[-1].split("]", 1)[0] if "[" in line else ""
        result["failed_requests"][door_id] = [
            {k: e.get(k) for k in ("t", "host", "ev", "rid", "start", "end", "chunks", "read", "after", "skip")
             if k in e} for e in kv_trace.requests_of(events, door_id)]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--words", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the cores meanwhile")
    parser.add_argument("--minutes", type=float, default=0, help="stop after this long (0: run every round)")
    parser.add_argument("--mooncake-reads", choices=["per-chunk", "as-shipped"], default="per-chunk",
                        help="LMCache's P2P reads: fixed (daemons/children/mooncake_reads.py) or as shipped")
    parser.add_argument("--trace", action="store_true", help="fingerprint every KV chunk on its way (kv_trace.py)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "p2p-crosscheck.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    why = available()
    if why:
        log.error("two hosts need network namespaces: %s", why)
        return 2
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="p2p-crosscheck-")))
    trace_dir = cluster.directory / "kv-trace"
    for host in cluster.hosts:
        cluster.host_env[host.name] = {"DISAGG_MOONCAKE_READS": args.mooncake_reads}
    if args.trace:
        for host in cluster.hosts:
            (trace_dir / host.name).mkdir(parents=True)
            (trace_dir / host.name).chmod(0o777)
            cluster.host_env[host.name].update(PYTHONPATH=str(TRACE_HOOKS), DISAGG_KV_TRACE_DIR=str(trace_dir / host.name))
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=busy_loop, args=(stop,), daemon=True) for _ in range(args.busy)]
    answers: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        cluster.up()
        for p in spinners:
            p.start()
        for r in range(args.rounds):
            if args.minutes and time.monotonic() - started > args.minutes * 60:
                break
            got: list[dict[str, Any]] = []
            threads = [threading.Thread(target=lambda s=s, got=got: got.append(ask(s, args.words, args.max_tokens)))
                       for s in range(10_000 + r * args.concurrency, 10_000 + (r + 1) * args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(REQUEST_TIMEOUT_S + 10)
            for a in got:
                a["round"] = r
            answers.extend(got)
            verdicts = collections.Counter(a.get("check", "").split(";")[0] or a.get("path", "?") for a in got)
            log.info("round %d: %s", r, dict(verdicts))
    finally:
        stop.set()
        for p in spinners:
            p.join(5)
        decode_log = cluster.decode.root / "log" / "decode-worker.out"
        failed_lines = [line for line in decode_log.read_text(errors="replace").splitlines()
                        if "KV cross-check failed" in line] if decode_log.exists() else []
        cluster.down()
    summary = {
        "date": datetime.date.today().isoformat(),
        "rounds": 1 + max((a["round"] for a in answers), default=-1),
        "answers": len(answers),
        "busy_processes": args.busy,
        "mooncake_reads": args.mooncake_reads,
        "paths": dict(collections.Counter(a.get("path", "") for a in answers)),
        "checks": dict(collections.Counter(a.get("check", "").split(";")[0] for a in answers)),
        "not_all_chunks": sum(1 for a in answers if a.get("status") == 200 and a.get("cached", 0) < 512),
        "errors": [a for a in answers if a.get("status") != 200],
        "mismatches": [a for a in answers if a.get("check", "").startswith("mismatch")],
        "largest_deltas": sorted((a["check"] for a in answers if "delta=" in a.get("check", "")),
                                 key=lambda c: -(delta(c) or 0.0))[:10],
        "decode_log_cross_check_failures": failed_lines[:20],
    }
    if args.trace:
        summary["kv_trace"] = traced(trace_dir, failed_lines, answers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%d answers in %d rounds: paths %s, checks %s; written to %s", summary["answers"], summary["rounds"],
             summary["paths"], summary["checks"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
