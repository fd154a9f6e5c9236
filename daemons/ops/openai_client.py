"""One client for the OpenAI-compatible API, the way disagg's own tools call it (``disaggctl demo``, the
benchmarks, the load and fault harness): a completion, streamed or not, with what the front door said of it.

Streams are split into events the way SSE says (a blank line, CR/LF only), never with
``str.splitlines``/``httpx``'s ``iter_lines``, which also split on U+2028 and friends that a model may
generate inside a JSON string.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from daemons.edge import timing
from daemons.edge.sse_relay import has_token
from daemons.kv.crosscheck import CHECK_HEADER


@dataclass
class Completion:
    """What one request got: status, the front door's headers, token times, text and usage."""

    status: int = 0
    path: str = ""  # x-disagg-path ("" from a plain engine)
    reason: str = ""  # x-disagg-fallback-reason or x-disagg-recompute-reason
    retry_after: float | None = None
    t0: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each event that carried tokens
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    done: bool = False  # a stream ended with [DONE] (a non-streamed answer: parsed)
    error: str = ""  # an error event, a body that is not JSON, a stream cut short
    body: bytes = b""  # a non-200 answer's body
    kv_check: str = ""  # x-disagg-kv-check's verdict (match, near_tie, mismatch; "" when not checked)
    server_timing: dict[str, float | str] = field(default_factory=dict)  # stage -> ms (Server-Timing)
    headers_at: float | None = None  # perf_counter() when the response's headers arrived

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.t0 if self.token_times else float("nan")

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens") or 0)

    @property
    def cached_tokens(self) -> int:
        return int((self.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def completion_body(model: str, prompt: str | list[int], max_tokens: int, *, stream: bool = True,
                    **extra: Any) -> dict[str, Any]:
    """A /v1/completions body (greedy unless ``extra`` says otherwise); streams ask for usage."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _events(buffer: str) -> tuple[list[str], str]:
    buffer = buffer.replace("\r\n", "\n").replace("\r", "\n")
    *events, rest = buffer.split("\n\n")
    return events, rest


def sse_events(chunks: Iterable[str]) -> Iterator[str]:
    """Whole SSE events from text chunks."""
    buffer = ""
    for chunk in chunks:
        events, buffer = _events(buffer + chunk)
        yield from events
    if buffer.strip():
        yield buffer


async def asse_events(chunks: AsyncIterable[str]) -> Any:
    """Whole SSE events from text chunks (async)."""
    buffer = ""
    async for chunk in chunks:
        events, buffer = _events(buffer + chunk)
        for event in events:
            yield event
    if buffer.strip():
        yield buffer


def _headers(resp: httpx.Response, out: Completion) -> None:
    out.headers_at = time.perf_counter()
    out.status = resp.status_code
    out.path = resp.headers.get("x-disagg-path", "")
    out.reason = resp.headers.get("x-disagg-fallback-reason") or resp.headers.get("x-disagg-recompute-reason", "")
    out.kv_check = resp.headers.get(CHECK_HEADER, "").split(";", 1)[0]
    out.server_timing = timing.parse(resp.headers.get(timing.HEADER, ""))
    try:
        out.retry_after = float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        pass


def _event(event: str, out: Completion) -> None:
    for line in event.split("\n"):
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            out.done = True
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            out.error = f"event is not JSON: {data[:80]!r}"
            continue
        if "error" in obj:
            out.error = str(obj["error"])[:200]
        if has_token(obj):
            out.token_times.append(time.perf_counter())
            for choice in obj.get("choices") or ():
                out.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        if obj.get("usage"):
            out.usage = obj["usage"]


def _answer(resp: httpx.Response, out: Completion) -> None:
    if resp.status_code != 200:
        out.body = resp.content
        return
    try:
        obj = resp.json()
    except ValueError:
        out.error = "answer is not JSON"
        return
    out.token_times.append(time.perf_counter())
    out.usage = obj.get("usage") or {}
    out.text = "".join(c.get("text") or (c.get("message") or {}).get("content") or "" for c in obj.get("choices") or ())
    out.done = True


def _finish(out: Completion, streamed: bool) -> Completion:
    if streamed and out.status == 200 and not out.done and not out.error:
        out.error = "stream ended without [DONE]"
    return out


def complete(client: httpx.Client, url: str, body: dict[str, Any], *, headers: dict[str, str] | None = None,
             route: str = "/v1/completions") -> Completion:
    """One request, streamed or not as ``body`` says; HTTP errors raise (httpx.HTTPError)."""
    out = Completion()
    if not body.get("stream"):
        resp = client.post(f"{url}{route}", json=body, headers=headers)
        _headers(resp, out)
        _answer(resp, out)
        return out
    with client.stream("POST", f"{url}{route}", json=body, headers=headers) as resp:
        _headers(resp, out)
        if resp.status_code != 200:
            out.body = resp.read()
            return out
        for event in sse_events(resp.iter_text()):
            _event(event, out)
    return _finish(out, True)


async def acomplete(client: httpx.AsyncClient, url: str, body: dict[str, Any], *,
                    headers: dict[str, str] | None = None, route: str = "/v1/completions") -> Completion:
    """:func:`complete` on an async client."""
    out = Completion()
    if not body.get("stream"):
        resp = await client.post(f"{url}{route}", json=body, headers=headers)
        _headers(resp, out)
        _answer(resp, out)
        return out
    async with client.stream("POST", f"{url}{route}", json=body, headers=headers) as resp:
        _headers(resp, out)
        if resp.status_code != 200:
            out.body = await resp.aread()
            return out
        async for event in asse_events(resp.aiter_text()):
            _event(event, out)
    return _finish(out, True)
