"""The KV-path canary: one small synthetic prompt through the whole path.

prefill API -> prefill engine computes it and its KV is stored -> LMCache holds
it -> decode engine loads it -> one token. Success means the decode engine
reported the canary's full chunk as ``cached_tokens``. A failure names the hop
that broke:

- ``prefill``: the prefill API/engine did not answer (in time, or at all);
- ``lmcache_store``: prefill answered but LMCache holds none of its KV;
- ``decode_engine``: the decode engine did not answer (in time, or at all);
- ``decode_load``: LMCache held the KV but the decode engine did not load it;
- ``p2p_fetch`` (several hosts; decided by decode-worker): as ``decode_load``, with the prefill-worker on
  another host and this host's LMCache holding no P2P link to that host's;
- ``kv_mismatch``: the decode engine loaded the chunk but chose another first token than the prefill
  engine did (the canary is greedy: :mod:`daemons.kv.crosscheck`): the KV it loaded means something else.

The prompt is token ids drawn at random from the model's vocabulary: one full
LMCache chunk plus a few tokens, never the same twice (so an earlier canary's
KV can never make a broken path look healthy), and cheap.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from daemons.edge.upstream import Answer, Upstream, UpstreamError, UpstreamTimeout
from daemons.kv import crosscheck

HOPS = {
    "prefill": "prefill-worker did not answer with the prompt computed",
    "lmcache_store": "LMCache has no chunks for it",
    "decode_engine": "decode engine did not answer with a token",
    "decode_load": "decode engine did not load the chunks",
    "p2p_fetch": "the chunks did not travel from the prefill host's LMCache to this host's",
    "kv_mismatch": "decode engine loaded the chunks but chose another first token than the prefill engine",
}


@dataclass(frozen=True)
class CanaryResult:
    ok: bool
    hop: str = ""  # one of HOPS when not ok
    detail: str = ""
    expected: int = 0  # full-chunk tokens of the canary prompt
    stored: int | None = None  # of those, in LMCache when prefill answered
    cached: int | None = None  # of those, loaded by the decode engine
    seconds: float = 0.0

    def describe(self) -> str:
        if self.ok:
            return f"KV path works ({self.cached} of {self.expected} canary tokens from LMCache, {self.seconds:.2f}s)"
        return f"KV path broken at {self.hop}: {HOPS[self.hop]} ({self.detail})"


def vocabulary(model_path: Path) -> list[int]:
    """Token ids a canary may use: the tokenizer's ordinary vocabulary (no added/special tokens)."""
    try:
        tok = json.loads((Path(model_path) / "tokenizer.json").read_text())
        special = {int(t["id"]) for t in tok.get("added_tokens") or ()}
        ids = sorted(int(i) for i in tok["model"]["vocab"].values() if int(i) not in special)
        if len(ids) >= 16:
            return ids
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    config = json.loads((Path(model_path) / "config.json").read_text())
    return list(range(100, int(config["vocab_size"]) - 100))


def canary_prompt(rng: random.Random, vocab: list[int], chunk_size: int) -> list[int]:
    """One full chunk plus a short tail of random token ids: cheap, and new every time."""
    return [rng.choice(vocab) for _ in range(chunk_size + 8)]


class PathCanary:
    def __init__(self, *, client: httpx.AsyncClient, model: str, vocab: list[int], chunk_size: int,
                 decode_url: str, timeout_s: float, crosscheck_tolerance: float | None = None,
                 engine: Upstream | None = None) -> None:
        self.client = client
        # The decode engine's call, when given: made as an engine call (run on, not aborted, past the canary's
        # deadline: an abort while the engine loads the canary's KV from LMCache kills it; edge/upstream.py).
        self.engine = engine
        self.model = model
        self.vocab = vocab
        self.chunk_size = chunk_size
        self.decode_url = decode_url
        self.timeout_s = timeout_s
        self.crosscheck_tolerance = crosscheck_tolerance  # None: no cross-check
        self._rng = random.Random()

    def prompt(self) -> list[int]:
        return canary_prompt(self._rng, self.vocab, self.chunk_size)

    async def run(self, prefill_url: str) -> CanaryResult:
        prompt = self.prompt()
        expected = len(prompt) // self.chunk_size * self.chunk_size
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        headers = {"x-request-id": f"canary-{self._rng.getrandbits(48):012x}"}
        t0 = time.monotonic()

        def fail(hop: str, detail: str, **kw: Any) -> CanaryResult:
            return CanaryResult(False, hop, detail, expected, seconds=time.monotonic() - t0, **kw)

        resp, why = await self._post(f"{prefill_url}/v1/completions", body, headers)
        if resp is None:
            return fail("prefill", why)
        try:
            stored = int(resp.headers["x-disagg-kv-stored-tokens"])
        except (KeyError, ValueError):
            stored = None  # not known (an older prefill-worker, or its lookup failed): the decode side will tell
        if stored is not None and stored < expected:
            return fail("lmcache_store", f"{stored} of {expected} tokens stored", stored=stored)
        first = crosscheck.parse_first_token_header(resp.headers.get(crosscheck.HEADER))
        check = first is not None and self.crosscheck_tolerance is not None
        decode_body = {**body, **crosscheck.decode_fields(body, chat=False)} if check else body
        resp, why = await self._post(f"{self.decode_url}/v1/completions", decode_body, headers, engine=True)
        if resp is None:
            return fail("decode_engine", why, stored=stored)
        answer = _json(resp)
        cached = cached_tokens(answer)
        if cached < expected:
            return fail("decode_load", f"{cached} of {expected} tokens loaded", stored=stored, cached=cached)
        decoded = crosscheck.decode_first_token(answer) if check else None
        if first is not None and decoded is not None and self.crosscheck_tolerance is not None:
            verdict = crosscheck.judge(first, decoded, self.crosscheck_tolerance)
            if not verdict.ok:
                return fail("kv_mismatch", verdict.detail, stored=stored, cached=cached)
        return CanaryResult(True, "", "", expected, stored, cached, time.monotonic() - t0)


    async def _post(self, url: str, body: dict[str, Any], headers: dict[str, str],
                    engine: bool = False) -> tuple[httpx.Response | Answer | None, str]:
        """(the 200 answer, "") or (None, why not) within the canary's deadline; ``engine``: the call goes to the
        decode engine."""
        if engine and self.engine is not None:
            try:
                answer = await self.engine.post(url, body, headers=headers, timeout_s=self.timeout_s, orphan=True)
            except UpstreamTimeout:
                return None, f"no answer in {self.timeout_s:.0f}s"
            except UpstreamError as exc:
                return None, f"engine unreachable: {exc}"
            if answer.status_code != 200:
                return None, f"HTTP {answer.status_code}: {answer.text[:120]}"
            return answer, ""
        try:
            resp = await self.client.post(url, json=body, headers=headers, timeout=self.timeout_s)
        except httpx.TimeoutException:
            return None, f"no answer in {self.timeout_s:.0f}s"
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if resp.status_code != 200:
            return None, f"HTTP {resp.status_code}: {resp.text[:120]}"
        return resp, ""


def _json(resp: httpx.Response | Answer) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def cached_tokens(answer: Any) -> int:
    """``usage.prompt_tokens_details.cached_tokens`` of an engine answer, 0 when absent."""
    try:
        details = answer["usage"].get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)
    except (AttributeError, KeyError, TypeError, ValueError):
        return 0
