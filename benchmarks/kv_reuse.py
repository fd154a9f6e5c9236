"""KV reuse benchmark: decode-engine TTFT with the prompt's KV from LMCache versus
recomputing it, at several prompt lengths, in one run on one machine; plus each
daemon's start-to-ready time and resident memory.

    .venv/bin/python -m benchmarks.kv_reuse [--config etc/disagg.yaml] [--lengths 1000,2000,4000,6000]

It starts the stack with `disaggctl up` (unless it is already up), measures and
stops what it started. Numbers are reported as ratios against the recompute
baseline measured in the same run: these machines are noisy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import httpx
import psutil

from daemons.config import config_path, load_config
from daemons.deployment import Deployment
from daemons.ops.ctl import all_ready, collect_status, down, up, wait_ready
from daemons.ops.make_model import _WORDS
from daemons.ops.openai_client import complete, completion_body
from daemons.runtime.statefile import read_state


def ttft(client: httpx.Client, url: str, model: str, prompt: str) -> tuple[float, dict, str]:
    """(TTFT s, usage, x-disagg-path: the front door's path, "" from an engine)."""
    got = complete(client, url, completion_body(model, prompt, 2))
    if got.status != 200:
        raise RuntimeError(f"{url} answered {got.status}: {got.body[:200]!r}")
    return got.ttft_s, got.usage, got.path


def prompt_of(tokens_wanted: int, seed: int) -> str:
    rng = random.Random(seed)
    # ~1.05 tokens per word with the local tokenizer; the reported counts are the engine's own.
    return f"Run {seed} {time.time_ns()}. " + " ".join(rng.choice(_WORDS) for _ in range(int(tokens_wanted / 1.05)))


def rss_mb(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
    except psutil.Error:
        return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--lengths", default="1000,2000,4000,6000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    config = load_config(config_path(args.config))
    started = False
    if not all_ready(collect_status(Deployment(config))):
        if up(Deployment(config)) != 0 or not wait_ready(Deployment(config), 900, quiet=True):
            print("stack did not come up", file=sys.stderr)
            return 1
        started = True
    try:
        engine = f"http://127.0.0.1:{config.decode_worker.engine_port}"
        prefill = f"http://{config.prefill_worker.host}:{config.prefill_worker.port}"
        front = f"http://127.0.0.1:{config.decode_worker.port}"
        model = config.model.name
        print(f"model {model}; chunk size {config.lmcache.chunk_size}; {args.repeat} prompts per length\n")
        print("| prompt tokens | cached from LMCache | decode TTFT, KV from LMCache (s) | decode TTFT, "
              "recompute (s) | ratio | front-door TTFT incl. prefill (s) | front-door path |")
        print("|---|---|---|---|---|---|---|")
        with httpx.Client(timeout=600, trust_env=False) as client:
            ttft(client, engine, model, prompt_of(300, 0))  # warm-up
            for n in (int(x) for x in args.lengths.split(",")):
                hit, miss, front_t, cached, ptoks, paths = [], [], [], [], [], []
                for r in range(args.repeat):
                    p = prompt_of(n, 1000 * n + r)
                    client.post(f"{prefill}/v1/completions", json={"model": model, "prompt": p}).raise_for_status()
                    t, usage, _ = ttft(client, engine, model, p)
                    hit.append(t)
                    cached.append(usage["prompt_tokens_details"]["cached_tokens"])
                    ptoks.append(usage["prompt_tokens"])
                    t, usage, _ = ttft(client, engine, model, prompt_of(n, 7000 * n + r))
                    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
                    miss.append(t)
                    t, _, path = ttft(client, front, model, prompt_of(n, 9000 * n + r))
                    front_t.append(t)
                    paths.append(path)
                h, m = statistics.median(hit), statistics.median(miss)
                print(f"| {int(statistics.median(ptoks))} | {int(statistics.median(cached))} | {h:.3f} | {m:.3f} "
                      f"| {m / h:.2f}x | {statistics.median(front_t):.3f} | {', '.join(sorted(set(paths)))} |")
        print("\n| daemon | start to ready (s) | RSS incl. children (MB) |")
        print("|---|---|---|")
        for name in Deployment(config).daemon_names():
            rec = read_state(config.runtime_dir, name)
            if rec is None:
                continue
            text = httpx.get(f"http://{rec.metrics}/metrics", timeout=10, trust_env=False).text
            ready = next((line.split()[-1] for line in text.splitlines()
                          if line.startswith("disagg_readiness_seconds ")), "nan")
            print(f"| {name} | {float(ready):.1f} | {rss_mb(rec.pid):.0f} |")
    finally:
        if started:
            down(Deployment(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
