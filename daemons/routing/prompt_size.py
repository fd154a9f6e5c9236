"""How long a request's prompt is, in tokens, before any engine has seen it.

The front door skips the prefill call for short prompts (below
``decode_worker.disaggregate_min_tokens``): loading their KV costs the decode
engine more than computing them, and the prefill round trip adds to TTFT. It
must decide before any engine has tokenized the prompt, and asking an engine
(``/tokenize``) would put a round trip on every request's critical path.

So it estimates: prompt bytes divided by the bytes per token this model has
shown on recent requests (the engines report ``usage.prompt_tokens`` with every
answer; :meth:`PromptSizer.learn` keeps the median of the last few hundred
ratios, per route, because a chat template adds tokens a completion does not).
Prompts given as token ids are counted exactly. An estimate near the threshold
may pick the other path; near the threshold both paths cost about the same,
which is what makes it the threshold.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

# Until a route has seen this many answers, assume this many bytes per token (English text
# with a BPE tokenizer is ~4; assuming less errs toward calling prompts long: today's path).
DEFAULT_BYTES_PER_TOKEN = 3.0
MIN_SAMPLES = 8
WINDOW = 256


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of the text in a prompt or message content (strings, or OpenAI content parts)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    if isinstance(value, list):
        return sum(_text_bytes(part.get("text") if isinstance(part, dict) else part) for part in value)
    return 0


def _token_ids(prompt: Any) -> list[list[Any]] | None:
    """The prompt as token ids (one list per prompt), or None when it is text."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return prompt
    return None


class PromptSizer:
    """Estimates prompt tokens from bytes, calibrated by the engines' own token counts."""

    def __init__(self, default_bytes_per_token: float = DEFAULT_BYTES_PER_TOKEN) -> None:
        self.default = default_bytes_per_token
        self._ratios: dict[str, deque[float]] = {}

    def bytes_per_token(self, route: str) -> float:
        ratios = self._ratios.get(route)
        if ratios is None or len(ratios) < MIN_SAMPLES:
            return self.default
        return statistics.median(ratios)

    @staticmethod
    def prompt_bytes(body: dict[str, Any]) -> int:
        """Text bytes of the (longest) prompt: completions' ``prompt`` or chat ``messages``."""
        if "messages" in body:
            messages = body["messages"] if isinstance(body["messages"], list) else []
            return sum(_text_bytes(m.get("content")) for m in messages if isinstance(m, dict))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and _token_ids(prompt) is None:
            return max((_text_bytes(p) for p in prompt), default=0)  # several text prompts
        return _text_bytes(prompt)

    def estimate(self, route: str, body: dict[str, Any]) -> int:
        """Tokens of the request's longest prompt: exact for token ids, else estimated from its bytes."""
        ids = _token_ids(body.get("prompt")) if "messages" not in body else None
        if ids is not None:
            return max(len(p) for p in ids)
        return round(self.prompt_bytes(body) / self.bytes_per_token(route))

    def learn(self, route: str, body: dict[str, Any], prompt_tokens: Any) -> None:
        """Remember this request's bytes per token (one text prompt, as the engine counted it)."""
        if not isinstance(prompt_tokens, int) or prompt_tokens <= 0:
            return
        prompt = body.get("prompt")
        if "messages" not in body and (not isinstance(prompt, str)):
            return  # token ids (exact anyway) or several prompts (usage is their sum)
        size = self.prompt_bytes(body)
        if size > 0:
            self._ratios.setdefault(route, deque(maxlen=WINDOW)).append(size / prompt_tokens)
