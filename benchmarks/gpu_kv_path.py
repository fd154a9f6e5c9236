"""On the GPU machine: does every disaggregated request get all its full chunks from LMCache?

Against a running stack (``benchmarks/gpu/kv_path.sh`` starts it):
1. sequential unique ~5.8k-token prompts through the front door;
2. four concurrent clients (streaming and not);
3. the race itself: prefill API, then the decode engine at once (no pause);
4. ``kill -9`` of lmcache-server under four clients (supervisord restarts it),
   and the time until the KV path is back.

  python -m benchmarks.gpu_kv_path --config /tmp/disagg-gpu.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys

import httpx

from benchmarks.harness.faults import HEADER, Fault, run_fault
from benchmarks.harness.load import Load, summary
from daemons.config import load_config
from daemons.kv.canary import cached_tokens, vocabulary
from daemons.runtime.statefile import read_state


def race(cfg, vocab: list[int], n: int, tokens: int) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Prefill API, then the decode engine with no pause: how many prompts got every full chunk."""
    prefill = f"http://127.0.0.1:{cfg.prefill_worker.port}/v1/completions"
    decode = f"http://127.0.0.1:{cfg.decode_worker.engine_port}/v1/completions"
    full = 0
    rng = random.Random(7)
    with httpx.Client(trust_env=False, timeout=120) as c:
        for _ in range(n):
            body = {"model": cfg.model.name, "prompt": [rng.choice(vocab) for _ in range(tokens)], "max_tokens": 1}
            c.post(prefill, json=body).raise_for_status()
            got = cached_tokens(c.post(decode, json=body).json())
            full += got >= tokens // cfg.lmcache.chunk_size * cfg.lmcache.chunk_size
    return {"prompts": n, "all_full_chunks": full}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--tokens", type=int, default=5800)
    a = p.parse_args()
    cfg = load_config(a.config)
    vocab = vocabulary(cfg.model.path)
    url = f"http://127.0.0.1:{cfg.decode_worker.port}"
    out: dict[str, object] = {}

    seq = Load(url, cfg.model.name, vocab, clients=1, duration_s=15, prompt_tokens=a.tokens, stream_every=0)
    out["sequential"] = summary(asyncio.run(seq.run()))
    print("sequential:", json.dumps(out["sequential"]), flush=True)
    conc = Load(url, cfg.model.name, vocab, clients=4, duration_s=30, prompt_tokens=a.tokens)
    out["concurrent"] = summary(asyncio.run(conc.run()))
    print("4 concurrent:", json.dumps(out["concurrent"]), flush=True)
    out["race"] = race(cfg, vocab, 8, a.tokens)
    print("prefill API then decode engine, no pause:", json.dumps(out["race"]), flush=True)

    def lmcache_pid() -> int:
        rec = read_state(cfg.runtime_dir, "lmcache-server")
        assert rec is not None
        return rec.pid

    fault = Fault("kill -9 lmcache-server", lmcache_pid, signal.SIGKILL)
    load = Load(url, cfg.model.name, vocab, clients=4, prompt_tokens=a.tokens)
    row = asyncio.run(run_fault(load, fault, warmup_s=10, recovery_bound_s=240))
    out["fault"] = row.__dict__
    print(HEADER)
    print(row.line(), flush=True)
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
