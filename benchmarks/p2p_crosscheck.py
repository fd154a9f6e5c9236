"""Many rounds of concurrent greedy requests over LMCache's P2P layer, every answer's KV cross-check counted.

One CI run saw one answer of eight concurrent greedy requests fail the KV cross-check on two hosts (docs/hosts.md:
the decode engine, having loaded every full chunk over P2P, chose a token outside the prefill engine's top five).
This runs the same round (tests/e2e/test_hosts.py: eight unique 600-word prompts at once, 16 tokens, temperature 0)
many times on the same two-host layout (network namespaces, benchmarks/harness/two_hosts.py), optionally with other
processes busy on the cores as in CI (the one-box stack ran beside the two hosts there), and writes what every answer
said: its path, its cross-check verdict and delta, its cached tokens.

    sudo .venv/bin/python -m benchmarks.p2p_crosscheck [--rounds 100] [--busy 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import multiprocessing
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness.netns import available
from benchmarks.harness.two_hosts import API_KEY, DECODE_ADDR, REQUEST_TIMEOUT_S, Cluster
from daemons.ops.make_model import _WORDS

log = logging.getLogger("p2p_crosscheck")
REPO = Path(__file__).resolve().parents[1]
FRONT_DOOR = f"http://{DECODE_ADDR}:8000"


def prompt(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    return f"Request {seed}. " + " ".join(rng.choice(_WORDS) for _ in range(n_words))


def ask(text: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": "tiny-llama", "prompt": text, "max_tokens": max_tokens, "temperature": 0.0}
    try:
        resp = httpx.post(f"{FRONT_DOOR}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S, trust_env=False,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    except httpx.HTTPError as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"status": resp.status_code, "path": resp.headers.get("x-disagg-path", ""),
                           "check": resp.headers.get("x-disagg-kv-check", ""),
                           "request_id": resp.headers.get("x-request-id", "")}
    if resp.status_code == 200:
        details = resp.json()["usage"].get("prompt_tokens_details") or {}
        out["cached"] = int(details.get("cached_tokens") or 0)
    return out


def busy_loop(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1000003


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--words", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the cores meanwhile")
    parser.add_argument("--minutes", type=float, default=0, help="stop after this long (0: run every round)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "p2p-crosscheck.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    why = available()
    if why:
        log.error("two hosts need network namespaces: %s", why)
        return 2
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="p2p-crosscheck-")))
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
            threads = [threading.Thread(target=lambda s=s, got=got: got.append(ask(prompt(s, args.words), args.max_tokens)))
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
        "paths": dict(collections.Counter(a.get("path", "") for a in answers)),
        "checks": dict(collections.Counter(a.get("check", "").split(";")[0] for a in answers)),
        "not_all_chunks": sum(1 for a in answers if a.get("status") == 200 and a.get("cached", 0) < 512),
        "errors": [a for a in answers if a.get("status") != 200],
        "mismatches": [a for a in answers if a.get("check", "").startswith("mismatch")],
        "largest_deltas": sorted((a["check"] for a in answers if "delta=" in a.get("check", "")),
                                 key=lambda c: -float(c.split("delta=")[1].split(";")[0].split()[0]))[:10],
        "decode_log_cross_check_failures": failed_lines[:20],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%d answers in %d rounds: paths %s, checks %s; written to %s", summary["answers"], summary["rounds"],
             summary["paths"], summary["checks"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
