"""Run inside the decode host (benchmarks/hosts.py starts it there): TTFT of the decode engine with the
prompt's KV fetched from the prefill host's LMCache (P2P) against the decode engine computing it.

For each prompt length, ``--reps`` new random prompts (token ids, never seen before) per mode:
  recompute: straight to the decode engine: its LMCache (and the peer's) miss, it computes the prompt;
  remote:    first the prefill host's prefill API (its engine computes, its LMCache stores), then the
             decode engine: its LMCache server fetches the chunks from the peer over P2P, the engine loads
             them and computes only the tail.
Prints one JSON object."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import httpx


def ask(client: httpx.Client, url: str, model: str, prompt: list[int]) -> tuple[float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    t0 = time.perf_counter()
    resp = client.post(url, json=body, timeout=300)
    took = time.perf_counter() - t0
    if resp.status_code != 200:
        raise SystemExit(f"{url}: HTTP {resp.status_code}: {resp.text[:300]}")
    details = resp.json()["usage"].get("prompt_tokens_details") or {}
    return took, int(details.get("cached_tokens") or 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-engine", default="http://127.0.0.1:8001")
    ap.add_argument("--prefill-api", required=True)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--vocab", type=int, default=900)
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(20261126)
    out: dict[str, object] = {"lengths": {}}
    with httpx.Client(trust_env=False) as client:
        ask(client, f"{args.decode_engine}/v1/completions", args.model, [rng.randrange(10, args.vocab)] * 16)
        for n in (int(x) for x in args.lengths.split(",")):
            rows: dict[str, list[tuple[float, int]]] = {"recompute": [], "remote": []}
            for _ in range(args.reps):
                prompt = [rng.randrange(10, args.vocab) for _ in range(n)]
                rows["recompute"].append(ask(client, f"{args.decode_engine}/v1/completions", args.model, prompt))
                prompt = [rng.randrange(10, args.vocab) for _ in range(n)]
                ask(client, f"{args.prefill_api}/v1/completions", args.model, prompt)
                rows["remote"].append(ask(client, f"{args.decode_engine}/v1/completions", args.model, prompt))
            out["lengths"][n] = {mode: {"ttft_s_median": statistics.median(t for t, _ in r),
                                        "ttft_s": [round(t, 4) for t, _ in r],
                                        "cached_tokens": [c for _, c in r]} for mode, r in rows.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
