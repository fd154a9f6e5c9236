"""What the front door itself costs, against vLLM's example PD proxy, with a fake backend.

Three processes: a fake engine (answers a completion at once, streamed or not;
it also stands in for prefill-worker), a proxy under test, and this load
generator. Proxies: ``disagg`` (our FrontDoor, routed to the fake prefill and
decode) and ``toy`` (a faithful rewrite of vLLM's example PD proxy,
``toy_proxy_server.py``: FastAPI + one httpx client, prefill with
``max_tokens=1``, then decode, streamed through). ``direct`` is the fake engine without a proxy: the added
latency of a proxy is its latency minus direct's, measured in the same run: under
saturation (--clients closed-loop clients: there latency is mostly the queue for
the CPU) and with one client (a request alone: the proxy's own time, two engine
calls included). Under saturation each proxy's own CPU time per request is measured
too (its process's user + system time over the requests served): on two cores shared
by all three processes requests/s swing with the machine, CPU per request much less.

  python -m benchmarks.frontdoor_overhead --clients 16 --duration 10 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ENGINE_PORT, PROXY_PORT = 17001, 17002  # below the ephemeral range (32768+)
ANSWER = {"id": "x", "object": "text_completion", "model": "m",
          "choices": [{"index": 0, "text": " hello", "finish_reason": "length"}],
          "usage": {"prompt_tokens": 300, "completion_tokens": 16, "total_tokens": 316,
                    "prompt_tokens_details": {"cached_tokens": 256}}}
STREAM_EVENTS = 16


def fake_engine() -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def completions(request: Request) -> Response:
        body = json.loads(await request.body())
        if not body.get("stream"):
            return JSONResponse(ANSWER, headers={"x-disagg-kv-expected-tokens": "256",
                                                 "x-disagg-kv-stored-tokens": "256"})

        async def events() -> Any:
            for i in range(STREAM_EVENTS):
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f' t{i}'}]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': ANSWER['usage']})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=ENGINE_PORT, log_level="warning", access_log=False)


def disagg_proxy() -> None:
    from prometheus_client import CollectorRegistry

    from daemons.edge.door_settings import FrontDoorSettings
    from daemons.edge.frontdoor import FrontDoor
    from daemons.edge.upstream import Upstream
    from daemons.metrics import FrontDoorMetrics
    from daemons.routing.prefill_router import PrefillChoice, PrefillRouter
    from daemons.runtime.httpserver import EmbeddedServer
    from daemons.runtime.peers import Peers

    class FixedRouter(PrefillRouter):
        def choose(self) -> PrefillChoice:
            return PrefillChoice(url=f"http://127.0.0.1:{ENGINE_PORT}")

    async def serve() -> int:  # as decode-worker serves it: an EmbeddedServer on asyncio's loop
        metrics = FrontDoorMetrics(CollectorRegistry())
        router = FixedRouter([], Peers(Path("/tmp"), 5, expect_digest=None), metrics)
        settings = FrontDoorSettings(engine_url=f"http://127.0.0.1:{ENGINE_PORT}", disaggregate_min_tokens=0,
                                     max_concurrent_requests=64, queue_timeout_s=30)
        door = FrontDoor(settings, client=Upstream(), metrics=metrics, router=router,
                         health=lambda: ("ready", True, ""))
        server = EmbeddedServer(door.app(), "127.0.0.1", PROXY_PORT, name="front door")
        await server.start()
        await asyncio.Event().wait()  # until the benchmark terminates this process
        return 0

    asyncio.run(serve())


def toy_proxy() -> None:
    """vLLM's toy PD proxy, rewritten faithfully: FastAPI, one httpx client, prefill then decode."""
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    client = httpx.AsyncClient(timeout=None, base_url=f"http://127.0.0.1:{ENGINE_PORT}")

    async def stream_decode(body: dict[str, Any]) -> Any:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            async for chunk in resp.aiter_bytes():
                yield chunk

    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        prefill = dict(body, max_tokens=1, stream=False)
        prefill.pop("stream_options", None)
        (await client.post("/v1/completions", json=prefill)).raise_for_status()
        return StreamingResponse(stream_decode(body), media_type="application/json")

    # Real classes, not this module's postponed (string) annotations: FastAPI injects by type.
    completions.__annotations__ = {"request": Request, "return": StreamingResponse}
    app.post("/v1/completions")(completions)

    uvicorn.run(app, host="127.0.0.1", port=PROXY_PORT, log_level="warning", access_log=False)


async def load(port: int, clients: int, duration_s: float, stream: bool) -> list[float]:
    body = {"model": "m", "prompt": "x " * 300, "max_tokens": 16, "stream": stream}
    latencies: list[float] = []
    deadline = time.monotonic() + duration_s
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        async def one_client() -> None:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                resp = await client.post("/v1/completions", json=body)
                resp.raise_for_status()
                latencies.append(time.monotonic() - t0)
        await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}, timeout=2, trust_env=False)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"nothing answers on port {port}")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def measure(port: int, args: argparse.Namespace, stream: bool, pid: int | None = None) -> dict[str, float]:
    """Saturated (--clients at once: requests/s and latency; with ``pid``, that process's CPU time per request)
    and alone (one client: the latency a request sees when the CPU is not the queue)."""
    cpu0 = cpu_s(pid) if pid is not None else 0.0
    lat = asyncio.run(load(port, args.clients, args.duration, stream))
    cpu_ms = 1000 * (cpu_s(pid) - cpu0) / max(1, len(lat)) if pid is not None else None
    lat.sort()
    solo = asyncio.run(load(port, 1, args.solo_duration, stream))
    solo.sort()
    return {"rps": round(len(lat) / args.duration, 1), "p50_ms": round(statistics.median(lat) * 1000, 2),
            "p99_ms": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 2),
            "solo_p50_ms": round(statistics.median(solo) * 1000, 3),
            "solo_p99_ms": round(solo[int(0.99 * (len(solo) - 1))] * 1000, 3),
            **({"cpu_ms_per_request": round(cpu_ms, 3)} if cpu_ms is not None else {})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=15)
    p.add_argument("--solo-duration", type=float, default=5, help="seconds of the one-client latency run")
    p.add_argument("--repeat", type=int, default=1, help="runs of every measurement, one after the other: this "
                   "machine's own speed drifts between runs (direct's requests/s by up to 2x), so compare within a run")
    args = p.parse_args()
    ctx = multiprocessing.get_context("spawn")
    engine = ctx.Process(target=fake_engine, daemon=True)
    engine.start()
    wait_port(ENGINE_PORT)
    ratios: dict[str, list[float]] = {"non-stream": [], "stream": []}
    cpu_ratios: dict[str, list[float]] = {"non-stream": [], "stream": []}
    try:
        for run in range(1, args.repeat + 1):
            for stream in (False, True):
                mode = "stream" if stream else "non-stream"
                result: dict[str, dict[str, float]] = {"direct": measure(ENGINE_PORT, args, stream)}
                for name, target in (("disagg", disagg_proxy), ("toy", toy_proxy)):
                    proxy = ctx.Process(target=target, daemon=True)
                    proxy.start()
                    try:
                        wait_port(PROXY_PORT)
                        result[name] = measure(PROXY_PORT, args, stream, proxy.pid)
                    finally:
                        proxy.terminate()
                        proxy.join(10)
                direct = result["direct"]
                for name in ("disagg", "toy"):
                    r = result[name]
                    r["added_p50_ms"] = round(r["p50_ms"] - direct["p50_ms"], 2)
                    r["solo_added_p50_ms"] = round(r["solo_p50_ms"] - direct["solo_p50_ms"], 3)
                    r["solo_added_p99_ms"] = round(r["solo_p99_ms"] - direct["solo_p99_ms"], 3)
                ratio = round(result["disagg"]["rps"] / result["toy"]["rps"], 2)
                ratios[mode].append(ratio)
                result["ratio rps disagg/toy"] = ratio  # type: ignore[assignment]
                cpu_ratio = round(result["toy"]["cpu_ms_per_request"] / result["disagg"]["cpu_ms_per_request"], 2)
                cpu_ratios[mode].append(cpu_ratio)
                result["ratio cpu per request toy/disagg"] = cpu_ratio  # type: ignore[assignment]
                print(f"run {run}", mode, json.dumps(result), flush=True)
        for mode, rs in ratios.items():
            print(f"{mode}: requests/s disagg/toy per run {rs}, median {statistics.median(rs):.2f}, "
                  f"lowest {min(rs):.2f}; CPU time per request toy/disagg per run {cpu_ratios[mode]}, "
                  f"median {statistics.median(cpu_ratios[mode]):.2f}, lowest {min(cpu_ratios[mode]):.2f}", flush=True)
    finally:
        engine.terminate()
        engine.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
