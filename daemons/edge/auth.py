"""API keys for the front door (``Authorization: Bearer <key>``, as OpenAI's API).

Keys come from the file named by ``decode_worker.api_keys_file`` (one key per
line; ``#`` comments and blank lines ignored; meant to be ``root:disagg 0640``)
and from ``$DISAGG_API_KEYS`` (comma-separated). Several keys may be valid at
once, so a key is rotated by adding the new one, moving clients, then
removing the old one: the file is re-read when it changes (checked every
heartbeat), no restart needed. Only SHA-256 digests are kept in memory, a
presented key is compared with every one of them in constant time, and no key
or digest is ever logged, written to a state file, a metric or ``/health``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

from daemons.config import ConfigError

log = logging.getLogger(__name__)

ENV_VAR = "DISAGG_API_KEYS"


class ApiKeyError(ConfigError):
    """The keys file cannot be used (unreadable, empty, or readable by others)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


class ApiKeys:
    def __init__(self, path: Path | None, env: dict[str, str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        env_value = (os.environ if env is None else env).get(ENV_VAR, "")
        self._env_digests = [_digest(k.strip()) for k in env_value.split(",") if k.strip()]
        self._file_digests: list[bytes] = []
        self._mtime: float | None = None
        if self.path is not None:
            self.reload()

    @property
    def enabled(self) -> bool:
        """False when no key source is configured: every request is let in."""
        return self.path is not None or bool(self._env_digests)

    @property
    def count(self) -> int:
        return len(self._env_digests) + len(self._file_digests)

    def reload(self) -> None:
        """(Re)read the keys file; raises :class:`ApiKeyError` when it cannot be used."""
        assert self.path is not None
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except OSError as exc:
            raise ApiKeyError(f"cannot read API keys file {self.path}: {exc.strerror}") from None
        if st.st_mode & 0o004:
            raise ApiKeyError(f"API keys file {self.path} is readable by everyone: chmod o-r (0640) it")
        keys = parse_keys(text)
        if not keys and not self._env_digests:
            raise ApiKeyError(f"API keys file {self.path} holds no key")
        self._file_digests = [_digest(k) for k in keys]
        self._mtime = st.st_mtime
        log.info("API keys: %d from %s, %d from $%s", len(keys), self.path, len(self._env_digests), ENV_VAR)

    def reload_if_changed(self) -> None:
        """Re-read the file if it changed; a broken new version keeps the old keys (and says why)."""
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            mtime = None
        if mtime == self._mtime:
            return
        try:
            self.reload()
        except ApiKeyError as exc:
            log.error("%s; keeping the %d keys loaded before", exc, len(self._file_digests))
            self._mtime = mtime

    def allows(self, authorization: str | None) -> bool:
        """True when keys are off, or ``authorization`` is ``Bearer <a valid key>``."""
        if not self.enabled:
            return True
        if not authorization or not authorization[:7].lower() == "bearer ":
            return False
        presented = _digest(authorization[7:].strip())
        match = False
        for digest in self._env_digests + self._file_digests:
            match |= hmac.compare_digest(presented, digest)
        return match


def client_key(path: Path | None, env: dict[str, str] | None = None) -> str | None:
    """A key a local client (``disaggctl demo``) can send: the first of $DISAGG_API_KEYS, else of the
    keys file if this user can read it; None when there is none."""
    env_value = (os.environ if env is None else env).get(ENV_VAR, "")
    keys = [k.strip() for k in env_value.split(",") if k.strip()]
    if not keys and path is not None:
        try:
            keys = parse_keys(Path(path).read_text())
        except OSError:
            keys = []
    return keys[0] if keys else None
