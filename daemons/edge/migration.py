"""Request migration: a stream whose engine dies mid-way goes on on another engine, so the client sees one
uninterrupted stream.

The front door asks the engine for token ids (vLLM's ``return_token_ids``: the prompt's in the first chunk,
each chunk's generated ids) and strips them again unless the client asked for them. When the engine's
stream breaks, the request is continued on an engine that can serve it: a ``/v1/completions`` call whose
prompt is the prompt's token ids plus those generated so far, ``max_tokens`` reduced by what was
generated, the same sampling parameters. Its chunks are relayed in the original stream's shape (a chat
stream stays a chat stream) and its usage is told as the client's request would have been counted.
A greedy request's output is the one an uninterrupted run gives; a sampled one goes on with new draws.

What cannot be continued ends as before, with one error event: several choices (``n``/``best_of``),
logprobs, echo, or no token ids seen yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Sampling parameters that carry over to the continuation as they are (chat's and completions' alike).
CARRIED = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "ignore_eos", "skip_special_tokens",
           "spaces_between_special_tokens", "include_stop_str_in_output", "user", "priority")


def can_migrate(body: dict[str, Any]) -> bool:
    """Can a stream of this request be continued elsewhere (one choice, no logprobs, no echo)?"""
    if int(body.get("n") or 1) != 1 or int(body.get("best_of") or 1) != 1:
        return False
    return not (body.get("logprobs") or body.get("top_logprobs") or body.get("echo") or body.get("prompt_logprobs"))


def max_tokens_of(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return int(value) if isinstance(value, int) else None


@dataclass
class Progress:
    """What a stream has produced so far, as token ids; what a continuation needs."""

    chat: bool = False
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    template: dict[str, Any] = field(default_factory=dict)  # the first chunk's id, created, model (chat shape)
    finished: bool = False  # a choice said finish_reason
    client_wants_ids: bool = False

    def observe(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Record one chunk's ids; the chunk as the client should see it (ids stripped unless asked for)."""
        if not self.template and obj.get("id"):
            self.template = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
            self.chat = obj.get("object") == "chat.completion.chunk"
        if isinstance(obj.get("prompt_token_ids"), list) and self.prompt_ids is None:  # chat puts them here
            self.prompt_ids = [int(t) for t in obj["prompt_token_ids"]]
        for choice in obj.get("choices") or ():
            if isinstance(choice.get("prompt_token_ids"), list) and self.prompt_ids is None:
                self.prompt_ids = [int(t) for t in choice["prompt_token_ids"]]
            if isinstance(choice.get("token_ids"), list):
                self.generated += [int(t) for t in choice["token_ids"]]
            if choice.get("finish_reason"):
                self.finished = True
        if self.client_wants_ids:
            return obj
        out = {k: v for k, v in obj.items() if k not in ("prompt_token_ids", "prompt_text")}
        if "choices" in out:
            out["choices"] = [{k: v for k, v in c.items() if k not in ("token_ids", "prompt_token_ids")}
                              for c in out["choices"]]
        return out

    def closing_events(self, with_usage: bool) -> list[str]:
        """What a finished stream whose engine broke before its usage and [DONE] still owes the client: its usage
        chunk (as counted here) when asked for; [DONE] is the caller's."""
        if not with_usage:
            return []
        prompt, completion = len(self.prompt_ids or []), len(self.generated)
        return [data_event({**self.template, "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})]

    def continuation(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The /v1/completions body that goes on from here; None when nothing can be continued."""
        if self.prompt_ids is None or self.finished:
            return None
        out: dict[str, Any] = {k: body[k] for k in CARRIED if k in body}
        out["prompt"] = self.prompt_ids + self.generated
        limit = max_tokens_of(body)
        if limit is not None:
            if limit - len(self.generated) <= 0:
                return None
            out["max_tokens"] = limit - len(self.generated)
        else:
            out["max_tokens"] = None
        min_tokens = body.get("min_tokens")
        if isinstance(min_tokens, int) and min_tokens > len(self.generated):
            out["min_tokens"] = min_tokens - len(self.generated)
        out.update(stream=True, stream_options={"include_usage": True}, return_token_ids=True)
        return out

    def reshape(self, obj: dict[str, Any], generated_before: int) -> dict[str, Any]:
        """A continuation's chunk (completions shape) as the original stream's: chat deltas for a chat
        stream, the original id; its usage as the client's request counts it."""
        usage = obj.get("usage")
        if isinstance(usage, dict):
            prompt = len(self.prompt_ids or [])
            completion = int(usage.get("completion_tokens") or 0) + generated_before
            usage = {**usage, "prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                usage["prompt_tokens_details"] = {**details, "cached_tokens": min(prompt, details["cached_tokens"])}
        choices = obj.get("choices") or []
        if self.chat:
            choices = [{"index": c.get("index", 0), "delta": {"content": c.get("text", "")},
                        "logprobs": None, "finish_reason": c.get("finish_reason"),
                        **({"token_ids": c["token_ids"]} if "token_ids" in c else {})} for c in choices]
        out = {**obj, **self.template, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


def data_event(obj: dict[str, Any]) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
