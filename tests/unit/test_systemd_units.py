"""The shipped systemd units: `systemd-analyze verify` passes, the security
exposure is at most 4.0 per unit, and the settings the daemons rely on are there."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemons.ops.install import UNIT_DIR, render_unit, unit_files

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
SERVICES = [p for p in unit_files() if p.suffix == ".service"]
BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("units")
    for unit in unit_files():
        (d / unit.name).write_text(render_unit(unit, BIN))
    return d


@pytest.mark.parametrize("unit", [p.name for p in unit_files()])
def test_verify(rendered, unit):
    proc = subprocess.run(["systemd-analyze", "verify", str(rendered / unit)], capture_output=True, text=True,
                          cwd=rendered)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("unit", [p.name for p in SERVICES])
def test_security_exposure_at_most_4(rendered, unit):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(rendered / unit)],
                          capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    print(f"\n{unit}: exposure {match.group(1)}")
    assert float(match.group(1)) <= 4.0


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_readiness_and_restart_settings(unit):
    text = unit.read_text()
    for line in ("Type=notify", "RestartPreventExitStatus=78", "KillMode=mixed", "PartOf=disagg.target",
                 "RuntimeDirectory=disagg", "RuntimeDirectoryPreserve=yes", "Restart=on-failure",
                 "EnvironmentFile=-/etc/default/disagg", "User=disagg", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert "PrivateDevices=yes" not in text  # it would hide /dev/nvidia*
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1))
    assert stop >= 60  # >= the drain time of the shipped GPU config
    watchdog = int(re.search(r"^WatchdogSec=(\d+)$", text, re.M).group(1))
    assert watchdog > 2 * 2  # the daemons ping every heartbeat_interval_s (2 s) or WatchdogSec/2


def test_ordering_is_readiness_gated():
    prefill = (UNIT_DIR / "disagg-prefill-worker.service").read_text()
    decode = (UNIT_DIR / "disagg-decode-worker.service").read_text()
    # Ordered after lmcache-server (its READY=1), but not stopped or restarted with it.
    assert "Wants=disagg-lmcache-server.service" in prefill and "After=disagg-lmcache-server.service" in prefill
    assert "Wants=disagg-lmcache-server.service" in decode and "Requires=disagg-lmcache-server" not in decode
    for unit, text in (("prefill", prefill), ("decode", decode)):  # their listening sockets belong to systemd
        assert f"Requires=disagg-{unit}-worker.socket" in text and f"After=disagg-{unit}-worker.socket" in text
        sock = (UNIT_DIR / f"disagg-{unit}-worker.socket").read_text()
        assert f"FileDescriptorName={unit}-worker" in sock and "ListenStream=" in sock
    assert re.search(r"^After=.*disagg-prefill-worker.service", decode, re.M)
