"""prefill-worker: a vLLM engine as LMCache KV producer, serving prefill requests.

Its API takes the same bodies as OpenAI's /v1/completions and
/v1/chat/completions and always runs them with one output token and no
streaming: computing the prompt pushes its KV into LMCache, where the decode
engine picks it up. Ready when lmcache-server is ready and the engine answers.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .config import Config
from .lifecycle import run_daemon
from .metrics import PrefillMetrics
from .statefile import State
from .worker import EngineDaemon, openai_error

log = logging.getLogger(__name__)


def as_prefill(body: dict[str, object]) -> dict[str, object]:
    """The same request, cut down to computing the prompt: one token, no stream."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n", "best_of", "logprobs")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    return out


class PrefillWorker(EngineDaemon):
    """Run the prefill engine (KV producer) and serve prefill requests."""

    kind = "prefill-worker"
    role = "kv_producer"

    def __init__(self, config: Config, **kw: object) -> None:
        super().__init__(config, **kw)
        self.prefill_metrics = PrefillMetrics(self.registry)

    async def start_up(self) -> None:
        if await self.start_serving(self.app(), "prefill API"):
            self.set_state(State.READY)

    async def check(self) -> bool:
        ok = await self.engine_ok()
        if self.state.serving:
            lm = self.peer("lmcache-server")
            if lm.usable and lm.state == State.READY.value:
                self.set_state(State.READY)
            else:
                self.set_state(State.DEGRADED, f"lmcache-server {lm.state}: {lm.reason}")
        return ok

    def app(self) -> Starlette:
        async def prefill(request: Request) -> Response:
            route = request.url.path
            try:
                body = json.loads(await request.body())
            except ValueError:
                self.prefill_metrics.requests.labels(status="400").inc()
                return openai_error(400, "request body is not valid JSON")
            if not isinstance(body, dict):
                self.prefill_metrics.requests.labels(status="400").inc()
                return openai_error(400, "request body must be a JSON object")
            t0 = time.monotonic()
            self.prefill_metrics.in_flight.inc()
            try:
                resp = await self.http.post(
                    f"{self.engine.base_url}{route}", json=as_prefill(body),
                    timeout=httpx.Timeout(None, connect=5.0),
                    headers={"x-request-id": request.headers.get("x-request-id", "")},
                )
            except httpx.HTTPError as exc:
                self.prefill_metrics.requests.labels(status="503").inc()
                return openai_error(503, f"prefill engine unavailable: {exc!r}", "service_unavailable")
            finally:
                self.prefill_metrics.in_flight.dec()
            elapsed = time.monotonic() - t0
            self.prefill_metrics.requests.labels(status=str(resp.status_code)).inc()
            if resp.status_code == 200:
                self.prefill_metrics.seconds.observe(elapsed)
                try:
                    self.prefill_metrics.tokens.inc(int(resp.json()["usage"]["prompt_tokens"]))
                except (ValueError, KeyError, TypeError):
                    pass
            return Response(resp.content, status_code=resp.status_code, media_type="application/json")

        async def health(_: Request) -> Response:
            return JSONResponse({"state": self.state.value, "reason": self.reason},
                                status_code=200 if self.state.serving else 503)

        return Starlette(routes=[
            Route("/v1/completions", prefill, methods=["POST"]),
            Route("/v1/chat/completions", prefill, methods=["POST"]),
            Route("/health", health),
        ])


def main(argv: list[str] | None = None) -> int:
    return run_daemon(PrefillWorker, argv)


if __name__ == "__main__":
    sys.exit(main())
