"""A real Prometheus scrapes the real daemons while requests flow; every shipped
recording rule and every Grafana panel query must return data from it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.harness.scrape import metric_value

from .conftest import PORTS, REPO, wait_http_ok, words_prompt

PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "disagg-dashboard.json"
PROM_PORT = 19090
DAEMONS = ("lmcache-server", "prefill-worker", "decode-worker")

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed "
                                "(scripts/install-system.sh installs it)")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_shipped_config_and_rules_pass_promtool():
    proc = promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = sorted(str(p) for p in (PROM_DIR / "rules").glob("*.yml"))
    proc = promtool("check", "rules", *rules)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_unit_tests():
    proc = promtool("test", "rules", str(REPO / "tests" / "prometheus" / "alerts_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_is_in_sync_with_its_builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dashboard", DASHBOARD.with_name("build_dashboard.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads(DASHBOARD.read_text()) == module.build()


@pytest.mark.parametrize("daemon", DAEMONS)
def test_metrics_follow_prometheus_naming(stack, daemon):
    text = stack.metrics(daemon)
    ours = "\n".join(line for line in text.splitlines() if "disagg_" in line) + "\n"
    proc = promtool("check", "metrics", stdin=ours)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "disagg_ready" in ours and "disagg_build_info" in ours
    # The re-exposed vLLM / LMCache families too (vLLM's `vllm:` comes out as `vllm_`).
    full = promtool("check", "metrics", stdin=text)
    assert full.returncode == 0 and full.stdout.strip() == "", full.stdout + full.stderr


def _prometheus_config(directory: Path) -> Path:
    shipped = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    shipped["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    shipped["rule_files"] = [str(PROM_DIR / r) for r in shipped["rule_files"]]
    ports = {"lmcache-server": PORTS["lmcache_server"]["metrics_port"],
             "prefill-worker": PORTS["prefill_worker"]["metrics_port"],
             "decode-worker": PORTS["decode_worker"]["metrics_port"]}
    for target in shipped["scrape_configs"][0]["static_configs"]:
        target["targets"] = [f"127.0.0.1:{ports[target['labels']['daemon']]}"]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(shipped))
    return path


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    directory = tmp_path_factory.mktemp("prometheus")
    config = _prometheus_config(directory)
    log = (directory / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{PROM_PORT}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{PROM_PORT}"
    try:
        wait_http_ok(f"{url}/-/ready", proc, directory / "prometheus.log", 60, "prometheus")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def query(url: str, expr: str) -> list[dict]:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30, trust_env=False).json()
    assert resp["status"] == "success", (expr, resp)
    return resp["data"]["result"]


def has_finite_value(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def send_traffic(stack) -> None:
    for i in range(3):
        assert stack.complete(words_prompt(100 + i, 700), max_tokens=4).status_code == 200
    body = {"model": "tiny-llama", "prompt": words_prompt(110, 600), "max_tokens": 8, "stream": True,
            "temperature": 0.0, "ignore_eos": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, timeout=300, trust_env=False) as r:
        assert r.status_code == 200
        list(r.iter_lines())


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"].replace("$__rate_interval", "5m")))
    return out


def recording_rules() -> list[str]:
    doc = yaml.safe_load((PROM_DIR / "rules" / "disagg-recording.yml").read_text())
    return [rule["record"] for group in doc["groups"] for rule in group["rules"]]


def alert_rules() -> list[str]:
    doc = yaml.safe_load((PROM_DIR / "rules" / "disagg-alerts.yml").read_text())
    return [rule["alert"] for group in doc["groups"] for rule in group["rules"]]


def wait_all_scraped(prometheus: str) -> None:
    """Until the last scrape of every daemon succeeded."""
    targets = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        targets = {r["metric"]["daemon"]: r["value"][1] for r in query(prometheus, 'up{job="disagg"}')}
        if targets == {d: "1" for d in DAEMONS}:
            return
        time.sleep(1)
    assert targets == {d: "1" for d in DAEMONS}


def wait_prometheus_has(prometheus: str, stack, series: list[tuple[str, str]]) -> None:
    """Until Prometheus holds each (daemon, counter)'s current value.

    A rate needs two samples around the traffic; under load a scrape can time out
    (the daemons' /metrics also ask their busy engines), so wait for the sample
    taken after it instead of sleeping and hoping."""
    deadline = time.monotonic() + 90
    missing = series
    while time.monotonic() < deadline:
        missing = []
        for daemon, name in series:
            want = metric_value(stack.metrics(daemon), name)
            got = query(prometheus, f'sum({name}{{daemon="{daemon}"}})')
            if not got or float(got[0]["value"][1]) < want:
                missing.append(f"{name} (want {want})")
        if not missing:
            return
        time.sleep(1)
    pytest.fail(f"Prometheus never scraped the traffic: {missing}")


# Counters that the traffic moves, on the daemons that hold them.
AFTER_TRAFFIC = [
    ("decode-worker", "disagg_time_to_first_token_seconds_count"),
    ("decode-worker", "disagg_prefill_call_duration_seconds_count"),
    ("decode-worker", "disagg_request_duration_seconds_count"),
    ("prefill-worker", "disagg_prefill_store_wait_seconds_count"),
]


def test_every_panel_and_recording_rule_has_data(stack, prometheus):
    # A baseline sample of every series before the traffic, then the samples after it.
    wait_all_scraped(prometheus)
    send_traffic(stack)
    wait_prometheus_has(prometheus, stack, AFTER_TRAFFIC)
    send_traffic(stack)
    wait_prometheus_has(prometheus, stack, AFTER_TRAFFIC)
    wait_all_scraped(prometheus)
    checks = [(f"panel {title!r}", expr) for title, expr in dashboard_queries()]
    checks += [(f"recording rule {name}", name) for name in recording_rules()]
    empty: list[str] = []
    deadline = time.monotonic() + 60
    while True:
        empty = [f"{what}: {expr}" for what, expr in checks if not has_finite_value(query(prometheus, expr))]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, "no data for:\n" + "\n".join(empty)
    assert len(checks) >= 30
    # The numbers mean what they say: after disaggregated traffic, most prompt tokens were reused.
    reuse = float(query(prometheus, "disagg:kv_reuse_ratio:rate5m")[0]["value"][1])
    assert 0.5 < reuse <= 1.0
    alerts = httpx.get(f"{prometheus}/api/v1/rules?type=alert", timeout=30, trust_env=False).json()
    loaded = sorted(r["name"] for g in alerts["data"]["groups"] for r in g["rules"])
    assert loaded == sorted(alert_rules())  # every alert the shipped file defines, loaded by the real Prometheus
    assert len(loaded) >= 10
    assert all(r["health"] == "ok" for g in alerts["data"]["groups"] for r in g["rules"])
