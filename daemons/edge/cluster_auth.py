"""Our daemons' calls to each other across hosts carry a shared secret; the prefill API refuses any call without it.

On one box the prefill API listens on loopback; across hosts it listens on the private network, where anyone
could call it, past the front door's API keys and admission (its ``/whole`` route generates whole answers). So in
a cluster every call from a decode host to a prefill-worker carries ``x-disagg-cluster-key`` with the secret in
``cluster.secret_file`` (the same file on every host, readable only by the daemons' user), and the prefill API
answers 401 without it (its ``/health`` stays open: load balancers and operators probe it). The comparison is
constant-time. LMCache's own ports have no authentication at all: docs/security.md says how to fence them, and
``disaggctl install`` writes nftables rules that do.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse

from daemons.config import Config, ConfigError

HEADER = "x-disagg-cluster-key"
MIN_SECRET_CHARS = 16
OPEN_PATHS = ("/health",)


def load_secret(path: Path) -> str:
    """The cluster's secret from its file; ConfigError (exit 78) when it cannot be read or is too short."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cluster.secret_file: cannot read {path}: {exc.strerror or exc}") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"cluster.secret_file: {path} holds {len(secret)} characters; at least {MIN_SECRET_CHARS} "
                          "(e.g. `openssl rand -hex 32`, the same file on every host)")
    return secret


def cluster_headers(config: Config) -> dict[str, str]:
    """What our calls to another host's daemons carry ({} on one box)."""
    cluster = config.cluster
    if cluster is None or cluster.secret_file is None:
        return {}
    return {HEADER: load_secret(cluster.secret_file)}


class ClusterKeyMiddleware:
    """ASGI middleware: every HTTP request but ``/health`` must carry the cluster's secret, else 401."""

    def __init__(self, app: Any, secret: str) -> None:
        self.app = app
        self.secret = secret.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            given = dict(scope.get("headers") or []).get(HEADER.encode(), b"")
            if not hmac.compare_digest(given, self.secret):
                response = JSONResponse({"error": {"message": f"missing or wrong {HEADER}: this API is for the "
                                                   "cluster's own daemons", "type": "authentication_error",
                                                   "code": 401}}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
