"""The digest covers what changes the KV (engine flags, versions), and a mismatch names the part that differs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from daemons.config import load_config
from daemons.runtime import digest
from daemons.runtime.statefile import State, StateRecord, assess, write_state

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, model_dir: Path, name: str, engine_args: list[str] | None = None):  # type: ignore[no-untyped-def]
    doc = yaml.safe_load((REPO / "etc" / "disagg.yaml").read_text())
    doc["model"]["path"] = str(model_dir)
    for worker in ("prefill_worker", "decode_worker"):
        doc[worker]["extra_engine_args"] = engine_args or []
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path)


def test_kv_engine_flags_and_versions_are_parts_of_the_digest(tmp_path, model_dir):
    plain = config(tmp_path, model_dir, "plain")
    fp8 = config(tmp_path, model_dir, "fp8", ["--kv-cache-dtype", "fp8", "--max-num-batched-tokens", "4096"])
    assert digest.digest_parts(fp8)["kv_engine_args"] == "--kv-cache-dtype=fp8"  # a scheduling flag is not KV
    assert digest.config_digest(fp8) != digest.config_digest(plain)
    batched = config(tmp_path, model_dir, "batched", ["--max-num-batched-tokens", "4096"])
    assert digest.config_digest(batched) == digest.config_digest(plain)
    versions = digest.digest_parts(plain)["versions"]
    assert versions.startswith("vllm ") and ", lmcache " in versions and "not installed" not in versions


def test_a_peer_of_other_versions_is_usable_and_named_mid_upgrade(tmp_path, model_dir, monkeypatch):
    """(issue 33) A rolling upgrade runs daemons of two versions for a while: refusing each other stalled the roll with
    the KV path in fallback. They work together, the skew named; the canary and the cross-check judge the KV."""
    import socket

    ours = digest.digest_parts(config(tmp_path, model_dir, "ours"))
    theirs = dict(ours, versions="vllm 0.26.0, lmcache 0.5.3")
    with socket.create_server(("127.0.0.1", 0)) as listening:
        endpoint = f"127.0.0.1:{listening.getsockname()[1]}"
        write_state(tmp_path, StateRecord(
            daemon="prefill-worker", pid=__import__("os").getpid(), state=State.READY, endpoint=endpoint,
            metrics=endpoint, config_digest=digest.digest_of(theirs), version="0", started_at=time.time(),
            config_parts=theirs))
        view = assess(tmp_path, "prefill-worker", 15, expect_digest=digest.digest_of(ours), expect_parts=ours)
    assert view.usable and view.ready
    assert f"runs other versions (theirs vllm 0.26.0, lmcache 0.5.3, ours {ours['versions']})" in view.reason
    assert "model" not in view.reason  # only what differs is named


@pytest.mark.parametrize("part", ["kv_engine_args", "dtype", "model", "load_format", "lmcache"])
def test_every_binding_part_changes_the_digest_and_the_versions_do_not(part):
    parts = {"model": "m", "load_format": "auto", "dtype": "auto", "kv_engine_args": "none", "versions": "v",
             "lmcache": "l"}
    assert digest.digest_of(parts) != digest.digest_of(dict(parts, **{part: "other"}))
    assert digest.digest_of(parts) == digest.digest_of(dict(parts, versions="vllm 0.33.0, lmcache 0.5.7"))
