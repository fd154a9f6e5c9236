"""The real stack, started once per test run: LMCache server, two vLLM engines,
three daemons under a real supervisord, on loopback ports of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "var" / "models" / "tiny-llama"
PORTS = {
    "lmcache": {"port": 18555, "http_port": 18080},
    "lmcache_server": {"metrics_port": 19100},
    "prefill_worker": {"port": 18100, "engine_port": 18101, "metrics_port": 19101},
    "decode_worker": {"port": 18000, "engine_port": 18001, "metrics_port": 19102},
}
READY_TIMEOUT_S = 900
# Every daemon these tests start raises on an illegal state transition instead of logging it.
os.environ["DISAGG_STRICT_TRANSITIONS"] = "1"


def ctl(config: Path, *words: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemons.ops.ctl", "--config", str(config), *words],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


def write_config(directory: Path, **overrides: dict) -> Path:
    doc = yaml.safe_load((REPO / "etc" / "disagg.yaml").read_text())
    doc["runtime_dir"] = str(directory / "run")
    doc["log_dir"] = str(directory / "log")
    doc["model"]["path"] = str(MODEL_DIR)
    for section, values in PORTS.items():
        doc.setdefault(section, {}).update(values)
    for section, values in overrides.items():
        doc.setdefault(section, {}).update(values)
    path = directory / "disagg.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").exists():
        from daemons.ops.make_model import make_model

        make_model(MODEL_DIR)
    return MODEL_DIR


@dataclass
class Stack:
    config: Path
    directory: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{PORTS['decode_worker']['port']}"

    def supervisorctl(self, *words: str) -> str:
        from daemons.config import load_config
        from daemons.deployment import Deployment
        from daemons.ops.ctl import supervisorctl

        proc = supervisorctl(Deployment(load_config(self.config, require_model=False)), *words)
        return proc.stdout + proc.stderr

    def status(self) -> dict:
        return json.loads(ctl(self.config, "status", "--json").stdout)

    def daemon_state(self, name: str) -> str:
        return next(d["state"] for d in self.status()["daemons"] if d["daemon"] == name)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        proc = ctl(self.config, "wait-ready", "--timeout", str(timeout), timeout=timeout + 30)
        if proc.returncode != 0:
            pytest.fail(f"stack not ready:\n{proc.stdout}\n{proc.stderr}\n{self.logs()}")

    def wait_state(self, name: str, states: tuple[str, ...], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.daemon_state(name)
            if state in states:
                return state
            time.sleep(0.5)
        pytest.fail(f"{name} never reached {states}; last {state}")

    def metrics(self, daemon: str) -> str:
        port = PORTS[daemon.replace("-", "_")]["metrics_port"]
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text

    def complete(self, prompt: str, max_tokens: int = 8, **extra) -> httpx.Response:
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        return httpx.post(f"{self.base_url}/v1/completions", json=body, timeout=300, trust_env=False)

    def logs(self) -> str:
        out = []
        for f in sorted((self.directory / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-25:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    directory = tmp_path_factory.mktemp("stack")
    config = write_config(directory)
    proc = ctl(config, "up")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = Stack(config, directory)
    try:
        s.wait_ready()
        yield s
    finally:
        ctl(config, "down", timeout=400)


def wait_http_ok(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail if ``proc`` dies (showing ``log``) or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited:\n" + log.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} did not start in {timeout:.0f}s"
        time.sleep(0.5)


def words_prompt(seed: int, n_words: int) -> str:
    """A deterministic prompt of ordinary words, distinct per seed."""
    import random

    from daemons.ops.make_model import _WORDS

    rng = random.Random(seed)
    return f"Request {seed}. " + " ".join(rng.choice(_WORDS) for _ in range(n_words))
