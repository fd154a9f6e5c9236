"""(d) A bad config: each daemon exits 78 (EX_CONFIG) with a message naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import write_config

BIN = Path(sys.executable).parent


@pytest.fixture
def bad_config(tmp_path, model_dir):
    path = write_config(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["lmcache"]["chunk_sise"] = 256
    doc["decode_worker"]["port"] = doc["prefill_worker"]["port"]
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("daemon", ["lmcache-server", "prefill-worker", "decode-worker"])
def test_daemon_exits_78_naming_the_key(bad_config, daemon, tmp_path):
    proc = subprocess.run([str(BIN / f"disagg-{daemon}"), "--config", str(bad_config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr
    assert "lmcache.chunk_sise: unknown key" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started, no state file written


def test_port_clash_names_both_keys(tmp_path, model_dir):
    path = write_config(tmp_path, decode_worker={"port": 18100})
    proc = subprocess.run([str(BIN / "disagg-decode-worker"), "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert "port 18100 is used by both prefill_worker.port and decode_worker.port" in proc.stderr


def test_config_from_environment(tmp_path, model_dir):
    path = write_config(tmp_path, lmcache={"chunk_size": 0})
    proc = subprocess.run([str(BIN / "disaggctl"), "check-config"], capture_output=True, text=True,
                          timeout=60, env={"DISAGG_CONFIG": str(path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 78 and "lmcache.chunk_size:" in proc.stderr


def test_check_config_accepts_a_good_one(tmp_path, model_dir):
    path = write_config(tmp_path)
    proc = subprocess.run([str(BIN / "disaggctl"), "--config", str(path), "check-config"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout


def test_missing_model_exits_78(tmp_path, model_dir):
    path = write_config(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["model"]["path"] = str(tmp_path / "no-model")
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([str(BIN / "disagg-prefill-worker"), "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78 and "model.path: no model at" in proc.stderr
