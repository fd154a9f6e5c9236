"""Error answers in OpenAI's shape, and the one mapping of an engine that cannot answer to 503."""

from __future__ import annotations

from starlette.responses import JSONResponse

# What a 503 or 429 asks the client to wait before trying again.
RETRY_AFTER_S = 5


def openai_error(
    status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    """``{"error": {"message", "type", "code"}}`` with ``status``."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def unavailable(message: str) -> JSONResponse:
    """503 + Retry-After: the engine cannot answer now; the client may retry."""
    return openai_error(503, message, "service_unavailable", headers={"retry-after": str(RETRY_AFTER_S)})
