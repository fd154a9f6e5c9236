"""The KV cross-check: did the decode engine, having loaded the prefill engine's KV, pick the first token the
prefill engine itself picked?

The prefill engine computes the prompt's first output token anyway (``max_tokens=1``). For a greedy request
(temperature 0) and for the canary, prefill-worker asks its engine for that token's log-probability and the
top few (:data:`TOP_K`), as token ids, and says them in a header (:func:`first_token_header`). The front door
asks the decode engine for its tokens' ids and log-probabilities (stripped again unless the client asked)
and compares (:func:`judge`):

- ``match``: the same first token, its log-probabilities within the tolerance;
- ``near_tie``: another token, but one the prefill engine ranked within the tolerance of its own choice (two
  tokens that close are a coin toss between two computations of the same thing: different kernels, batch
  shapes, the decode engine recomputing the prompt's tail);
- ``mismatch``: anything else. The decode engine answered from KV that means something else than the prompt:
  another model or tokenizer behind the same name, a chunk mapped to the wrong position, a dtype or layout
  difference, a corrupted transfer. HTTP 200 with wrong tokens, which no other check sees.

The tolerance (``kv_path.crosscheck_tolerance``) is in nats of log-probability; docs/request-path.md says how it
was chosen from measured differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

TOP_K = 5  # the prefill engine's top tokens that come with its first token
HEADER = "x-disagg-first-token"  # prefill-worker -> front door: "id:logprob,id:logprob,..." (chosen first)
CHECK_HEADER = "x-disagg-kv-check"  # front door -> client: "match; delta=3e-05" (near_tie, mismatch; nats)
ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spelling of a token


@dataclass(frozen=True)
class FirstToken:
    """An engine's first output token: its id, log-probability and (prefill) the top few it ranked."""

    id: int
    logprob: float | None
    top: dict[int, float]


@dataclass(frozen=True)
class Verdict:
    result: str  # match | near_tie | mismatch
    delta: float  # how far apart the two engines were (nats), 0 for an exact match
    detail: str

    @property
    def ok(self) -> bool:
        return self.result != "mismatch"


def greedy(body: dict[str, Any]) -> bool:
    """A request whose first token is determined by the prompt alone (temperature 0, one choice, no biases)."""
    temperature = body.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature != 0:
        return False
    if int(body.get("n") or 1) != 1 or int(body.get("best_of") or 1) != 1 or body.get("use_beam_search"):
        return False
    biased = ("logit_bias", "allowed_token_ids", "bad_words", "logits_processors", "structured_outputs",
              "guided_json", "guided_regex", "guided_choice", "guided_grammar", "response_format", "tools")
    if any(body.get(k) for k in biased):
        return False
    min_tokens = body.get("min_tokens")
    return not (isinstance(min_tokens, int) and min_tokens > 0)  # prefill (one token) would allow EOS


def probe_fields(chat: bool) -> dict[str, Any]:
    """What prefill-worker adds to its engine call to learn the first token (ids, not text)."""
    if chat:
        return {"logprobs": True, "top_logprobs": TOP_K, "return_tokens_as_token_ids": True}
    return {"logprobs": TOP_K, "return_tokens_as_token_ids": True}


def decode_fields(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """What the front door adds to the decode call of a checked request (the client's own logprobs kept)."""
    out: dict[str, Any] = {"return_token_ids": True}
    if chat and not body.get("logprobs"):
        out.update(logprobs=True, top_logprobs=0)
    elif not chat and body.get("logprobs") is None:
        out["logprobs"] = 0
    return out


def _id_of(token: Any) -> int | None:
    if isinstance(token, str) and token.startswith(ID_PREFIX):
        try:
            return int(token[len(ID_PREFIX):])
        except ValueError:
            return None
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def prefill_first_token(answer: Any) -> FirstToken | None:
    """The first token of a prefill engine answer made with :func:`probe_fields` (completions or chat)."""
    try:
        choice = answer["choices"][0]
        ids = choice.get("token_ids")
        logprobs = choice.get("logprobs") or {}
        top: dict[int, float] = {}
        if "content" in logprobs:  # chat
            first = logprobs["content"][0]
            chosen, logprob = _id_of(first.get("token")), _number(first.get("logprob"))
            for alt in first.get("top_logprobs") or ():
                tid, lp = _id_of(alt.get("token")), _number(alt.get("logprob"))
                if tid is not None and lp is not None:
                    top[tid] = lp
        else:  # completions
            chosen = _id_of((logprobs.get("tokens") or [None])[0])
            logprob = _number((logprobs.get("token_logprobs") or [None])[0])
            for token, lp in ((logprobs.get("top_logprobs") or [{}])[0] or {}).items():
                tid, value = _id_of(token), _number(lp)
                if tid is not None and value is not None:
                    top[tid] = value
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if isinstance(ids, list) and ids and isinstance(ids[0], int):
        chosen = ids[0]
    if chosen is None:
        return None
    if logprob is not None:
        top.setdefault(chosen, logprob)
    return FirstToken(chosen, logprob, top)


def decode_first_token(obj: Any) -> FirstToken | None:
    """The first generated token in a decode engine answer or stream chunk made with :func:`decode_fields`
    (None when this chunk carries none: chat's role-only opener)."""
    try:
        choice = obj["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(choice, dict):
        return None
    ids = choice.get("token_ids")
    if not isinstance(ids, list) or not ids or not isinstance(ids[0], int):
        return None
    logprob = None
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        if isinstance(logprobs.get("content"), list) and logprobs["content"]:
            entry = logprobs["content"][0]
            logprob = _number(entry.get("logprob")) if isinstance(entry, dict) else None
        elif isinstance(logprobs.get("token_logprobs"), list) and logprobs["token_logprobs"]:
            logprob = _number(logprobs["token_logprobs"][0])
    return FirstToken(ids[0], logprob, {})


def first_token_header(token: FirstToken) -> str:
    """``id:logprob,...``: the chosen token first, then the rest of the top few, best first."""
    rest = sorted(((t, lp) for t, lp in token.top.items() if t != token.id), key=lambda x: -x[1])
    chosen = "nan" if token.logprob is None else f"{token.logprob:.6g}"
    return ",".join([f"{token.id}:{chosen}", *(f"{t}:{lp:.6g}" for t, lp in rest)])


def parse_first_token_header(value: str | None) -> FirstToken | None:
    if not value:
        return None
    top: dict[int, float] = {}
    chosen: int | None = None
    logprob: float | None = None
    try:
        for i, item in enumerate(value.split(",")[: TOP_K + 1]):
            tid_s, lp_s = item.split(":", 1)
            tid, lp = int(tid_s), float(lp_s)
            if i == 0:
                chosen, logprob = tid, (lp if math.isfinite(lp) else None)
            if math.isfinite(lp):
                top[tid] = lp
    except ValueError:
        return None
    return FirstToken(chosen, logprob, top) if chosen is not None else None


def judge(prefill: FirstToken, decode: FirstToken, tolerance: float) -> Verdict:
    """Did the decode engine pick what the prefill engine picked (within ``tolerance`` nats)?"""
    if decode.id == prefill.id:
        if decode.logprob is None or prefill.logprob is None:
            return Verdict("match", 0.0, f"token {decode.id}")
        delta = abs(decode.logprob - prefill.logprob)
        if delta <= tolerance:
            return Verdict("match", delta, f"token {decode.id}, log-probabilities {delta:.3g} apart")
        return Verdict("mismatch", delta, f"token {decode.id} with log-probability {decode.logprob:.4g} at decode, "
                                          f"{prefill.logprob:.4g} at prefill ({delta:.3g} apart > {tolerance:g})")
    ranked = prefill.top.get(decode.id)
    if ranked is not None and prefill.logprob is not None and prefill.logprob - ranked <= tolerance:
        delta = prefill.logprob - ranked
        if decode.logprob is None or abs(decode.logprob - ranked) <= tolerance:
            return Verdict("near_tie", delta, f"token {decode.id} where prefill chose {prefill.id}, "
                                              f"{delta:.3g} below it")
    where = f"ranked {ranked:.4g} by prefill" if ranked is not None else f"not in prefill's top {TOP_K}"
    return Verdict("mismatch", math.inf if ranked is None or prefill.logprob is None else prefill.logprob - ranked,
                   f"decode chose token {decode.id} ({where}), prefill chose {prefill.id} "
                   f"(log-probability {prefill.logprob})")


def strip_probe(obj: dict[str, Any], *, keep_ids: bool, keep_logprobs: bool) -> dict[str, Any]:
    """An answer or chunk without what :func:`decode_fields` added and the client did not ask for."""
    if keep_ids and keep_logprobs:
        return obj
    out = {k: v for k, v in obj.items() if keep_ids or k not in ("prompt_token_ids", "prompt_text")}
    if isinstance(out.get("choices"), list):
        drop = set() if keep_ids else {"token_ids", "prompt_token_ids"}
        choices = []
        for c in out["choices"]:
            if not isinstance(c, dict):
                choices.append(c)
                continue
            c = {k: v for k, v in c.items() if k not in drop}
            if not keep_logprobs and "logprobs" in c:
                c["logprobs"] = None
            choices.append(c)
        out["choices"] = choices
    return out
