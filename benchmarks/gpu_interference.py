"""Decode inter-token latency while long prompts are prefilled, and KV transfer rate.

    python -m benchmarks.gpu_interference disagg --config CONFIG      # against the running stack
    python -m benchmarks.gpu_interference colocated --url URL         # one plain engine doing both
    python -m benchmarks.gpu_interference copy-rate                   # host and host->GPU copy rates

`disagg`: a long streaming decode runs on the decode engine while prompts of
--prefill-tokens are sent to prefill-worker (another GPU); `colocated`: the same
stream and the same prompts on one engine. Both print ITL p50/p99/max during
the prefill storm next to a quiet baseline measured in the same mode. Prints one
JSON line per measurement (prefixed `RESULT `).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import threading
import time

import httpx

from daemons.ops.make_model import _WORDS
from daemons.ops.openai_client import complete, completion_body


def words(n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    return f"Prompt {seed} {time.time_ns()}. " + " ".join(rng.choice(_WORDS) for _ in range(int(n_tokens / 1.05)))


def stream_itl(url: str, model: str, max_tokens: int, out: dict) -> None:
    body = completion_body(model, words(64, 1), max_tokens, ignore_eos=True)
    with httpx.Client(timeout=600, trust_env=False) as client:
        got = complete(client, url, body)
    if got.status != 200:
        raise RuntimeError(f"{url} answered {got.status}")
    out["stamps"] = got.token_times


def itl_stats(stamps: list[float], start: float, end: float) -> dict:
    gaps = [b - a for a, b in itertools.pairwise(stamps) if start <= a and b <= end]
    if not gaps:
        return {"n": 0}
    gaps.sort()
    return {
        "n": len(gaps),
        "p50_ms": 1000 * statistics.median(gaps),
        "p99_ms": 1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
        "max_ms": 1000 * gaps[-1],
    }


def prefill_storm(url: str, model: str, tokens: int, count: int, concurrency: int) -> float:
    """Send ``count`` long prompts with max_tokens=1; returns the seconds it took."""
    prompts = [words(tokens, 100 + i) for i in range(count)]
    t0 = time.perf_counter()

    def worker(items: list[str]) -> None:
        with httpx.Client(timeout=600, trust_env=False) as client:
            for p in items:
                client.post(f"{url}/v1/completions", json={"model": model, "prompt": p, "max_tokens": 1}).raise_for_status()

    threads = [threading.Thread(target=worker, args=(prompts[i::concurrency],)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def measure(decode_url: str, prefill_url: str, model: str, args: argparse.Namespace, mode: str) -> None:
    # Quiet baseline: the same stream with nothing else running.
    quiet: dict = {}
    stream_itl(decode_url, model, 128, quiet)
    base = itl_stats(quiet["stamps"], 0, float("inf"))
    # Under load: start the stream, let it settle, fire the storm.
    loaded: dict = {}
    t = threading.Thread(target=stream_itl, args=(decode_url, model, args.decode_tokens, loaded))
    t.start()
    time.sleep(1.0)
    s0 = time.perf_counter()
    storm_s = prefill_storm(prefill_url, model, args.prefill_tokens, args.prompts, args.concurrency)
    s1 = time.perf_counter()
    t.join()
    during = itl_stats(loaded["stamps"], s0, s1)
    print("RESULT " + json.dumps({
        "mode": mode, "prefill_tokens": args.prefill_tokens, "prompts": args.prompts,
        "storm_s": round(storm_s, 3), "itl_quiet": base, "itl_during_prefill": during,
    }), flush=True)


def copy_rate() -> None:
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8).pin_memory()
    dst = torch.empty(n, dtype=torch.uint8).pin_memory()
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    host = 5 * n / (time.perf_counter() - t0)
    gpu = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    gpu.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        gpu.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    h2d = 5 * n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(5):
        src.copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    d2h = 5 * n / (time.perf_counter() - t0)
    print("RESULT " + json.dumps({"mode": "copy-rate", "host_memcpy_GBps": host / 1e9,
                                  "h2d_pinned_GBps": h2d / 1e9, "d2h_pinned_GBps": d2h / 1e9}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("disagg", "colocated", "copy-rate"))
    ap.add_argument("--config")
    ap.add_argument("--url", help="colocated: the plain engine's URL")
    ap.add_argument("--model", default=None)
    ap.add_argument("--prefill-tokens", type=int, default=7000)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=1500)
    args = ap.parse_args()
    if args.mode == "copy-rate":
        copy_rate()
        return 0
    if args.mode == "disagg":
        from daemons.config import config_path, load_config

        config = load_config(config_path(args.config))
        decode_url = f"http://127.0.0.1:{config.decode_worker.engine_port}"
        prefill_url = f"http://127.0.0.1:{config.prefill_worker.port}"
        measure(decode_url, prefill_url, args.model or config.model.name, args, "disaggregated")
    else:
        measure(args.url, args.url, args.model, args, "colocated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
