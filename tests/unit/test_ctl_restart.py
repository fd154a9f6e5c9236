"""disaggctl restart under supervisord: the client waits for a whole drain (issue: `supervisorctl restart` under a
120 s client timeout was killed between its stop and its start when a drain took longer, leaving the daemon
stopped). supervisorctl itself is faked: what matters is what disaggctl asks it and how long it waits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from daemons.config import load_config
from daemons.deployment import Deployment
from daemons.ops import ctl
from daemons.runtime.statefile import StateRecord
from daemons.runtime.states import State

REPO = Path(__file__).resolve().parents[2]


def test_a_rolling_restart_waits_for_each_stop_as_long_as_its_drain_may_take(tmp_path, model_dir, monkeypatch):
    d = yaml.safe_load((REPO / "etc" / "disagg.yaml").read_text())
    d["model"]["path"] = str(model_dir)
    d["runtime_dir"], d["log_dir"] = str(tmp_path / "run"), str(tmp_path / "log")
    d["readiness"]["drain_timeout_s"] = 60  # what config.warnings() asks for with long requests: a 150 s stop budget
    p = tmp_path / "disagg.yaml"
    p.write_text(yaml.safe_dump(d))
    config = load_config(p)
    assert config.readiness.stop_budget_s > ctl.SUPERVISORCTL_TIMEOUT_S
    calls: list[tuple[tuple[str, ...], float]] = []
    pids = {"lmcache-server": 100}

    def fake_supervisorctl(_config, *words, conf=None, timeout_s=ctl.SUPERVISORCTL_TIMEOUT_S):  # type: ignore[no-untyped-def]
        calls.append((words, timeout_s))
        if words[0] == "start":
            pids[words[1]] += 1  # a new process
        return subprocess.CompletedProcess(["supervisorctl", *words], 0, f"{words[1]}: {words[0]}ed\n", "")

    def fake_read_state(_runtime_dir, name):  # type: ignore[no-untyped-def]
        return StateRecord(daemon=name, pid=pids[name], state=State.READY, endpoint="", metrics="", config_digest="",
                           version="", started_at=0.0)

    monkeypatch.setattr(ctl, "supervisorctl", fake_supervisorctl)
    monkeypatch.setattr(ctl, "read_state", fake_read_state)
    monkeypatch.setattr(ctl, "wait_ready", lambda *a, **k: True)
    assert ctl.restart(Deployment(config), ["lmcache-server"]) == 0
    assert [w for w, _ in calls] == [("stop", "lmcache-server"), ("start", "lmcache-server")]
    stop_timeout = calls[0][1]
    assert stop_timeout >= config.readiness.stop_budget_s, (stop_timeout, config.readiness.stop_budget_s)
