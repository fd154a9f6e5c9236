"""Overload: many clients against one box, with admission control and without.

Starts the stack twice from one config (on ports of its own, under supervisord):
once as configured (``max_concurrent_requests`` + ``max_queued_requests``), once
with admission control effectively off (a cap no load reaches), and runs the same
load against each: ``--clients`` clients looping unique prompts (streaming), each
backing off 0.5 s after a refusal as real clients do. Reports, per run, requests
admitted and served per second, 429s, latency percentiles of the served requests,
how their prompts reached the decode engine, and decode-worker's state at the end;
then the ratios (on / off) measured in this one run on this machine.

  python -m benchmarks.overload --clients 160 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from benchmarks.harness.load import Load, Record
from daemons.config import load_config
from daemons.kv.canary import vocabulary

REPO = Path(__file__).resolve().parents[1]
PORTS = {"lmcache": {"port": 38555, "http_port": 38080}, "lmcache_server": {"metrics_port": 39100},
         "prefill_worker": {"port": 38100, "engine_port": 38101, "metrics_port": 39101},
         "decode_worker": {"port": 38000, "engine_port": 38001, "metrics_port": 39102}}


def ctl(config: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemons.ops.ctl", "--config", str(config), *words],
                          capture_output=True, text=True, cwd=REPO, timeout=1200)


def write_config(directory: Path, source: Path, admission: bool) -> Path:
    doc = yaml.safe_load(source.read_text())
    doc["runtime_dir"], doc["log_dir"] = str(directory / "run"), str(directory / "log")
    doc["model"]["path"] = str(load_config(source).model.path)
    for section, ports in PORTS.items():
        doc.setdefault(section, {}).update(ports)
    if not admission:
        doc["decode_worker"].update(max_concurrent_requests=100_000, max_queued_requests=0)
    path = directory / "disagg.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def report(records: list[Record], duration_s: float, final_state: str) -> dict[str, object]:
    served = [r for r in records if r.outcome == "succeeded"]
    latency = [r.seconds for r in served]
    return {
        "sent": len(records),
        "served": len(served),
        "served_per_s": round(len(served) / duration_s, 2),
        "refused_429": sum(1 for r in records if r.status == 429),
        "other_failures": sum(1 for r in records if r.outcome != "succeeded" and r.status != 429),
        "p50_s": round(percentile(latency, 0.50), 2),
        "p99_s": round(percentile(latency, 0.99), 2),
        "mean_s": round(statistics.fmean(latency), 2) if latency else None,
        "paths": dict(Counter(f"{r.path}:{r.reason}" if r.reason else r.path for r in served)),
        "decode_worker_at_end": final_state,
    }


def run_one(config: Path, args: argparse.Namespace, vocab: list[int]) -> dict[str, object]:
    proc = ctl(config, "up")
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    try:
        if ctl(config, "wait-ready", "--timeout", "900").returncode != 0:
            raise SystemExit("stack not ready: " + ctl(config, "status").stdout)
        url = f"http://127.0.0.1:{PORTS['decode_worker']['port']}"
        load = Load(url, "tiny-llama", vocab, clients=args.clients, duration_s=args.duration,
                    prompt_tokens=args.tokens, max_tokens=args.max_tokens, deadline_s=args.deadline, stream_every=1)
        records = asyncio.run(load.run())
        status = json.loads(ctl(config, "status", "--json").stdout)
        state = next(d for d in status["daemons"] if d["daemon"] == "decode-worker")
        return report(records, args.duration, f"{state['state']} {state['reason']}".strip())
    finally:
        ctl(config, "down")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "etc" / "disagg.yaml"))
    p.add_argument("--clients", type=int, default=160)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline", type=float, default=300)
    a = p.parse_args()
    source = Path(a.config).resolve()
    model_path = load_config(source).model.path
    vocab = vocabulary(model_path)
    results = {}
    for name, admission in (("admission on", True), ("admission off", False)):
        with tempfile.TemporaryDirectory(prefix="disagg-overload-") as tmp:
            results[name] = run_one(write_config(Path(tmp), source, admission), a, vocab)
        print(name, json.dumps(results[name]), flush=True)
    on, off = results["admission on"], results["admission off"]
    ratios = {"served_per_s on/off": round(on["served_per_s"] / max(off["served_per_s"], 1e-9), 2),
              "p99 on/off": round(on["p99_s"] / max(off["p99_s"], 1e-9), 2)}
    print("ratios", json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
