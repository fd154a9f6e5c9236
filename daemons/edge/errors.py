"""Error answers in OpenAI's shape, and the one mapping of an engine that cannot answer to 503.

A server error's message never names an internal address: whatever the message says, host:port pairs, IP
addresses and URLs are replaced (the log, the state file and ``disaggctl status`` keep them)."""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

# What a 503 or 429 asks the client to wait before trying again.
RETRY_AFTER_S = 5


def openai_error(
    status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    """``{"error": {"message", "type", "code"}}`` with ``status``."""
    if status >= 500:
        message = scrub(message)
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def unavailable(message: str) -> JSONResponse:
    """503 + Retry-After: the engine cannot answer now; the client may retry."""
    return openai_error(503, message, "service_unavailable", headers={"retry-after": str(RETRY_AFTER_S)})


_INTERNAL = re.compile(
    r"[a-z][a-z0-9+.-]*://[^\s'\")]+"  # a URL
    r"|\[[0-9a-fA-F:]+\](?::\d+)?"  # [v6]:port
    r"|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"  # v4[:port]
    r"|\b[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*:\d{2,5}\b"  # host:port
)


def scrub(message: str) -> str:
    """``message`` without internal addresses (each replaced by ``<internal>``)."""
    return _INTERNAL.sub("<internal>", message)
