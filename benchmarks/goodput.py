"""Goodput: the highest request rate at which >= 90 % of requests meet both latency targets.

Poisson arrivals at each rate of a sweep, every request streamed, its TTFT and
inter-token latencies recorded. A request *attains* when it succeeded, its TTFT
<= --ttft-s and the 90th percentile of its inter-token latencies <= --itl-s.
Prompts are random token ids (exact lengths, no prefix shared between requests).

Several --url values split the load evenly: each gets its own Poisson process
at rate / len(urls) (an exact stand-in for random routing between replicas).

    # our stack (the front door) against two plain engines, one per GPU:
    python -m benchmarks.goodput --url http://127.0.0.1:8000 --label disagg --in 4000 --out 200 \\
        --rates 1,2,3,4,5 --duration 30 --json results.jsonl
    python -m benchmarks.goodput --url http://127.0.0.1:8201,http://127.0.0.1:8202 --label colocated ...
    python -m benchmarks.goodput --plot results.jsonl --png attainment.png

Each line of --json is one (system, workload, rate) point; --plot draws attainment
against rate per system and workload and prints the goodput of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx

from benchmarks.harness.goodput_math import (
    ATTAIN,
    Result,
    by_rate,
    goodput_text,
    parse_slo,
    slo_title,
    summarize,
    with_slo,
)
from daemons.ops.openai_client import acomplete, completion_body


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], out_tokens: int,
                      deadline_s: float, headers: dict[str, str]) -> Result:
    body = completion_body(model, prompt, out_tokens, ignore_eos=True)
    r = Result()
    try:
        got = await asyncio.wait_for(acomplete(client, url, body, headers=headers), deadline_s)
    except TimeoutError:
        r.error = f"no answer within {deadline_s:.0f}s"
        return r
    except (httpx.HTTPError, ValueError) as exc:
        r.error = repr(exc)[:200]
        return r
    r.path = got.path
    if got.status != 200:
        r.error = f"HTTP {got.status}"
        return r
    r.ttft = got.ttft_s
    r.itls = got.itls
    r.cached = got.cached_tokens
    r.ok = bool(got.token_times)
    return r


async def sweep_point(urls: list[str], model: str, rate: float, duration_s: float, in_tokens: int, out_tokens: int,
                      vocab: int, seed: int, deadline_s: float, headers: dict[str, str]) -> list[Result]:
    rng = random.Random(seed)
    # Idle connections dropped after 2 s: below the servers' keep-alive timeout (uvicorn's 5 s), so no request
    # goes out on a connection the server is closing (benchmarks/harness/load.py).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), limits=limits, trust_env=False) as client:
        async def arrivals(url: str, sub_rate: float, sub_seed: int) -> list[Result]:
            r = random.Random(sub_seed)
            tasks = []
            t_end = time.perf_counter() + duration_s
            next_at = time.perf_counter()
            while True:
                next_at += r.expovariate(sub_rate)
                if next_at >= t_end:
                    break
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                prompt = [r.randrange(min(1000, vocab // 4), vocab) for _ in range(in_tokens)]
                tasks.append(asyncio.create_task(one_request(client, url, model, prompt, out_tokens, deadline_s,
                                                             headers)))
            return list(await asyncio.gather(*tasks))

        per_url = await asyncio.gather(*(arrivals(u, rate / len(urls), rng.randrange(1 << 30)) for u in urls))
    return [res for results in per_url for res in results]


def plot(jsonl: Path, png: Path, slos: list[tuple[float, str, float]]) -> None:
    """Attainment against rate: one panel per (SLO, workload), one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    workloads = sorted({r["workload"] for r in rows}, key=lambda w: -int(w.split("/")[0]))
    if not slos:
        slos = [(rows[0]["ttft_target_s"], "itl_p90", rows[0]["itl_target_s"])]
    colors = {label: f"C{i}" for i, label in enumerate(sorted({r["label"] for r in rows}))}  # same in every panel
    fig, axes = plt.subplots(len(slos), len(workloads), figsize=(6 * len(workloads), 4.2 * len(slos)),
                             squeeze=False)
    for row, slo in zip(axes, slos, strict=True):
        for ax, workload in zip(row, workloads, strict=True):
            for label in sorted({r["label"] for r in rows if r["workload"] == workload}):
                pts = with_slo([r for r in rows if r["workload"] == workload and r["label"] == label], slo)
                g = goodput_text(pts)
                worst = by_rate(pts)
                ax.plot([r for r, _ in worst], [100 * a for _, a in worst], marker="o", color=colors[label],
                        label=f"{label} (goodput {g})")
                ax.scatter([p["rate"] for p in pts], [100 * p["attainment"] for p in pts],
                           color=colors[label], marker="x", s=30)  # every run, where a rate was repeated
                print(f"{slo_title(slo)} | {workload} {label}: goodput {g}", flush=True)
            ax.axhline(100 * ATTAIN, color="grey", linestyle="--", linewidth=1)
            ax.set_title(f"{workload} tokens in/out; {slo_title(slo)}", fontsize=10)
            ax.set_xlabel("request rate (req/s, Poisson)")
            ax.set_ylabel("requests meeting both targets (%)")
            ax.set_ylim(0, 105)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot_itl_cdf(files: list[Path], png: Path) -> None:
    """Tail of every inter-token latency in --itls-out files: the share of tokens slower than x (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for f in files:
        d = json.loads(f.read_text())
        xs = sorted(1000 * x for x in d["itls"])
        if not xs:
            continue
        n = len(xs)
        q = lambda p, xs=xs, n=n: xs[int(p * (n - 1))]  # noqa: E731
        ys = [1 - i / n for i in range(n)]  # share of tokens with an ITL >= xs[i]
        ax.step(xs, ys, where="post",
                label=f"{d['label']}, {d['workload']} at {d['rate']:g} req/s (p50 {q(0.5):.0f}, p99 {q(0.99):.0f} ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(left=1)
    ax.set_ylim(1e-4, 1.05)
    ax.set_xlabel("inter-token latency (ms)")
    ax.set_ylabel("share of tokens at least this slow")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="comma-separated base URLs; load is split evenly between them")
    p.add_argument("--label", default="system")
    p.add_argument("--model", default="m")
    p.add_argument("--in", dest="in_tokens", type=int, default=4000)
    p.add_argument("--out", dest="out_tokens", type=int, default=200)
    p.add_argument("--rates", default="1,2,4")
    p.add_argument("--duration", type=float, default=30, help="seconds of arrivals per rate")
    p.add_argument("--ttft-s", type=float, default=2.0)
    p.add_argument("--itl-s", type=float, default=0.1)
    p.add_argument("--vocab", type=int, default=30000, help="prompt token ids are drawn below this")
    p.add_argument("--deadline", type=float, default=120, help="a request unanswered by then failed")
    p.add_argument("--api-key")
    p.add_argument("--warmup", type=int, default=4, help="requests sent (and ignored) before the sweep")
    p.add_argument("--stop-below", type=float, default=0.5,
                   help="stop the sweep after a rate whose attainment is below this (past goodput)")
    p.add_argument("--json", type=Path, help="append one line per rate here")
    p.add_argument("--plot", type=Path, help="draw this --json file instead of measuring")
    p.add_argument("--png", type=Path, default=Path("goodput.png"))
    p.add_argument("--slo", action="append", default=[], type=parse_slo,
                   help="with --plot: TTFT_S:STAT:ITL_S (STAT p50|p90|p99|max of each request's ITLs), "
                        "e.g. 2:p90:0.05; repeat for one row of panels each")
    p.add_argument("--itls-out", type=Path, help="write every inter-token latency of each rate here (for a CDF)")
    p.add_argument("--itl-cdf", type=Path, nargs="+", help="draw the ITL tail (1 - CDF) of these --itls-out files to --png")
    args = p.parse_args()
    if args.plot:
        plot(args.plot, args.png, args.slo)
        return 0
    if args.itl_cdf:
        plot_itl_cdf(args.itl_cdf, args.png)
        return 0
    urls = args.url.split(",")
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    workload = f"{args.in_tokens}/{args.out_tokens}"
    asyncio.run(sweep_point(urls, args.model, args.warmup / 2, 2, args.in_tokens, args.out_tokens, args.vocab, 1,
                            args.deadline, headers))
    points = []
    for i, rate in enumerate(float(x) for x in args.rates.split(",")):
        t0 = time.time()
        results = asyncio.run(sweep_point(urls, args.model, rate, args.duration, args.in_tokens, args.out_tokens,
                                          args.vocab, 1000 + i, args.deadline, headers))
        point = {"label": args.label, "workload": workload, "rate": rate, "duration_s": args.duration,
                 "ttft_target_s": args.ttft_s, "itl_target_s": args.itl_s, "wall_s": round(time.time() - t0, 1),
                 **summarize(results, args.ttft_s, args.itl_s)}
        points.append(point)
        print(json.dumps(point), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(point) + "\n")
        if args.itls_out:
            args.itls_out.mkdir(parents=True, exist_ok=True)
            (args.itls_out / f"itls-{args.label}-{args.in_tokens}-{rate:g}.json").write_text(json.dumps(
                {"label": args.label, "workload": workload, "rate": rate,
                 "itls": [round(x, 5) for r in results if r.ok for x in r.itls]}))
        if point["attainment"] < args.stop_below:
            break
    print(f"goodput {args.label} {workload}: {goodput_text(points)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
