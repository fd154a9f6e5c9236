"""`systemctl start disagg.target` on a real systemd, booted as PID 1 of a new
PID + mount namespace (root only; no container runtime needed).

Isolation: the namespace gets its own /run (a tmpfs: systemd's runtime state and
our units live there), boots only to basic.target, and the units that would
empty the shared /tmp (systemd-tmpfiles-setup and friends) are masked — booted
plainly, they wiped the machine's /tmp once.

The shipped units run as they are, plus one drop-in each that points
DISAGG_CONFIG at this test's config and relaxes only what this sandbox needs:
its Python lives under /root (User=root, ProtectHome=read-only), and a checkout
under /tmp would be hidden by PrivateTmp= (then /tmp is shared and writable).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from daemons.config import load_config
from daemons.deployment import Deployment
from daemons.ops.install import front_door_units, render_unit, unit_files

from .conftest import PORTS, REPO, write_config

SYSTEMD = "/lib/systemd/systemd"
OFFSET = 5000  # ports 23000-24112: below the ephemeral range (32768+), where vLLM binds random ports
SHARED_PORT = PORTS["decode_worker"]["port"] + OFFSET + 20
UNITS = ("disagg-lmcache-server.service", "disagg-prefill-worker.service", "disagg-decode-worker.service")
MASKED = ("systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
          "systemd-tmpfiles-setup-dev-early.service", "systemd-tmpfiles-clean.service",
          "systemd-tmpfiles-clean.timer", "tmp.mount")
WRAPPER = """#!/bin/sh
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/systemd/system
for u in {masked}; do ln -sf /dev/null /run/systemd/system/$u; done
exec {systemd} --system --unit=basic.target
"""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(SYSTEMD).exists() or shutil.which("unshare") is None
    or shutil.which("nsenter") is None,
    reason="needs root, systemd, unshare and nsenter",
)


def ns(pid: int, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-p", "-m", *cmd], capture_output=True, text=True,
                          timeout=timeout)


def show(pid: int, unit: str, *props: str) -> dict[str, str]:
    out = ns(pid, "systemctl", "show", unit, *(f"-p{p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    d = tmp_path_factory.mktemp("systemd")
    wrapper = d / "boot.sh"
    wrapper.write_text(WRAPPER.format(masked=" ".join(MASKED), systemd=SYSTEMD))
    wrapper.chmod(0o755)
    marker = Path("/tmp") / f"disagg-systemd-test-{os.getpid()}"
    marker.write_text("must survive the boot\n")
    log = d / "systemd.log"
    with log.open("wb") as out:
        unshare = subprocess.Popen(["setsid", "unshare", "-p", "-f", "-m", "--mount-proc", str(wrapper)],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    pid = None
    try:
        deadline = time.monotonic() + 30
        while pid is None and time.monotonic() < deadline:
            children = subprocess.run(["pgrep", "-P", str(unshare.pid)], capture_output=True, text=True).stdout
            pid = int(children.split()[0]) if children.split() else None
            time.sleep(0.2)
        assert pid, log.read_text()
        state = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = ns(pid, "systemctl", "is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(1)
        assert state in ("running", "degraded"), (state, log.read_text()[-3000:])
        assert marker.exists(), "the boot touched the shared /tmp"
        yield pid
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)  # PID 1 of the namespace: everything in it goes too
        unshare.wait(30)
        marker.unlink(missing_ok=True)


def stage_units(pid: int, staging: Path, config: Path) -> None:
    staging.mkdir()
    loaded = load_config(config)
    for unit in unit_files():
        (staging / unit.name).write_text(render_unit(unit, str(Path(sys.executable).parent), Deployment(loaded)))
    for name, text in front_door_units(Deployment(loaded)).items():  # the box's endpoint: a socket, and a drop-in for it
        (staging / name).parent.mkdir(exist_ok=True)
        (staging / name).write_text(text)
    drop_in = ["[Service]", f"Environment=DISAGG_CONFIG={config}", "User=root", "Group=root",
               "ProtectHome=read-only"]
    if str(REPO).startswith(("/tmp/", "/var/tmp/")):
        # The checkout must stay visible, and the daemons still need a writable /tmp.
        drop_in += ["PrivateTmp=no", "ReadWritePaths=/tmp /var/tmp"]
    for unit in UNITS:
        (staging / f"{unit}.d").mkdir(exist_ok=True)
        (staging / f"{unit}.d" / "test.conf").write_text("\n".join(drop_in) + "\n")
    proc = ns(pid, "sh", "-c", f"cp -r {staging}/. /run/systemd/system/ && systemctl daemon-reload")
    assert proc.returncode == 0, proc.stderr


def test_systemctl_start_target_gates_on_readiness_and_stop_drains(booted, model_dir):
    pid = booted
    # Not under /tmp (PrivateTmp= would hide it) and with the units' own writable dirs.
    directory = REPO / "var" / "systemd-test"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    ports = {name: {k: v + OFFSET for k, v in section.items()} for name, section in PORTS.items()}
    ports["decode_worker"]["shared_port"] = SHARED_PORT  # the box's endpoint: disagg-front-door.socket
    config = write_config(directory, **ports)
    doc = yaml.safe_load(config.read_text())
    doc.update(runtime_dir="/run/disagg", log_dir="/var/log/disagg")  # RuntimeDirectory=, LogsDirectory=
    config.write_text(yaml.safe_dump(doc))
    stage_units(pid, directory / "units", config)

    t0 = time.monotonic()
    start = ns(pid, "systemctl", "start", "disagg.target", timeout=1200)
    elapsed = time.monotonic() - t0
    journal = ns(pid, "journalctl", "--no-pager", "-n", "60").stdout
    assert start.returncode == 0, start.stderr + journal
    print(f"\nsystemctl start disagg.target returned after {elapsed:.1f}s, all three ready")
    states = {u: show(pid, u, "ActiveState", "StatusText", "Type", "ActiveEnterTimestampMonotonic") for u in UNITS}
    for unit, s in states.items():
        assert (s["ActiveState"], s["Type"], s["StatusText"]) == ("active", "notify", "ready"), (unit, s, journal)
    # Type=notify makes After= real: each became active only after its dependency's READY=1.
    t = [int(states[u]["ActiveEnterTimestampMonotonic"]) for u in UNITS]
    assert t[0] < t[1] < t[2], t

    status = ns(pid, str(Path(sys.executable).parent / "disaggctl"), "--config", str(config), "status")
    assert status.returncode == 0, status.stdout
    r = httpx.post(f"http://127.0.0.1:{PORTS['decode_worker']['port'] + OFFSET}/v1/completions",
                   json={"model": "tiny-llama", "prompt": "Hello, how are you?" * 300, "max_tokens": 2},
                   timeout=300, trust_env=False)
    assert r.status_code == 200 and r.headers["x-disagg-path"] == "disaggregated", r.text
    journal = ns(pid, "journalctl", "--no-pager", "-u", "disagg-decode-worker").stdout
    assert "from systemd socket activation" in journal, journal[-3000:]
    # The box's endpoint is systemd's too (Sockets= in the drop-in), and serves.
    assert "front-door: listening socket" in journal and show(
        pid, "disagg-front-door.socket", "ActiveState")["ActiveState"] == "active", journal[-3000:]
    r = httpx.post(f"http://127.0.0.1:{SHARED_PORT}/v1/completions",
                   json={"model": "tiny-llama", "prompt": "Hello, how are you?" * 300, "max_tokens": 2},
                   timeout=300, trust_env=False)
    assert r.status_code == 200 and r.headers["x-disagg-path"] == "disaggregated", r.text
    # The engine's own output is in the journal too, under the unit, named after the child (logs.children auto).
    engine = ns(pid, "journalctl", "--no-pager", "-u", "disagg-decode-worker", "-t", "decode-worker-engine").stdout
    assert "=== " in engine and "starting (keeper" in engine and "vllm" in engine.lower(), engine[-2000:]

    # A planned restart of decode-worker under a client: its socket belongs to systemd, so connections made
    # while no process listens wait in the backlog, and the new process (front door first, failover while its
    # engine loads) answers them. Nothing is refused, nothing fails.
    seen: list[str] = []
    stop = threading.Event()

    def client(port: int) -> None:
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "tiny-llama", "prompt": "Hello, how are you?" * 20, "max_tokens": 2}
        with httpx.Client(trust_env=False, timeout=120) as c:
            while not stop.is_set():
                try:
                    resp = c.post(url, json=body)
                    seen.append(str(resp.status_code))
                except httpx.ConnectError:
                    seen.append("refused")
                except httpx.HTTPError as exc:
                    seen.append(type(exc).__name__)
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(port,), daemon=True)  # its own port and the box's
               for port in (PORTS["decode_worker"]["port"] + OFFSET, SHARED_PORT)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    restart = ns(pid, "systemctl", "restart", "disagg-decode-worker.service", timeout=600)
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(130)
    assert restart.returncode == 0, restart.stderr
    for socket_unit in ("disagg-decode-worker.socket", "disagg-front-door.socket"):
        assert show(pid, socket_unit, "ActiveState")["ActiveState"] == "active", socket_unit
    assert seen and set(seen) == {"200"}, Counter(seen)
    print(f"restart of decode-worker under a client: {len(seen)} requests, {Counter(seen)}")

    assert ns(pid, "systemctl", "stop", "disagg.target", timeout=400).returncode == 0
    deadline = time.monotonic() + 180
    while any(show(pid, u, "ActiveState")["ActiveState"] != "inactive" for u in UNITS):
        assert time.monotonic() < deadline, [show(pid, u, "ActiveState") for u in UNITS]
        time.sleep(1)
    for unit in UNITS:
        assert show(pid, unit, "Result")["Result"] == "success", unit
    journal = ns(pid, "journalctl", "--no-pager", "-u", "disagg-decode-worker").stdout
    assert "draining" in journal and "state -> stopped" in journal

    # A bad config: exit 78, and RestartPreventExitStatus=78 keeps systemd from retrying.
    bad = directory / "bad.yaml"
    bad.write_text(config.read_text() + "typo_key: 1\n")
    (directory / "units" / "disagg-lmcache-server.service.d" / "zz-bad.conf").write_text(
        f"[Service]\nEnvironment=DISAGG_CONFIG={bad}\n")
    stage = ns(pid, "sh", "-c", f"cp -r {directory / 'units'}/. /run/systemd/system/ && systemctl daemon-reload")
    assert stage.returncode == 0
    assert ns(pid, "systemctl", "start", "disagg-lmcache-server.service", timeout=120).returncode != 0
    time.sleep(8)  # longer than RestartSec=5
    s = show(pid, "disagg-lmcache-server.service", "ActiveState", "ExecMainStatus", "NRestarts")
    assert (s["ActiveState"], s["ExecMainStatus"], s["NRestarts"]) == ("failed", "78", "0"), s
    shutil.rmtree(directory, ignore_errors=True)
