"""On the GPU machine: what clients see when the decode engine dies, with failover and migration.

Against a running stack (``benchmarks/gpu/failover.sh`` starts it, one GPU or two):
1. four clients for ``--normal-s``: requests served per second with every engine up;
2. ``kill -9`` of the decode engine's API server under four clients: sent / served (by path) / failed /
   refused / lost / hung, the time back to the KV path, requests served per second while the decode engine
   reloaded (failover) against normal;
3. once the stack is ready again, ``kill -9`` of the decode engine's keeper: the same counts, and no engine
   process outside the new keeper's tree afterwards;
4. migration: a greedy stream whose decode engine is killed mid-way equals the uninterrupted one.

  python -m benchmarks.gpu_failover --config /tmp/disagg-gpu.yaml --tokens 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time

import httpx

from benchmarks.harness.faults import HEADER, Fault, Row, run_fault, served_per_s
from benchmarks.harness.load import Load, summary
from daemons.children.engine import engine_child
from daemons.children.keeper import below
from daemons.children.strays import tagged
from daemons.config import Config, load_config
from daemons.deployment import Deployment
from daemons.kv.canary import vocabulary
from daemons.ops.ctl import wait_ready
from daemons.ops.openai_client import complete, completion_body
from daemons.runtime.statefile import read_state


def detail(cfg: Config, daemon: str, key: str) -> int:
    rec = read_state(cfg.runtime_dir, daemon)
    assert rec is not None, daemon
    return int(rec.details[key])


def fault_row(cfg: Config, url: str, vocab: list[int], tokens: int, name: str, key: str) -> tuple[Row, float]:
    fault = Fault(name, lambda: detail(cfg, "decode-worker", key), signal.SIGKILL)
    load = Load(url, cfg.model.name, vocab, clients=4, prompt_tokens=tokens, max_tokens=32, deadline_s=300)
    row = asyncio.run(run_fault(load, fault, warmup_s=10, recovery_bound_s=240))
    return row, row.served_per_s_during  # from the kill until the KV path was back: what failover carried


def migration_check(cfg: Config, url: str, vocab: list[int], tokens: int) -> dict[str, object]:
    """A greedy stream killed mid-way (its decode engine) against the same request uninterrupted."""
    prompt = [vocab[(i * 7919) % len(vocab)] for i in range(tokens)]
    body = completion_body(cfg.model.name, prompt, 256, ignore_eos=True)
    with httpx.Client(trust_env=False, timeout=600) as client:
        reference = complete(client, url, body)
        wait_ready(Deployment(cfg), 300, quiet=True)
        engine = detail(cfg, "decode-worker", "engine_pid")
        killer = threading.Timer(1.0, lambda: os.kill(engine, signal.SIGKILL))
        killer.start()
        broken = complete(client, url, body)
    return {"reference_tokens": len(reference.token_times), "interrupted_tokens": len(broken.token_times),
            "identical": reference.text == broken.text, "error": broken.error, "path": broken.path}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", required=True)
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--normal-s", type=float, default=20)
    p.add_argument("--budget-s", type=float, default=420, help="skip what would not finish within this")
    p.add_argument("--faults", default="engine,keeper", help="which kills: engine, keeper (comma-separated)")
    p.add_argument("--migration", type=int, default=1, help="0: skip the migration check")
    a = p.parse_args()
    t0 = time.monotonic()
    cfg = load_config(a.config)
    vocab = vocabulary(cfg.model.path)
    url = f"http://127.0.0.1:{cfg.decode_worker.port}"
    out: dict[str, object] = {}
    if a.normal_s > 0:
        normal = Load(url, cfg.model.name, vocab, clients=4, duration_s=a.normal_s, prompt_tokens=a.tokens,
                      max_tokens=32)
        records = asyncio.run(normal.run())
        out["normal"] = {**summary(records), "served_per_s": served_per_s(records, 0, a.normal_s)}
        print("normal:", json.dumps(out["normal"]), flush=True)
    print(HEADER)
    wanted = set(a.faults.split(","))
    for name, key in (("kill -9 decode engine", "engine_pid"), ("kill -9 decode keeper", "keeper_pid")):
        if key.split("_")[0] not in wanted:
            continue
        if time.monotonic() - t0 > a.budget_s - 200:
            print(f"skipped (device-time budget): {name}", flush=True)
            continue
        row, during = fault_row(cfg, url, vocab, a.tokens, name, key)
        out[name] = {**row.__dict__, "served_per_s_until_kv_path_back": during}
        print(row.line(), f"served/s until the KV path was back: {during:.2f}", flush=True)
        print("  problems:", row.problems, flush=True)
        wait_ready(Deployment(cfg), 300, quiet=True)
        if key == "keeper_pid":
            child = engine_child(Deployment(cfg), cfg.worker("decode-worker", None), None, name="decode-worker")
            keeper = detail(cfg, "decode-worker", "keeper_pid")
            tree = {keeper, *below(keeper)}
            out["orphans"] = [pid for pid in tagged(child.tag) if pid not in tree]
            print("engine processes outside the keeper's tree:", out["orphans"], flush=True)
    if a.migration and time.monotonic() - t0 < a.budget_s - 150:
        out["migration"] = migration_check(cfg, url, vocab, 1000)
        print("migration:", json.dumps(out["migration"]), flush=True)
    print("RESULT " + json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
