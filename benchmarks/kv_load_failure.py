"""Is vLLM's ``kv_load_failure_policy: recompute`` right with our pins? Make KV loads fail mid-request and compare
the greedy answers with the engines' own.

Against a running stack, ``--rounds`` rounds: ``--prompts`` unique prompts are prefilled through prefill-worker's
API (their KV lands in LMCache), then sent at once to the decode engine itself (greedy, ``--max-tokens``), and
``--delay-s`` later LMCache's own process is stopped (SIGSTOP, seen to take effect) for ``--stop-s`` (below
``lmcache.unresponsive_restart_s``: a stall, not a restart), so loads are in flight when it stops. A load pending on a
stopped LMCache fails once the engine's connector misses its pings; vLLM then recomputes (``recompute``: it logs
"Recovered from KV load failure") or fails the request (``fail``). Long prompts widen the window (a GPU moves a
7,000-token prompt's KV in tens of milliseconds). Afterwards every prompt is answered again by the prefill engine
alone (prefill-worker's ``/whole`` route: it computes the whole prompt, no KV moves) and the texts are compared, by
how the decode engine got the prompt: every full chunk from LMCache (the control group: what two engines'
arithmetic alone makes differ) or fewer (among them, every load that failed). The decode engine's log says how many
loads failed.

  python -m benchmarks.kv_load_failure --config etc/disagg.yaml --tokens 600 --prompts 16 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness.faults import Stack, hold, seen_to_take_effect
from daemons.deployment import Deployment
from daemons.kv.canary import vocabulary
from daemons.ops.ctl import wait_ready
from daemons.ops.openai_client import acomplete, completion_body

FAILURE_LINES = ("Recovered from KV load failure", "due to KV load failure")


def first_difference(a: str, b: str) -> int | None:
    """The first character where ``a`` and ``b`` differ (None: equal)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def ask_all(url: str, model: str, prompts: list[list[int]], max_tokens: int, clients: int,
                  route: str = "/v1/completions") -> list[dict[str, Any]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    out: list[dict[str, Any]] = [{} for _ in prompts]

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            got = await acomplete(http, url, completion_body(model, prompts[i], max_tokens, stream=False, ignore_eos=True),
                                  route=route)
            out[i] = {"status": got.status, "text": got.text, "path": got.path, "reason": got.reason,
                      "cached": got.cached_tokens, "prompt_tokens": got.prompt_tokens, "error": got.error}

    async with httpx.AsyncClient(trust_env=False, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return out


async def stall_lmcache(stack: Stack, delay_s: float, stop_s: float) -> str:
    await asyncio.sleep(delay_s)
    pid = stack.pid_of("LMCache server process")()
    os.kill(pid, signal.SIGSTOP)
    await seen_to_take_effect(pid, signal.SIGSTOP)
    return await hold(pid, stop_s)


def failures_logged(path: Path, offset: int) -> list[str]:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [line.strip()[:300] for line in text.splitlines() if any(m in line for m in FAILURE_LINES)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--tokens", type=int, default=600)
    p.add_argument("--prompts", type=int, default=16, help="per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--delay-s", type=float, default=0.02, help="from sending a round to stopping LMCache")
    p.add_argument("--stop-s", type=float, default=10.0)
    p.add_argument("--ready-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the whole result here (JSON)")
    a = p.parse_args()
    stack = Stack(a.config)
    cfg = stack.config
    rng = random.Random(a.seed or time.time_ns())
    vocab = vocabulary(cfg.model.path)
    engine_log = Path(cfg.log_dir) / "decode-worker-engine.log"
    offset = engine_log.stat().st_size if engine_log.exists() else 0
    prefill = f"http://127.0.0.1:{cfg.prefill_worker.port}"
    decode = f"http://127.0.0.1:{cfg.decode_worker.engine_port}"
    expected = (a.tokens - 1) // cfg.lmcache.chunk_size * cfg.lmcache.chunk_size
    prompts: list[list[int]] = []
    answers: list[dict[str, Any]] = []
    stalls = []
    t0 = time.monotonic()
    for _ in range(a.rounds):
        if not wait_ready(Deployment(cfg), a.ready_timeout_s, quiet=True):
            print(f"stack not ready within {a.ready_timeout_s:.0f}s: rounds stopped", flush=True)
            break
        batch = [[rng.choice(vocab) for _ in range(a.tokens)] for _ in range(a.prompts)]
        asyncio.run(ask_all(prefill, cfg.model.name, batch, 1, 4))  # their KV into LMCache

        async def one_round(batch: list[list[int]] = batch) -> tuple[list[dict[str, Any]], str]:
            stall = asyncio.create_task(stall_lmcache(stack, a.delay_s, a.stop_s))
            got = await ask_all(decode, cfg.model.name, batch, a.max_tokens, len(batch))
            return got, await stall

        got, stalled = asyncio.run(one_round())
        prompts += batch
        answers += got
        stalls.append(stalled)
    logged = failures_logged(engine_log, offset)
    wait_ready(Deployment(cfg), a.ready_timeout_s, quiet=True)
    references = asyncio.run(ask_all(prefill, cfg.model.name, prompts, a.max_tokens, 2, "/whole/v1/completions"))
    groups: dict[str, Counter[str]] = {}
    divergences: dict[str, list[int]] = {}
    for got_one, ref in zip(answers, references, strict=True):
        if got_one.get("status") != 200:
            group = f"HTTP {got_one.get('status')}"
        elif int(got_one.get("cached") or 0) >= expected:
            group = "all chunks loaded"
        else:
            group = "fewer chunks loaded"
        verdict = "no reference" if ref.get("status") != 200 else (
            "same" if got_one.get("text") == ref.get("text") else "differs")
        groups.setdefault(group, Counter())[verdict] += 1
        at = first_difference(str(got_one.get("text")), str(ref.get("text"))) if verdict == "differs" else None
        if at is not None:
            divergences.setdefault(group, []).append(at)
    result = {"prompts": len(prompts), "tokens": a.tokens, "max_tokens": a.max_tokens, "delay_s": a.delay_s,
              "stalls": stalls, "load_failures_logged": len(logged), "failure_lines": logged[:10],
              "groups": {g: dict(c) for g, c in groups.items()}, "first_difference_at": divergences,
              "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps({**result, "answers": answers, "references": references}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
