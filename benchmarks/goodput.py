"""Goodput: the highest request rate at which >= 90 % of requests meet both latency targets.

Poisson arrivals at each rate of a sweep, every request streamed, its TTFT and
inter-token latencies recorded. A request *attains* when it succeeded, its TTFT
<= --ttft-s and the 90th percentile of its inter-token latencies <= --itl-s.
Prompts are random token ids (exact lengths, no prefix shared between requests).

Several --url values split the load evenly: each gets its own Poisson process
at rate / len(urls) (an exact stand-in for random routing between replicas).

    # our stack (the front door) against two plain engines, one per GPU:
    python benchmarks/goodput.py --url http://127.0.0.1:8000 --label disagg --in 4000 --out 200 \\
        --rates 1,2,3,4,5 --duration 30 --json results.jsonl
    python benchmarks/goodput.py --url http://127.0.0.1:8201,http://127.0.0.1:8202 --label colocated ...
    python benchmarks/goodput.py --plot results.jsonl --png attainment.png

Each line of --json is one (system, workload, rate) point; --plot draws attainment
against rate per system and workload and prints the goodput of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemons.sse_relay import has_token  # noqa: E402  (a token's text can be empty: presence counts)

ATTAIN = 0.9
REQUEST_FIELDS = ("ttft", "itl_p50", "itl_p90", "itl_p99", "itl_max")


@dataclass
class Result:
    ok: bool = False
    ttft: float = float("nan")
    itls: list[float] = field(default_factory=list)
    cached: int = 0
    path: str = ""
    error: str = ""

    def itl_qs(self, qs: tuple[float, ...]) -> list[float]:
        """This request's own inter-token latency quantiles, from one sort (0 when it produced one token)."""
        if not self.itls:
            return [0.0] * len(qs)
        s = sorted(self.itls)
        return [s[int(q * (len(s) - 1))] for q in qs]

    def itl_p90(self) -> float:
        return self.itl_qs((0.9,))[0]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], out_tokens: int,
                      deadline_s: float, headers: dict[str, str]) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": out_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    r = Result()
    t0 = time.perf_counter()
    last = None

    async def run() -> None:
        nonlocal last
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
            r.path = resp.headers.get("x-disagg-path", "")
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}"
                await resp.aread()
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if has_token(obj):
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - t0
                    else:
                        r.itls.append(now - last)
                    last = now
                if obj.get("usage"):
                    details = obj["usage"].get("prompt_tokens_details") or {}
                    r.cached = int(details.get("cached_tokens") or 0)
            r.ok = last is not None

    try:
        await asyncio.wait_for(run(), deadline_s)
    except asyncio.TimeoutError:
        r.error = f"no answer within {deadline_s:.0f}s"
    except (httpx.HTTPError, ValueError) as exc:
        r.error = repr(exc)[:200]
    return r


async def sweep_point(urls: list[str], model: str, rate: float, duration_s: float, in_tokens: int, out_tokens: int,
                      vocab: int, seed: int, deadline_s: float, headers: dict[str, str]) -> list[Result]:
    rng = random.Random(seed)
    # Idle connections dropped after 2 s: below the servers' keep-alive timeout (uvicorn's 5 s), so no request
    # goes out on a connection the server is closing (benchmarks/load.py).
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


def summarize(results: list[Result], ttft_s: float, itl_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    attained = [r for r in ok if r.ttft <= ttft_s and r.itl_p90() <= itl_s]

    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        s = sorted(values)
        return round(s[int(q * (len(s) - 1))], 4)

    ttfts = [r.ttft for r in ok]
    itl_p90s = [r.itl_p90() for r in ok]
    all_itls = [x for r in ok for x in r.itls]
    paths: dict[str, int] = {}
    for r in results:
        paths[r.path or "-"] = paths.get(r.path or "-", 0) + 1
    errors = [r.error for r in results if r.error]
    return {
        "sent": len(results), "ok": len(ok), "attainment": round(len(attained) / len(results), 3) if results else 0,
        "ttft_p50": pct(ttfts, 0.5), "ttft_p90": pct(ttfts, 0.9), "ttft_p99": pct(ttfts, 0.99),
        "itl_p50": pct(all_itls, 0.5), "itl_p99": pct(all_itls, 0.99),
        "request_itl_p90_median": round(statistics.median(itl_p90s), 4) if itl_p90s else float("nan"),
        "met_ttft": sum(1 for r in ok if r.ttft <= ttft_s), "met_itl": sum(1 for r in ok if r.itl_p90() <= itl_s),
        "cached_tokens_median": statistics.median([r.cached for r in ok]) if ok else 0,
        "paths": paths, "errors": errors[:3], "n_errors": len(errors),
        # per request (TTFT s and its own ITL p50, p90, p99, max in s; null when it failed): attainment
        # for other targets, later (--plot --slo)
        "request_fields": list(REQUEST_FIELDS),
        "requests": [[round(r.ttft, 4)] + [round(x, 4) for x in r.itl_qs((0.5, 0.9, 0.99, 1.0))] if r.ok else None
                     for r in results],
    }


def attainment_for(point: dict[str, Any], ttft_s: float, itl_field: str, itl_s: float) -> float:
    """The point's attainment under another SLO, from its per-request numbers (its own when it has none)."""
    fields = point.get("request_fields")
    if not fields or itl_field not in fields:
        if itl_field == "itl_p90" and ttft_s == point["ttft_target_s"] and itl_s == point["itl_target_s"]:
            return point["attainment"]
        raise ValueError(f"this point has no per-request {itl_field} (measured before it was recorded)")
    i = fields.index(itl_field)
    reqs = point["requests"]
    met = sum(1 for r in reqs if r is not None and r[0] <= ttft_s and r[i] <= itl_s)
    return round(met / len(reqs), 3) if reqs else 0.0


def parse_slo(text: str) -> tuple[float, str, float]:
    """'2:p90:0.05' -> (TTFT target s, per-request ITL statistic, ITL target s)."""
    ttft, stat, itl = text.split(":")
    field = f"itl_{stat}"
    if field not in REQUEST_FIELDS:
        raise ValueError(f"ITL statistic must be one of p50, p90, p99, max, not {stat!r}")
    return float(ttft), field, float(itl)


def with_slo(points: list[dict[str, Any]], slo: tuple[float, str, float]) -> list[dict[str, Any]]:
    return [dict(p, attainment=attainment_for(p, *slo)) for p in points]


def by_rate(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(rate, worst attainment measured at that rate), ascending: a rate measured twice counts its worse run."""
    worst: dict[float, float] = {}
    for p in points:
        worst[p["rate"]] = min(worst.get(p["rate"], 1.0), p["attainment"])
    return sorted(worst.items())


def goodput(points: list[dict[str, Any]]) -> float:
    """The highest swept rate whose attainment (and every lower rate's) is >= 90 %."""
    best = 0.0
    for rate, attainment in by_rate(points):
        if attainment < ATTAIN:
            break
        best = rate
    return best


def goodput_text(points: list[dict[str, Any]]) -> str:
    """Goodput as a reader should see it: below the lowest swept rate is not 0, it is unknown below it."""
    g = goodput(points)
    if g == 0 and points:
        return f"< {min(p['rate'] for p in points):g} req/s"
    return f"{g:g} req/s"


def slo_title(slo: tuple[float, str, float]) -> str:
    ttft, field, itl = slo
    return f"TTFT <= {ttft:g} s, ITL {field[4:]} <= {1000 * itl:.0f} ms"


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
    for row, slo in zip(axes, slos):
        for ax, workload in zip(row, workloads):
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
        q = lambda p: xs[int(p * (n - 1))]  # noqa: E731
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
