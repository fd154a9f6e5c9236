"""Quiet decode inter-token latency: an engine with the LMCache connector against a plain one.

Both engines are started exactly as decode-worker starts its engine
(``daemons.engine.engine_argv`` from the config), one with the connector
(``kv_consumer``, to the running lmcache-server) and one without, one per GPU,
at the same time; then the GPUs are swapped, so a difference between the two
cards cannot pass for the connector's. Per round, ``--runs`` quiet streams of
``--tokens`` tokens each, alternating the engines; per stream ITL p50 and p99.
``--graphs`` adds rounds with CUDA graphs (no ``--enforce-eager``) for both.

  python -m benchmarks.gpu_itl_overhead --config /tmp/disagg-gpu.yaml --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.gpu_interference import itl_stats, stream_itl
from daemons.children.child import ChildProcess
from daemons.children.engine import engine_argv, engine_env
from daemons.config import load_config
from daemons.deployment import Deployment

PORTS = {"connector": 8301, "plain": 8302}


def start(config, name: str, gpu: int, eager: bool, log_dir: Path) -> ChildProcess:  # type: ignore[no-untyped-def]
    """The engine under the keeper, as the daemons run it: its whole tree dies with this script."""
    worker = config.decode_worker.model_copy(update={"engine_port": PORTS[name], "device": f"cuda:{gpu}"})
    cfg = config.model_copy(update={"model": config.model.model_copy(update={"enforce_eager": eager})})
    argv = engine_argv(Deployment(cfg), worker, "kv_consumer" if name == "connector" else None)
    child = ChildProcess(f"{name} engine", argv, env=engine_env(worker),
                         log_path=log_dir / f"itl-{name}-gpu{gpu}-{'eager' if eager else 'graphs'}.log")
    child.start()
    return child


def wait_health(port: int, proc: ChildProcess, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(proc.exit_reason())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"engine on {port} not healthy after {timeout_s:.0f}s")


def wait_gpus_free(timeout_s: float = 180, below_mib: int = 8192) -> float:
    """Seconds until both GPUs hold less than ``below_mib`` again: an exited engine's KV cache stays
    allocated while the LMCache server still maps it (CUDA IPC), until the server lets it go."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.split()
        if out and all(int(v) < below_mib for v in out):
            return time.monotonic() - t0
        time.sleep(1)
    raise SystemExit(f"GPU memory still held {timeout_s:.0f}s after the engines exited: {out} MiB")


def round_(config, gpus: dict[str, int], eager: bool, args: argparse.Namespace) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def]
    log_dir = Path(config.log_dir)
    procs = {name: start(config, name, gpu, eager, log_dir) for name, gpu in gpus.items()}
    try:
        for name, proc in procs.items():
            wait_health(PORTS[name], proc)
        model = config.model.name
        for name in procs:  # warm-up stream each
            stream_itl(f"http://127.0.0.1:{PORTS[name]}", model, 32, {})
        results: dict[str, list[dict]] = {name: [] for name in procs}
        for _ in range(args.runs):
            for name in procs:
                out: dict = {}
                stream_itl(f"http://127.0.0.1:{PORTS[name]}", model, args.tokens, out)
                results[name].append(itl_stats(out["stamps"], 0, float("inf")))
        return results
    finally:
        for proc in procs.values():
            asyncio.run(proc.stop(60))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--graphs", action="store_true", help="also rounds with CUDA graphs (no --enforce-eager)")
    p.add_argument("--graphs-only", action="store_true", help="only the rounds with CUDA graphs")
    args = p.parse_args()
    config = load_config(Path(args.config))
    modes = [False] if args.graphs_only else [True] + ([False] if args.graphs else [])
    for eager in modes:
        summary: dict[str, list[float]] = {"connector_p50": [], "plain_p50": [], "connector_p99": [], "plain_p99": []}
        for gpus in ({"connector": 0, "plain": 1}, {"connector": 1, "plain": 0}):
            freed = wait_gpus_free()
            print(f"GPU memory free {freed:.1f}s after the last round's engines exited", flush=True)
            res = round_(config, gpus, eager, args)
            for name, stats in res.items():
                summary[f"{name}_p50"] += [s["p50_ms"] for s in stats]
                summary[f"{name}_p99"] += [s["p99_ms"] for s in stats]
            print("RESULT " + json.dumps({"eager": eager, "gpus": gpus, "runs": {
                name: [(round(s["p50_ms"], 2), round(s["p99_ms"], 2)) for s in stats] for name, stats in res.items()}}),
                flush=True)
        line = {"eager": eager}
        for key, values in summary.items():
            line[key] = {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
                         "max": round(max(values), 2)}
        line["ratio_p50"] = round(line["connector_p50"]["median"] / line["plain_p50"]["median"], 3)  # type: ignore[index]
        line["ratio_p99"] = round(line["connector_p99"]["median"] / line["plain_p99"]["median"], 3)  # type: ignore[index]
        print("SUMMARY " + json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
