"""Two hosts of one cluster on this machine (network namespaces, see netns.py): a prefill host
(lmcache-server + prefill-worker) and a decode host (lmcache-coordinator + lmcache-server +
decode-worker), the same config file on both, each started with `disaggctl up` under its own
supervisord. Used by tests/e2e/test_hosts.py and benchmarks/hosts.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from benchmarks.harness.netns import Host, create, destroy

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "var" / "models" / "tiny-llama"
PY = str(REPO / ".venv" / "bin" / "python")
PREFILL_ADDR, DECODE_ADDR = "10.231.0.2", "10.231.0.1"
API_KEY = "test-key-hosts"
CLUSTER_SECRET = "test-cluster-secret-0123456789"
REQUEST_TIMEOUT_S = 120  # no request may hang: a fallback answers in seconds


def cluster_doc(directory: Path) -> dict:
    doc = yaml.safe_load((REPO / "etc" / "disagg.yaml").read_text())
    doc["runtime_dir"] = str(directory / "run")
    doc["log_dir"] = str(directory / "log")
    doc["model"]["path"] = str(MODEL_DIR)
    doc["decode_worker"]["host"] = DECODE_ADDR  # the front door on the decode host's address, with API keys
    doc["kv_path"]["canary_interval_s"] = 5
    secret = directory / "cluster-secret"
    secret.write_text(CLUSTER_SECRET + "\n")
    secret.chmod(0o600)
    doc["cluster"] = {
        "private_network": "10.231.0.0/24",
        "secret_file": str(secret),
        "hosts": {
            "prefill-a": {"address": PREFILL_ADDR, "daemons": ["lmcache-server", "prefill-worker"]},
            "decode-a": {"address": DECODE_ADDR,
                         "daemons": ["lmcache-coordinator", "lmcache-server", "decode-worker"]},
        },
    }
    return doc


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = directory / "disagg.yaml"
        self.config.write_text(yaml.safe_dump(cluster_doc(directory)))
        run, log = directory / "run", directory / "log"
        self.prefill = Host("prefill-a", PREFILL_ADDR, directory / "hosts" / "prefill-a", run, log)
        self.decode = Host("decode-a", DECODE_ADDR, directory / "hosts" / "decode-a", run, log)
        self.hosts = [self.decode, self.prefill]
        self.env = {**os.environ, "DISAGG_API_KEYS": API_KEY, "DISAGG_STRICT_TRANSITIONS": "1"}
        self.host_env: dict[str, dict[str, str]] = {}  # more for one host's stack, by host name

    def ctl(self, host: Host, *words: str, timeout: float = 300) -> str:
        proc = host.run(PY, "-m", "daemons.ops.ctl", "--config", str(self.config), *words, timeout=timeout,
                        env={**self.env, **self.host_env.get(host.name, {})})
        return proc.stdout + proc.stderr

    def status(self, host: Host) -> dict[str, dict]:
        out = self.ctl(host, "status", "--json")
        return {d["daemon"]: d for d in json.loads(out[out.index("{"):])["daemons"]}

    def state_file(self, host: Host, daemon: str) -> dict:
        return json.loads((host.root / "run" / f"{daemon}.json").read_text())

    def metrics(self, host: Host, port: int) -> str:
        return host.run("python3", "-c", f"import urllib.request as u; print(u.urlopen("
                        f"'http://127.0.0.1:{port}/metrics', timeout=10).read().decode())").stdout

    def logs(self) -> str:
        out = []
        for host in self.hosts:
            for f in sorted((host.root / "log").glob("*.out")):
                out.append(f"--- {host.name}/{f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def up(self) -> None:
        """The namespaces, then `disaggctl up` and `wait-ready` on each host; AssertionError with logs if not."""
        create(self.hosts)
        for host in self.hosts:
            out = self.ctl(host, "up")
            assert "started" in out, out
        for host in self.hosts:
            out = self.ctl(host, "wait-ready", "--timeout", "600", timeout=660)
            assert "all ready" in out, out + self.logs()

    def down(self) -> None:
        for host in self.hosts:
            try:
                self.ctl(host, "down", timeout=200)
            except Exception:  # noqa: BLE001 - the namespaces go anyway
                pass
        destroy(self.hosts)
