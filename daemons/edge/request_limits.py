"""What a request must be before any work is done for it.

- Body: at most ``max_bytes`` (413 as soon as ``Content-Length`` or the bytes
  read so far say more; the rest is never read into memory).
- JSON: an object, nested at most ``MAX_JSON_DEPTH`` deep (400; a deeper
  document would otherwise exhaust the parser's recursion).
- ``x-request-id``: printable ASCII without spaces, at most 128 characters
  (400); it is logged and forwarded to the engines, so it must be safe to do both.
- Work (:func:`check_work`): choices (``n``, ``best_of``), prompts in a list, output tokens and
  log-probabilities bounded by :class:`WorkLimits` (400 naming the limit and its config key): admission counts
  requests, and one request must not hold a batch's worth of the engine.

Each check raises :class:`BadRequest` with the status and an OpenAI-style message.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

MAX_JSON_DEPTH = 32
_REQUEST_ID = re.compile(r"^[!-~]{1,128}$")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def too_large(request: Request, max_bytes: int) -> None:
    """:class:`BadRequest` 413 when ``Content-Length`` says more than ``max_bytes`` (400 when it is no number)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise BadRequest(413, f"request body is {int(declared)} bytes; the limit is {max_bytes}",
                                 "request_too_large")
        except ValueError:
            raise BadRequest(400, "Content-Length is not a number") from None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, or :class:`BadRequest` 413 once it is longer than ``max_bytes``."""
    too_large(request, max_bytes)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise BadRequest(413, f"request body is over the limit of {max_bytes} bytes", "request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(400, "client went away while sending the body") from None
    return b"".join(chunks)


def _depth(value: Any, limit: int) -> bool:
    """True when ``value`` nests no deeper than ``limit`` (iterative: no recursion to exhaust)."""
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        todo.extend((child, depth + 1) for child in children)
    return True


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or :class:`BadRequest` 400 saying what is wrong with it."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise BadRequest(400, f"request body is nested too deeply (the limit is {MAX_JSON_DEPTH})") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest(400, "request body must be a JSON object")
    if not _depth(doc, MAX_JSON_DEPTH):
        raise BadRequest(400, f"request body is nested too deeply (the limit is {MAX_JSON_DEPTH})")
    return doc


def request_id(request: Request) -> str:
    """The client's ``x-request-id`` if it is safe to log and forward, a new one if absent; else 400."""
    raw = request.headers.get("x-request-id")
    if raw is None or raw == "":
        return uuid.uuid4().hex[:16]
    if not _REQUEST_ID.match(raw):
        raise BadRequest(400, "x-request-id must be 1 to 128 printable ASCII characters without spaces")
    return raw


@dataclass(frozen=True)
class WorkLimits:
    """decode_worker's max_choices, max_prompts, max_output_tokens, max_logprobs (the defaults are the config's)."""

    max_choices: int
    max_prompts: int
    max_output_tokens: int
    max_logprobs: int


def _count(value: Any) -> int | None:
    """An integer field's value (None when absent or null); bools and other types are the engine's to refuse."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def prompt_count(prompt: Any) -> int:
    """How many prompts a /v1/completions ``prompt`` holds: a string or a list of token ids is one."""
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt)
    return 1


def check_work(body: dict[str, Any], limits: WorkLimits, key_prefix: str = "decode_worker.") -> None:
    """:class:`BadRequest` 400 when the request asks for more work than ``limits`` allow, naming the limit."""
    def over(what: str, value: int, limit: int, key: str) -> None:
        if value > limit:
            raise BadRequest(400, f"{what} is {value}; the limit is {limit} ({key_prefix}{key})")

    for field in ("n", "best_of"):
        if (v := _count(body.get(field))) is not None:
            over(field, v, limits.max_choices, "max_choices")
    if "prompt" in body:
        over("the number of prompts", prompt_count(body["prompt"]), limits.max_prompts, "max_prompts")
    for field in ("max_tokens", "max_completion_tokens"):
        if (v := _count(body.get(field))) is not None:
            over(field, v, limits.max_output_tokens, "max_output_tokens")
    for field in ("logprobs", "top_logprobs", "prompt_logprobs"):
        if (v := _count(body.get(field))) is not None:
            over(field, v, limits.max_logprobs, "max_logprobs")

