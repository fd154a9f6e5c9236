"""The box's one endpoint, measured: load-aware routing against round robin in the same run, against one prefill and
one decode engine, and what the shared KV store saves a multi-turn chat (issue 31; results in docs/performance.md).

Against a running stack of two or more prefill-worker and decode-worker instances behind ``decode_worker.shared_port``
(``benchmarks/gpu/endpoint.sh`` starts one on one GPU; on the CPU any such config does), a plan of steps:

- ``warmup:R``: one point at rate R whose numbers count for nothing (the first point after a start pays for the
  engines' warmup: in the first H100 run it was the load-aware point at 8/s, whose TTFT p50 came out 1.8x round
  robin's with the decode engines evenly loaded).
- ``sweep:R1/R2/...``: at each rate, ``vllm bench serve`` (random dataset, Poisson arrivals, every request's TTFT and
  ITL saved) on the endpoint with ``decode_worker.routing`` load and with round_robin, switched live by SIGHUP (the
  key is a reload key; the switch is seen in every decode-worker's state record before the load starts), in
  alternating order from rate to rate; a seed of its own for every point (the same prompts twice would hit the KV
  store the first run filled);
- ``chat:SESSIONS/TURNS``: multi-turn chat, each turn's prompt the last one's plus an answer and a new question, the
  sessions at once; then the same lengths with nothing shared (the control). The engines' own counters (vLLM's
  ``prefix_cache_*`` and ``external_prefix_cache_*``, in tokens: those found in the engine's GPU cache and loaded from
  LMCache) are read before and after each;
- ``single:R1/R2/...``: the last prefill-worker and decode-worker instances stopped (supervisord), so one prefill and
  one decode engine serve the endpoint; the same sweep with routing load.

Each point is a line of ``OUT/endpoint.jsonl`` as soon as it is known (a device call may end mid-plan); vLLM's own
JSON of each point beside it (``OUT/bench/``).

    python -m benchmarks.box_endpoint --config /tmp/disagg-gpu.yaml --out /tmp/gpu-out \\
        --plan "sweep:4/8/16,chat:16/6,single:4/8/16" --in-tokens 4500 --out-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.gpu_faults import set_keys
from benchmarks.harness.scrape import metric_value
from daemons.config import Config, load_config
from daemons.deployment import Deployment
from daemons.ops.openai_client import acomplete, completion_body
from daemons.runtime.listen import loopback_if_wildcard
from daemons.runtime.statefile import read_state

POLICIES = ("load", "round_robin")
# The engines' own counters, in tokens: prompt tokens asked for, found in the engine's GPU prefix cache, and
# (external) loaded through the KV connector from LMCache.
ENGINE_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                   "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total")


@dataclass
class Box:
    """What the plan needs of the stack: its config file and the addresses the config gives."""

    path: Path
    config: Config
    stopped: tuple[str, ...] = ()  # programs the plan stopped

    @property
    def endpoint(self) -> str:
        door = Deployment(self.config).shared_front_door()
        if door is None:
            raise SystemExit(f"{self.path}: decode_worker.shared_port is not set: no endpoint to measure")
        return f"http://{loopback_if_wildcard(door[0])}:{door[1]}"

    def decode_names(self) -> list[str]:
        return list(self.config.decode_workers())

    def metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{w.metrics_port}/metrics" for w in self.config.decode_workers().values()]

    def engine_urls(self, kind: str) -> list[str]:
        return [f"http://127.0.0.1:{w.engine_port}/metrics" for w in self.config.workers(kind).values()]

    def ctl(self, *words: str, timeout_s: float = 120) -> str:
        proc = subprocess.run([sys.executable, "-m", "daemons.ops.ctl", "--config", str(self.path), *words],
                              capture_output=True, text=True, timeout=timeout_s)
        return (proc.stdout + proc.stderr).strip()


def scrape(urls: list[str], names: tuple[str, ...], labels: str = "") -> dict[str, float]:
    """The sum over ``urls`` of each metric in ``names`` (labels: a substring every counted sample has)."""
    total = dict.fromkeys(names, 0.0)
    for url in urls:
        try:
            text = httpx.get(url, timeout=10).text
        except httpx.HTTPError:
            continue
        for name in names:
            total[name] += metric_value(text, name, labels)
    return total


def forwards(box: Box) -> dict[str, float]:
    """The box's relays to siblings so far, by why (the decode-workers' own counters)."""
    out = {}
    for why in ("load", "round_robin", "full", "engine_down"):
        out[why] = scrape(box.metrics_urls(), ("disagg_sibling_forwards_total",), f'why="{why}"')[
            "disagg_sibling_forwards_total"]
    return out


def set_routing(box: Box, policy: str, deadline_s: float = 30.0) -> None:
    """decode_worker.routing = ``policy`` in the config, SIGHUP to every decode-worker, and seen applied in each one's
    state record before returning."""
    set_keys(box.path, f"decode_worker.routing={policy}")
    names = [name for name in box.decode_names() if name not in box.stopped]
    print(box.ctl("supervisorctl", "signal", "HUP", *names), flush=True)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        records = [read_state(box.config.runtime_dir, name) for name in names]
        if all(r is not None and r.details.get("routing") == policy for r in records):
            return
        time.sleep(0.5)
    raise SystemExit(f"routing {policy}: not applied by every decode-worker within {deadline_s:.0f}s")


def bench_point(box: Box, args: argparse.Namespace, label: str, rate: float, seed: int) -> dict[str, Any]:
    """One rate with ``vllm bench serve``: its summary, and the box's relays during it."""
    bench_dir = args.out / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    name = f"{label}-{rate:g}.json"
    prompts = max(int(rate * args.duration), 10)
    before = forwards(box)
    cmd = [sys.executable, "-m", "benchmarks.harness.bench_serve", "--backend", "openai", "--base-url", box.endpoint,
           "--endpoint", "/v1/completions", "--model", box.config.model.served_name,
           "--tokenizer", str(box.config.model.path), "--dataset-name", "random",
           "--random-input-len", str(args.in_tokens), "--random-output-len", str(args.out_tokens),
           "--random-range-ratio", str(args.range_ratio), "--num-prompts", str(prompts), "--request-rate", str(rate),
           "--seed", str(seed), "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,90,99", "--goodput", f"ttft:{args.ttft_ms:g}", f"tpot:{args.tpot_ms:g}",
           "--save-result", "--save-detailed", "--result-dir", str(bench_dir), "--result-filename", name,
           "--disable-tqdm"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.point_timeout_s)
        tail = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        return {"label": label, "rate": rate, "error": f"vllm bench serve ran past {args.point_timeout_s}s"}
    after = forwards(box)
    row: dict[str, Any] = {"label": label, "rate": rate, "seed": seed, "prompts": prompts,
                           "wall_s": round(time.monotonic() - t0, 1),
                           "relayed": {k: after[k] - before[k] for k in after if after[k] != before[k]}}
    try:
        result = json.loads((bench_dir / name).read_text())
    except (OSError, ValueError):
        row["error"] = f"no result (exit {proc.returncode}): {tail}"
        return row
    for key in ("completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
                "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "p99_itl_ms"):
        row[key] = result.get(key)
    return row


async def chat_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], out_tokens: int,
                       session: int, turn: int) -> dict[str, Any]:
    body = completion_body(model, prompt, out_tokens, ignore_eos=True)
    got = await acomplete(client, url, body)
    return {"session": session, "turn": turn, "status": got.status, "path": got.path, "prompt": len(prompt),
            "ttft_s": got.ttft_s if got.token_times else None, "cached": got.cached_tokens,
            "prefill_ms": got.server_timing.get("prefill"), "error": (got.error or got.body.decode(errors="replace"))[:200]}


async def chat(box: Box, sessions: int, turns: int, shared: bool, seed: int, args: argparse.Namespace,
               vocab: int) -> list[dict[str, Any]]:
    """``sessions`` conversations at once, ``turns`` each: a turn's prompt is the last one's, the answer (stand-in
    tokens) and a new question (shared); or, the control, new tokens of the same length (nothing to reuse)."""
    url = box.endpoint
    model = box.config.model.served_name

    async def one(client: httpx.AsyncClient, session: int) -> list[dict[str, Any]]:
        rng = random.Random(seed * 1000 + session)
        draw = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
        await asyncio.sleep(session * args.chat_stagger_s)
        prompt = draw(args.chat_first_tokens)
        out = []
        for turn in range(1, turns + 1):
            if turn > 1:
                grown = len(prompt) + args.out_tokens_chat + args.chat_question_tokens
                prompt = prompt + draw(args.out_tokens_chat + args.chat_question_tokens) if shared else draw(grown)
            out.append(await chat_request(client, url, model, prompt, args.out_tokens_chat, session, turn))
        return out

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10), limits=limits, trust_env=False) as client:
        per_session = await asyncio.gather(*(one(client, s) for s in range(sessions)))
    return [r for rows in per_session for r in rows]


def chat_summary(rows: list[dict[str, Any]], turns: int) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == 200 and r["ttft_s"] is not None]
    by_turn = {}
    for t in range(1, turns + 1):
        ttfts = [r["ttft_s"] for r in ok if r["turn"] == t]
        prefill = [r["prefill_ms"] for r in ok if r["turn"] == t and isinstance(r["prefill_ms"], float)]
        by_turn[t] = {"ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
                      "prefill_p50_ms": round(statistics.median(prefill), 1) if prefill else None}
    errors = [r["error"] for r in rows if r not in ok]
    return {"requests": len(rows), "ok": len(ok), "paths": sorted({r["path"] for r in rows}),
            "errors": len(errors), "first_error": errors[0] if errors else "",
            "prompt_tokens": sum(r["prompt"] for r in ok), "decode_cached": sum(r["cached"] for r in ok),
            "ttft_p50_s": round(statistics.median(r["ttft_s"] for r in ok), 4) if ok else None, "by_turn": by_turn}


def stop_siblings(box: Box, deadline_s: float = 120.0) -> list[str]:
    """Stop the last prefill-worker and the last decode-worker instance: one of each serves the endpoint."""
    names = [list(box.config.workers("prefill-worker"))[-1], box.decode_names()[-1]]
    print(box.ctl("supervisorctl", "stop", *names, timeout_s=deadline_s), flush=True)
    return names


def write(out: Path, row: dict[str, Any]) -> None:
    with (out / "endpoint.jsonl").open("a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str), flush=True)


def report(jsonl: Path, png: Path | None) -> str:
    """The sweep rows of ``jsonl`` as a markdown table (and goodput, TTFT p50 and p99 against rate in ``png``, of
    the points where no request failed)."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    points = [r for r in rows if r.get("step") in ("sweep", "single") and "completed" in r]
    out = ["| engines, routing | rate (req/s) | served / failed | goodput (req/s) | TTFT p50 / p99 (ms) | "
           "TPOT p50 (ms) | moved to a sibling |", "|---|---|---|---|---|---|---|"]
    for r in sorted(points, key=lambda r: (r["label"], r["rate"])):
        moved = ", ".join(f"{v:.0f} {k}" for k, v in r.get("relayed", {}).items()) or "0"
        out.append(f"| {r['label']} | {r['rate']:g} | {r['completed']} / {r['failed']} | "
                   f"{r['request_goodput'] or 0:.2f} | {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
                   f"{r['median_tpot_ms']:.1f} | {moved} |")
    if png is not None and points:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        # A point with failed requests measured something else (the box recovering from a fault): not drawn.
        clean = [r for r in points if not r["failed"]]
        for i, label in enumerate(sorted({r["label"] for r in clean})):
            mine = sorted((r for r in clean if r["label"] == label), key=lambda r: r["rate"])
            rates = [r["rate"] for r in mine]
            for ax, key in zip(axes, ("request_goodput", "median_ttft_ms", "p99_ttft_ms"), strict=True):
                ax.plot(rates, [r[key] or 0 for r in mine], marker="o", color=f"C{i}", label=label)
        for ax, title in zip(axes, ("goodput (req/s)", "TTFT p50 (ms)", "TTFT p99 (ms)"), strict=True):
            ax.set_xlabel("offered rate (req/s)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(png, dpi=110)
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, help="print the table of this endpoint.jsonl (and --png) and exit")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plan", default="sweep:4/8/16,chat:16/6,single:4/8/16")
    ap.add_argument("--in-tokens", type=int, default=4500, help="random dataset: mean prompt length")
    ap.add_argument("--out-tokens", type=int, default=256, help="random dataset: mean answer length")
    ap.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in mean * (1 -/+ this)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per point")
    ap.add_argument("--ttft-ms", type=float, default=1000.0, help="goodput: a request's TTFT target")
    ap.add_argument("--tpot-ms", type=float, default=50.0, help="goodput: a request's time per output token target")
    ap.add_argument("--point-timeout-s", type=float, default=240.0)
    ap.add_argument("--chat-first-tokens", type=int, default=2400)
    ap.add_argument("--chat-question-tokens", type=int, default=384)
    ap.add_argument("--out-tokens-chat", type=int, default=128)
    ap.add_argument("--chat-stagger-s", type=float, default=0.25)
    ap.add_argument("--vocab", type=int, default=0, help="chat prompts' token ids are drawn below this (default: "
                    "the model's vocab_size, less the 100 first ids)")
    args = ap.parse_args()
    if args.report is not None:
        print(report(args.report, args.png))
        return 0
    if args.config is None or args.out is None:
        ap.error("--config and --out are required (or --report)")
    args.out.mkdir(parents=True, exist_ok=True)
    box = Box(args.config, load_config(args.config))
    vocab = args.vocab or json.loads((box.config.model.path / "config.json").read_text())["vocab_size"]
    seed = 1
    for step in filter(None, args.plan.split(",")):
        kind, _, spec = step.partition(":")
        if kind == "warmup":  # one point whose numbers count for nothing: the first after a start pays for warmup
            set_routing(box, "load")
            seed += 1
            write(args.out, {"step": "warmup", **bench_point(box, args, "warmup", float(spec or 4), seed)})
        elif kind in ("sweep", "single"):
            rates = [float(r) for r in spec.split("/")]
            if kind == "single":
                box.stopped = tuple(stop_siblings(box))
                write(args.out, {"step": "single", "stopped": box.stopped})
            for i, rate in enumerate(rates):
                order = ["load"] if kind == "single" else (POLICIES if i % 2 == 0 else POLICIES[::-1])
                for policy in order:
                    set_routing(box, policy)
                    seed += 1
                    label = "1P+1D" if kind == "single" else f"2P+2D {policy}"
                    write(args.out, {"step": kind, "policy": policy, **bench_point(box, args, label, rate, seed)})
        elif kind == "chat":
            sessions, turns = (int(x) for x in spec.split("/"))
            set_routing(box, "load")
            for shared in (True, False):
                before_p = scrape(box.engine_urls("prefill-worker"), ENGINE_COUNTERS)
                before_d = scrape(box.engine_urls("decode-worker"), ENGINE_COUNTERS)
                seed += 1
                t0 = time.monotonic()
                rows = asyncio.run(chat(box, sessions, turns, shared, seed, args, vocab))
                after_p = scrape(box.engine_urls("prefill-worker"), ENGINE_COUNTERS)
                after_d = scrape(box.engine_urls("decode-worker"), ENGINE_COUNTERS)
                write(args.out, {"step": "chat", "shared_prefix": shared, "sessions": sessions, "turns": turns,
                                 "wall_s": round(time.monotonic() - t0, 1), **chat_summary(rows, turns),
                                 "prefill_engines": {k: after_p[k] - before_p[k] for k in ENGINE_COUNTERS},
                                 "decode_engines": {k: after_d[k] - before_d[k] for k in ENGINE_COUNTERS}})
        else:
            raise SystemExit(f"unknown step {step!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
