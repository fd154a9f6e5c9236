"""The KV cross-check, measured: how far apart the decode engine's first token (KV from LMCache) and the prefill
engine's own are on this machine, what margins the model leaves between its top two tokens, and what the
check costs; plus how well each answer's Server-Timing adds up to the time the client measured.

    .venv/bin/python -m benchmarks.kv_crosscheck --url http://127.0.0.1:8000 --model tiny-llama [-n 200]

Against a running stack (``disaggctl up``). Every request is greedy (temperature 0) with a new random prompt of
several chunks, completions and chat, streamed and not; a quarter ask for ``logprobs`` themselves, which gives the
model's top-1/top-2 margin at the first token. One JSON line per request with ``--json``. Exit 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

import httpx

from daemons.edge import timing
from daemons.kv.crosscheck import CHECK_HEADER
from daemons.ops.make_model import _WORDS


def prompt(rng: random.Random, words: int) -> str:
    return f"{rng.getrandbits(64):x} " + " ".join(rng.choice(_WORDS) for _ in range(words))


def one(client: httpx.Client, url: str, model: str, rng: random.Random, i: int,
        words: tuple[int, int] = (300, 900)) -> dict[str, Any]:
    chat, stream, own_logprobs = i % 2 == 1, i % 4 >= 2, i % 8 in (0, 5)
    text = prompt(rng, rng.randint(*words))
    body: dict[str, Any] = {"model": model, "max_tokens": 4, "temperature": 0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if own_logprobs:
            body.update(logprobs=True, top_logprobs=5)
    else:
        body["prompt"] = text
        if own_logprobs:
            body["logprobs"] = 5
    route = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.monotonic()
    margin = None
    with client.stream("POST", f"{url}{route}", json=body, headers={timing.ASK_HEADER: "1"}) as resp:
        client_ttft = time.monotonic() - t0
        raw = resp.read().decode(errors="replace")
    if not stream and resp.status_code == 200:
        answer = json.loads(raw)
    else:  # the first data event with logprobs
        answer = {}
        for event in raw.split("\n\n"):
            if event.startswith("data: {") and '"logprobs":{' in event.replace(" ", ""):
                answer = json.loads(event[6:])
                break
    try:
        lp = answer["choices"][0]["logprobs"]
        if chat:
            tops = sorted((t["logprob"] for t in lp["content"][0]["top_logprobs"]), reverse=True)
        else:
            tops = sorted(lp["top_logprobs"][0].values(), reverse=True)
        margin = tops[0] - tops[1] if len(tops) > 1 else None
    except (KeyError, IndexError, TypeError, AttributeError):
        pass
    check = resp.headers.get(CHECK_HEADER, "")
    result, _, delta = check.partition("; delta=")
    stages = timing.parse(resp.headers.get("server-timing", ""))
    parts = sum(float(stages.get(s, 0.0)) for s in ("read", "queue", "prefill", "decode"))
    return {"i": i, "chat": chat, "stream": stream, "status": resp.status_code,
            "path": resp.headers.get("x-disagg-path"), "check": result, "delta": float(delta) if delta else None,
            "margin": margin, "ttft_ms": stages.get("ttft"), "parts_ms": parts, "client_ttft_ms": client_ttft * 1000}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--words", default="300,900",
                    help="prompt length range in words (MIN,MAX); above decode_worker.disaggregate_min_tokens, or "
                    "the prompts stay on the decode engine and nothing is cross-checked (GPU config: 2048 tokens)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    with httpx.Client(timeout=300, trust_env=False) as client:
        for i in range(args.n):
            low, high = (int(w) for w in args.words.split(","))
            rows.append(one(client, args.url, args.model, rng, i, (low, high)))
    if args.json:
        with open(args.json, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    ok = [r for r in rows if r["status"] == 200]
    checked = [r for r in ok if r["check"]]
    counts = {k: sum(1 for r in checked if r["check"] == k) for k in ("match", "near_tie", "mismatch")}
    deltas = [r["delta"] for r in checked if r["check"] == "match" and r["delta"] is not None]
    margins = [r["margin"] for r in ok if r["margin"] is not None]
    gaps = [float(r["ttft_ms"]) - r["parts_ms"] for r in ok if r["ttft_ms"] is not None]
    over = [float(r["ttft_ms"]) - r["client_ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    print(f"requests {len(rows)}, answered {len(ok)}, paths "
          f"{ {p: sum(1 for r in ok if r['path'] == p) for p in sorted({r['path'] for r in ok})} }")
    print(f"cross-checked {len(checked)}: match {counts['match']}, near_tie {counts['near_tie']}, "
          f"mismatch {counts['mismatch']}")
    if deltas:
        print(f"same-token log-probability difference (nats): max {max(deltas):.3g}, "
              f"p99 {sorted(deltas)[int(0.99 * (len(deltas) - 1))]:.3g}, median {statistics.median(deltas):.3g}")
    if margins:
        ms = sorted(margins)
        print(f"model's top-1/top-2 margin at the first token (nats): min {ms[0]:.3g}, p10 {ms[len(ms) // 10]:.3g}, "
              f"median {statistics.median(ms):.3g} ({len(ms)} requests)")
    if gaps:
        print(f"Server-Timing: ttft - (read+queue+prefill+decode) max {max(gaps):.2f} ms, median "
              f"{statistics.median(gaps):.2f} ms; ttft - client's TTFT max {max(over):.2f} ms")
    return 0 if counts["mismatch"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
