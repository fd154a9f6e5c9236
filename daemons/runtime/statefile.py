"""The readiness protocol's state files: ``<runtime_dir>/<daemon>.json``.

Each daemon owns one file and rewrites it atomically (temporary file, fsync,
rename) on every state change and heartbeat. A reader trusts a file only if the
pid in it is alive, the heartbeat is fresh and the endpoint accepts a TCP
connection; a file left behind by a crash is reported as stale, not ready.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemons.runtime.states import State

log = logging.getLogger(__name__)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


BOOT_ID = _boot_id()  # processes that share it share CLOCK_MONOTONIC (Linux: one per boot, all namespaces)


def heartbeat_age_s(record: StateRecord, now: float | None = None) -> float:
    """How old ``record``'s heartbeat is: by the monotonic clock when written on this boot, else by wall
    clocks (``now``, default ``time.time()``; a record of another machine or an older writer)."""
    if now is None and BOOT_ID and record.boot_id == BOOT_ID and record.heartbeat_monotonic > 0:
        return time.monotonic() - record.heartbeat_monotonic
    return (time.time() if now is None else now) - record.heartbeat

__all__ = ["PeerView", "State", "StateRecord", "assess", "endpoint_accepts", "judge_record", "pid_alive", "read_state",
           "write_state"]


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "daemon": str, "pid": int, "state": str, "endpoint": str, "metrics": str, "config_digest": str,
    "version": str, "started_at": (int, float), "heartbeat": (int, float), "reason": str, "details": dict,
    "config_parts": dict, "heartbeat_monotonic": (int, float), "boot_id": str,
}
_REQUIRED = ("daemon", "pid", "state", "endpoint", "metrics", "config_digest", "version", "started_at")


@dataclass
class StateRecord:
    daemon: str
    pid: int
    state: State
    endpoint: str  # host:port that dependents connect to
    metrics: str  # host:port of the Prometheus endpoint
    config_digest: str
    version: str
    started_at: float
    heartbeat: float = field(default_factory=time.time)
    reason: str = ""  # why failed / degraded / waiting
    details: dict[str, Any] = field(default_factory=dict)
    config_parts: dict[str, str] = field(default_factory=dict)  # what the digest covers, readable (digest.py)
    # The heartbeat on this boot's monotonic clock: a reader on the same host (same boot) ages it by that,
    # so a step of the wall clock (NTP, an operator's `date -s`) makes no peer stale (heartbeat_age_s).
    heartbeat_monotonic: float = field(default_factory=time.monotonic)
    boot_id: str = field(default_factory=lambda: BOOT_ID)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: Any) -> StateRecord:
        """The record in ``data``; ValueError when anything in it has the wrong type or is missing."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key, types in _FIELD_TYPES.items():
            if key not in known:
                if key in _REQUIRED:
                    raise ValueError(f"{key} is missing")
                continue
            value = known[key]
            if not isinstance(value, types) or isinstance(value, bool):
                raise ValueError(f"{key} has the wrong type ({type(value).__name__})")
        known["state"] = State(known["state"])
        return cls(**known)


def state_path(runtime_dir: Path, daemon: str) -> Path:
    return Path(runtime_dir) / f"{daemon}.json"


def write_state(runtime_dir: Path, record: StateRecord) -> Path:
    """Atomically replace the daemon's state file with ``record``."""
    runtime_dir = Path(runtime_dir)
    runtime_dir.mkdir(parents=True, exist_ok=True)
    target = state_path(runtime_dir, record.daemon)
    fd, tmp = tempfile.mkstemp(prefix=f".{record.daemon}.", suffix=".tmp", dir=runtime_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record.to_json(), fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


_warned: dict[Path, float] = {}


def read_state(runtime_dir: Path, daemon: str) -> StateRecord | None:
    """The record, or None when the file is absent, unreadable or not a valid record.

    Half-written files never exist (writes are atomic); a file that is not a valid
    record (hand-edited, hostile, another version) is ignored, with one warning per version of it."""
    path = state_path(runtime_dir, daemon)
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        return StateRecord.from_json(json.loads(text))
    except (ValueError, RecursionError) as exc:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = 0.0
        if _warned.get(path) != mtime:
            _warned[path] = mtime
            log.warning("ignoring %s: not a valid state record (%s)", path, exc)
        return None


def check_runtime_dir(runtime_dir: Path) -> None:
    """Create the runtime dir, or refuse one that others could write state files into.

    Raises PermissionError naming the problem: owned by another user, or group/world-writable."""
    path = Path(runtime_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o755)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise PermissionError(f"runtime dir {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}): "
                              "another user could forge our peers' state")
    if st.st_mode & 0o022:
        raise PermissionError(f"runtime dir {path} is writable by group or others (mode {st.st_mode & 0o777:o}): "
                              "chmod go-w it")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def retire_dead_records(runtime_dir: Path, daemons: list[str]) -> list[str]:
    """Before a start: move aside (to ``<daemon>.json.last``) the records whose process is gone, so that a
    reader right after the start (``disaggctl wait-ready --fail-fast``) judges only the processes now
    running, never the previous run's ``failed``. Returns the daemons whose record was moved."""
    moved = []
    for daemon in daemons:
        record = read_state(runtime_dir, daemon)
        if record is not None and not pid_alive(record.pid):
            path = state_path(runtime_dir, daemon)
            try:
                os.replace(path, path.with_name(path.name + ".last"))
                moved.append(daemon)
            except OSError as exc:
                log.warning("cannot move %s aside: %s", path, exc)
    return moved


def endpoint_accepts(endpoint: str, timeout: float = 1.0) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@dataclass
class PeerView:
    """What a reader concludes about a daemon from its state file."""

    daemon: str
    state: str  # a State value, or "absent" / "stale"
    usable: bool  # serving, alive, fresh and reachable
    reason: str
    record: StateRecord | None

    @property
    def ready(self) -> bool:
        """Usable and in state ``ready`` (not degraded): what a dependent waits for."""
        return self.usable and self.state == State.READY.value

    @property
    def serves_whole(self) -> bool:
        """Can its engine serve a whole request (failover)? Usable and its engine answering (``engine_serving``),
        whatever the KV path does: a worker degraded because LMCache is stuck still serves. A record without the
        key (an older version, mid-upgrade) is judged by ``ready``."""
        if not self.usable or self.record is None:
            return False
        serving = self.record.details.get("engine_serving")
        return serving is True if isinstance(serving, bool) else self.ready

    def to_json(self) -> dict[str, Any]:
        return {
            "daemon": self.daemon,
            "state": self.state,
            "usable": self.usable,
            "reason": self.reason,
            "record": self.record.to_json() if self.record else None,
        }


def assess(
    runtime_dir: Path,
    daemon: str,
    heartbeat_timeout_s: float,
    *,
    expect_digest: str | None = None,
    expect_parts: Mapping[str, str] | None = None,
    check_endpoint: bool = True,
    now: float | None = None,
) -> PeerView:
    """Judge a daemon by its state file: usable only if serving, alive, fresh and reachable."""
    record = read_state(runtime_dir, daemon)
    if record is None:
        return PeerView(daemon, "absent", False, "no state file", None)
    gone = "" if pid_alive(record.pid) else f"pid {record.pid} is not running (left by a crash?)"
    view = judge_record(daemon, record, heartbeat_age_s(record, now), heartbeat_timeout_s, expect_digest=expect_digest,
                        expect_parts=expect_parts, process_gone=gone)
    if view.usable and check_endpoint and not endpoint_accepts(record.endpoint):
        return PeerView(daemon, record.state.value, False, f"endpoint {record.endpoint} refuses connections", record)
    return view


def differing(ours: Mapping[str, str], theirs: Mapping[str, str]) -> str:
    """What differs between two daemons' digest parts: ``versions (theirs vllm 0.26.0, ...; ours ...)``."""
    names = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    return "; ".join(f"{k} (theirs {theirs.get(k, 'absent')}, ours {ours.get(k, 'absent')})" for k in names)


def judge_record(daemon: str, record: StateRecord, age_s: float, heartbeat_timeout_s: float, *,
                 expect_digest: str | None, expect_parts: Mapping[str, str] | None = None,
                 process_gone: str = "") -> PeerView:
    """The readiness rules on one record, wherever it came from (a state file, or a peer on another host
    that served it): not stopped or failed, its process there (``process_gone``: why not), heartbeat
    younger than ``heartbeat_timeout_s``, serving, same config digest."""
    if record.state in (State.STOPPED, State.FAILED):
        return PeerView(daemon, record.state.value, False, record.reason or record.state.value, record)
    if process_gone:
        return PeerView(daemon, "stale", False, process_gone, record)
    if age_s > heartbeat_timeout_s:
        return PeerView(daemon, "stale", False, f"heartbeat is {age_s:.0f}s old (hung?)", record)
    if not record.state.serving:
        return PeerView(daemon, record.state.value, False, record.reason or record.state.value, record)
    if expect_digest is not None and record.config_digest != expect_digest:
        what = differing(expect_parts, record.config_parts) if expect_parts and record.config_parts else ""
        return PeerView(
            daemon, record.state.value, False,
            f"config digest {record.config_digest} differs from ours ({expect_digest}): "
            + (f"differs in {what}" if what else "the daemons run different models, engine KV settings, "
               "LMCache settings or (several hosts) cluster layouts"),
            record,
        )
    skew = differing({k: v for k, v in (expect_parts or {}).items() if k == "versions"},
                     {k: v for k, v in record.config_parts.items() if k == "versions"}) if expect_parts else ""
    reason = f"{record.reason}; " if record.reason else ""
    # Other versions, same digest: usable (a rolling upgrade); the canary and the cross-check judge the KV they move.
    return PeerView(daemon, record.state.value, True, f"{reason}runs other {skew}" if skew else record.reason, record)
