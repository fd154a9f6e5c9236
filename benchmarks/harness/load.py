"""Bounded load through the front door, one record per request, for the fault matrix and GPU checks.

N clients loop unique prompts (random token ids from the model's vocabulary, so
any tokenizer works and no prompt is a cache hit from an earlier one) through
``/v1/completions``, streaming or not, each request with a client-side
deadline: a request that passes it is *hung*, the one outcome that is never
acceptable. Every loop stops by itself (``duration_s``).

  python -m benchmarks.harness.load --url http://127.0.0.1:8000 --model tiny-llama \\
      --model-path var/models/tiny-llama --clients 4 --duration 60 --tokens 1800
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from daemons.kv.canary import vocabulary
from daemons.ops.openai_client import acomplete, completion_body


@dataclass
class Record:
    client: int
    start: float  # seconds since the load began
    seconds: float
    status: int  # HTTP status; 0 for no response
    path: str = ""  # x-disagg-path
    reason: str = ""  # fallback or recompute reason
    prompt_tokens: int = 0
    cached_tokens: int = 0
    stream: bool = False
    hung: bool = False
    error: str = ""
    retry_after: float | None = None  # the server's Retry-After, when it sent one
    kv_check: str = ""  # x-disagg-kv-check (greedy requests that took the KV path): match, near_tie, mismatch
    timing_ms: dict[str, float | str] = field(default_factory=dict)  # Server-Timing
    client_ttft_ms: float | None = None  # as this client measured it (headers: streams; the answer: not streamed)

    @property
    def timing_problem(self) -> str:
        """Why this answer's Server-Timing does not add up ("" when it does): present, each stage before the next,
        its ttft no more than the client measured."""
        if self.status != 200:
            return ""
        t = self.timing_ms
        if "ttft" not in t or "path" not in t:
            return f"Server-Timing incomplete: {t}"
        parts = sum(float(t.get(s, 0.0)) for s in ("read", "queue", "prefill", "decode"))
        ttft = float(t["ttft"])
        if not parts <= ttft + 0.2:  # the header rounds each stage to 0.1 ms
            return f"stages sum to {parts:.1f} ms > ttft {ttft:.1f} ms"
        if self.client_ttft_ms is not None and ttft > self.client_ttft_ms + 0.2:
            return f"ttft {ttft:.1f} ms > the client's {self.client_ttft_ms:.1f} ms"
        return ""

    @property
    def end(self) -> float:
        return self.start + self.seconds

    @property
    def outcome(self) -> str:
        """succeeded / failed_cleanly (an error status with a body) / refused (no connection: nothing was
        accepted, the client may retry) / lost (accepted, then no answer) / hung (past the deadline)."""
        if self.hung:
            return "hung"
        if self.status == 200 and not self.error:
            return "succeeded"
        if self.status >= 400:
            return "failed_cleanly"
        if self.error.startswith("ConnectError"):
            return "refused"
        return "lost"


@dataclass
class Load:
    url: str
    model: str
    vocab: list[int]
    clients: int = 4
    duration_s: float = 60.0
    prompt_tokens: int = 1800
    max_tokens: int = 16
    deadline_s: float = 120.0
    stream_every: int = 2  # every n-th request of a client streams (0: never)
    records: list[Record] = field(default_factory=list)
    stop: asyncio.Event | None = None  # set it to end the load early (in-flight requests finish)
    think_s: float = 0.0  # a client's pause between two requests

    async def run(self) -> list[Record]:
        t0 = self.t0 = time.monotonic()
        # Idle connections are dropped after 2 s, well before the front door's keep-alive timeout (uvicorn's 5 s,
        # httpx's default expiry too): a request sent on a connection the server was closing just then ended
        # as "lost" (ReadError, no status) in a fault-matrix run, with no fault involved.
        async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(self.deadline_s, connect=5.0),
                                     limits=httpx.Limits(max_connections=self.clients * 2,
                                                         keepalive_expiry=2.0)) as client:
            await asyncio.gather(*(self._client(client, i, t0) for i in range(self.clients)))
        return self.records

    async def _client(self, client: httpx.AsyncClient, i: int, t0: float) -> None:
        rng = random.Random(f"{i}-{time.time_ns()}")
        n = 0
        while time.monotonic() - t0 < self.duration_s and not (self.stop is not None and self.stop.is_set()):
            n += 1
            stream = bool(self.stream_every) and n % self.stream_every == 0
            prompt = [rng.choice(self.vocab) for _ in range(self.prompt_tokens)]
            start = time.monotonic()
            rec = Record(i, start - t0, 0.0, 0, stream=stream)
            try:
                await asyncio.wait_for(self._one(client, prompt, stream, rec), self.deadline_s)
            except TimeoutError:
                rec.hung = True
                rec.error = f"no answer within {self.deadline_s:.0f}s"
            except Exception as exc:  # noqa: BLE001 - every way a request can end is a record
                rec.error = f"{type(exc).__name__}: {exc}"[:200]
            rec.seconds = time.monotonic() - start
            self.records.append(rec)
            if rec.status != 200:
                # A refused client backs off as real ones do: as long as Retry-After says, else a little.
                await asyncio.sleep(rec.retry_after if rec.retry_after is not None else 0.5)
            await asyncio.sleep(self.think_s)

    async def _one(self, client: httpx.AsyncClient, prompt: list[int], stream: bool, rec: Record) -> None:
        body = completion_body(self.model, prompt, self.max_tokens, stream=stream, ignore_eos=True)
        got = await acomplete(client, self.url, body)
        rec.status, rec.retry_after, rec.path, rec.reason = got.status, got.retry_after, got.path, got.reason
        rec.kv_check, rec.timing_ms = got.kv_check, got.server_timing
        if got.headers_at is not None:
            rec.client_ttft_ms = (got.headers_at - got.t0) * 1000
        if got.status == 200:
            rec.error = got.error
            rec.prompt_tokens, rec.cached_tokens = got.prompt_tokens, got.cached_tokens


def summary(records: list[Record]) -> dict[str, object]:
    outcomes = Counter(r.outcome for r in records)
    paths = Counter(r.path or "-" for r in records if r.outcome == "succeeded")
    disagg = [r for r in records if r.outcome == "succeeded" and r.path == "disaggregated"]
    return {
        "sent": len(records),
        **{k: outcomes.get(k, 0) for k in ("succeeded", "failed_cleanly", "refused", "lost", "hung")},
        "paths": dict(paths),
        "disaggregated_full_chunks": sum(1 for r in disagg if r.cached_tokens >= r.prompt_tokens // 256 * 256),
        "disaggregated": len(disagg),
        "kv_checked": sum(1 for r in records if r.kv_check),
        "kv_mismatched": sum(1 for r in records if r.kv_check == "mismatch"),
        "timing_problems": sum(1 for r in records if r.timing_problem),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--model-path", default="var/models/tiny-llama")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--tokens", type=int, default=1800)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline", type=float, default=120)
    p.add_argument("--stream-every", type=int, default=2)
    p.add_argument("--out", help="write every record here (JSON)")
    a = p.parse_args()
    load = Load(a.url, a.model, vocabulary(Path(a.model_path)), a.clients, a.duration, a.tokens, a.max_tokens,
                a.deadline, a.stream_every)
    records = asyncio.run(load.run())
    if a.out:
        Path(a.out).write_text(json.dumps([asdict(r) for r in records]))
    print(json.dumps(summary(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
