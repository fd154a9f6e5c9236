"""The shipped supervisord config with a real supervisord: a daemon killed with
SIGKILL is restarted and ready again (its engine died with it); a bad config
leaves the programs FATAL instead of restart-looping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from daemons.config import load_config
from daemons.ops.ctl import SUPERVISOR_CONF
from daemons.runtime.statefile import pid_alive, read_state

from .conftest import write_config


def test_kill_9_is_restarted_and_ready_again(stack):
    runtime_dir = load_config(stack.config).runtime_dir
    before = read_state(runtime_dir, "prefill-worker")
    engine_pid = before.details["engine_pid"]
    assert pid_alive(before.pid) and pid_alive(engine_pid)
    t0 = time.monotonic()
    os.kill(before.pid, signal.SIGKILL)
    # The engine must not outlive its daemon (it would hold the port the restart needs).
    deadline = time.monotonic() + 30
    while pid_alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(engine_pid), "engine outlived its killed daemon"
    stack.wait_ready()
    elapsed = time.monotonic() - t0
    after = read_state(runtime_dir, "prefill-worker")
    assert after.pid != before.pid and after.state.value == "ready"
    assert after.details["starts"] == before.details["starts"] + 1
    assert "RUNNING" in stack.supervisorctl("status", "prefill-worker")
    print(f"\nprefill-worker restart to ready after kill -9: {elapsed:.1f}s")
    resp = stack.complete("Hello, how are you?" * 200, max_tokens=2)
    assert resp.status_code == 200 and resp.headers["x-disagg-path"] == "disaggregated"


def fatal(status: str) -> int:
    """How many of the three daemons supervisorctl reports FATAL (the socket holder, which reads the same bad
    config, goes FATAL too)."""
    daemons = ("lmcache-server", "prefill-worker", "decode-worker")
    return sum(1 for line in status.splitlines() if line.split()[:1] and line.split()[0] in daemons
               and "FATAL" in line)


def test_bad_config_goes_fatal_not_looping(tmp_path, model_dir):
    config_path = write_config(tmp_path)
    doc = yaml.safe_load(config_path.read_text())
    doc["prefill_worker"]["max_num_seqs"] = "many"
    config_path.write_text(yaml.safe_dump(doc))
    # supervisord needs the directories; the config itself is what is bad.
    run_dir, log_dir = tmp_path / "run", tmp_path / "log"
    run_dir.mkdir()
    log_dir.mkdir()
    env = {**os.environ, "DISAGG_BIN": str(Path(sys.executable).parent), "DISAGG_CONFIG": str(config_path),
           "DISAGG_RUN_DIR": str(run_dir), "DISAGG_LOG_DIR": str(log_dir), "DISAGG_STOP_WAIT_S": "75"}
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "supervisord"), "-c", str(SUPERVISOR_CONF)], env=env, check=True)
    try:
        deadline = time.monotonic() + 90
        status = ""
        while time.monotonic() < deadline:
            status = subprocess.run([str(bin_dir / "supervisorctl"), "-c", str(SUPERVISOR_CONF), "status"],
                                    env=env, capture_output=True, text=True).stdout
            if fatal(status) == 3:
                break
            time.sleep(1)
        assert fatal(status) == 3, status
        time.sleep(5)  # nothing restarts it any more
        log = (log_dir / "supervisord.log").read_text()
        spawns = log.count("spawned: 'prefill-worker'")
        assert spawns == 4, log  # the first try + startretries=3, then FATAL
        assert "gave up: prefill-worker entered FATAL state" in log
        out = (log_dir / "prefill-worker.out").read_text()
        assert "prefill_worker.max_num_seqs" in out and "status 78" in out
    finally:
        subprocess.run([str(bin_dir / "supervisorctl"), "-c", str(SUPERVISOR_CONF), "shutdown"], env=env,
                       capture_output=True)
