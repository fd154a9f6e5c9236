"""`disaggctl install` into a staged prefix: idempotent, --dry-run writes nothing,
uninstall reverses it."""

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "disaggctl"), *args], capture_output=True, text=True, timeout=60)


def test_install_is_idempotent_and_reversible(tmp_path):
    prefix = str(tmp_path)
    dry = ctl("install", "--prefix", prefix, "--dry-run")
    assert dry.returncode == 0 and "would write unit" in dry.stdout
    assert not (tmp_path / "etc").exists()

    first = ctl("install", "--prefix", prefix, "--bin-dir", "/srv/disagg/bin")
    assert first.returncode == 0, first.stderr
    units = tmp_path / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == [
        "disagg-decode-worker.service", "disagg-decode-worker.socket", "disagg-decode-worker@.service",
        "disagg-lmcache-coordinator.service", "disagg-lmcache-server.service",
        "disagg-prefill-worker.service", "disagg-prefill-worker.socket", "disagg-prefill-worker@.service",
        "disagg.target"]
    # The sockets listen where the installed config has the workers listen (the GPU config's front door).
    assert "ListenStream=0.0.0.0:8000" in (units / "disagg-decode-worker.socket").read_text()
    assert "ListenStream=127.0.0.1:8100" in (units / "disagg-prefill-worker.socket").read_text()
    assert "ExecStart=/srv/disagg/bin/disagg-decode-worker --config ${DISAGG_CONFIG}" in \
        (units / "disagg-decode-worker.service").read_text()
    assert "cuda:1" in (tmp_path / "etc/disagg/disagg.yaml").read_text()  # the GPU config by default
    defaults = tmp_path / "etc/default/disagg"
    assert defaults.stat().st_mode & 0o777 == 0o600  # EnvironmentFile=: the obvious place for DISAGG_API_KEYS
    # The GPU config's stop (drain 60 s, child 60 s) fits systemd's stop timeout: never a SIGKILL mid-drain.
    assert "TimeoutStopSec=135" in (units / "disagg-decode-worker.service").read_text()

    again = ctl("install", "--prefix", prefix, "--bin-dir", "/srv/disagg/bin")
    assert again.stdout.strip() == "nothing to do: already in place"

    # The operator's config is never overwritten, and the units follow it: a re-run after changing the front
    # door's address and the drain renders them from the installed config, not the shipped example.
    installed = tmp_path / "etc/disagg/disagg.yaml"
    mine = installed.read_text().replace("port: 8000", "port: 8009").replace("host: 0.0.0.0", "host: 127.0.0.1") \
        .replace("drain_timeout_s: 60", "drain_timeout_s: 90") + "# mine\n"
    installed.write_text(mine)
    rerun = ctl("install", "--prefix", prefix, "--bin-dir", "/other/bin")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert installed.read_text() == mine
    assert "ListenStream=127.0.0.1:8009" in (units / "disagg-decode-worker.socket").read_text()
    assert "TimeoutStopSec=195" in (units / "disagg-decode-worker.service").read_text()
    # A config that does not load writes nothing: no socket with a guessed address.
    installed.write_text(mine + "decode_worker: {port: not-a-port}\n")
    broken = ctl("install", "--prefix", prefix, "--bin-dir", "/third/bin")
    assert broken.returncode == 78 and "nothing written" in broken.stdout
    assert "/third/bin" not in (units / "disagg-decode-worker.service").read_text()
    installed.write_text(mine)

    gone = ctl("uninstall", "--prefix", prefix)
    assert gone.returncode == 0 and not any(units.iterdir())
    assert (tmp_path / "etc/disagg/disagg.yaml").exists()
    ctl("uninstall", "--prefix", prefix, "--purge")
    assert not (tmp_path / "etc/disagg/disagg.yaml").exists() and not (tmp_path / "etc/default/disagg").exists()


def test_a_defaults_file_readable_by_others_is_restricted(tmp_path):
    defaults = tmp_path / "etc/default/disagg"
    defaults.parent.mkdir(parents=True)
    defaults.write_text("DISAGG_API_KEYS=sk-from-an-operator\n")
    defaults.chmod(0o644)
    done = ctl("install", "--prefix", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "restrict to root" in done.stdout
    assert defaults.stat().st_mode & 0o777 == 0o600
    assert defaults.read_text() == "DISAGG_API_KEYS=sk-from-an-operator\n"  # the operator's content kept


def test_a_cluster_install_writes_a_secret_once_and_the_firewall_rules(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    done = ctl("install", "--prefix", str(tmp_path), "--config", str(repo / "etc/disagg-cluster.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    secret = tmp_path / "etc/disagg/cluster-secret"
    assert len(secret.read_text().strip()) == 64 and secret.stat().st_mode & 0o777 == 0o640
    rules = (tmp_path / "etc/disagg/disagg-cluster.nft").read_text()
    assert "10.0.0.1, 10.0.0.2" in rules and "5555" in rules
    first = secret.read_text()
    ctl("install", "--prefix", str(tmp_path), "--config", str(repo / "etc/disagg-cluster.yaml"))
    assert secret.read_text() == first  # never replaced: every host must keep the same one


def test_every_instance_gets_its_own_socket_unit(tmp_path):
    """Template units cannot carry a port each: install writes a socket unit per instance of the config (its address
    and port, its daemon's name for the descriptor, its template service), which the template services want; one
    for an instance that left the config is removed; uninstall removes them all."""
    import shutil

    import yaml

    repo = Path(__file__).resolve().parents[2]
    prefix = str(tmp_path)
    done = ctl("install", "--prefix", prefix, "--config", str(repo / "etc/disagg-8gpu-7b.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    units = tmp_path / "etc/systemd/system"
    sockets = sorted(p.name for p in units.glob("disagg-*-worker@*.socket"))
    assert sockets == [f"disagg-decode-worker@d{i}.socket" for i in range(4)] + [
        f"disagg-prefill-worker@p{i}.socket" for i in range(4)]
    d1 = (units / "disagg-decode-worker@d1.socket").read_text()
    for line in ("ListenStream=0.0.0.0:8020", "FileDescriptorName=decode-worker@d1",
                 "Service=disagg-decode-worker@d1.service"):
        assert f"\n{line}\n" in d1, line
    assert "ListenStream=127.0.0.1:8104" in (units / "disagg-prefill-worker@p2.socket").read_text()
    for kind in ("prefill", "decode"):
        template = (units / f"disagg-{kind}-worker@.service").read_text()
        assert f"Wants=disagg-{kind}-worker@%i.socket" in template and f"After=disagg-{kind}-worker@%i.socket" in template
    # The box's one endpoint (decode_worker.shared_port): one socket unit, inherited by every decode-worker.
    front = (units / "disagg-front-door.socket").read_text()
    for line in ("ListenStream=0.0.0.0:8000", "FileDescriptorName=front-door", "Service=disagg-decode-worker@d0.service"):
        assert f"\n{line}\n" in front, line
    dropin = (units / "disagg-decode-worker@.service.d/front-door.conf").read_text()
    for line in ("Wants=disagg-front-door.socket", "Sockets=disagg-decode-worker@%i.socket disagg-front-door.socket"):
        assert f"\n{line}\n" in dropin, line
    if shutil.which("systemd-analyze"):
        for unit in ("disagg-decode-worker@d1.socket", "disagg-front-door.socket"):
            proc = subprocess.run(["systemd-analyze", "verify", unit], cwd=units, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
    # An instance taken out of the config loses its socket unit at the next install.
    installed = tmp_path / "etc/disagg/disagg.yaml"
    doc = yaml.safe_load(installed.read_text())
    del doc["decode_worker"]["instances"]["d3"]
    del doc["decode_worker"]["shared_port"]  # ... and without the shared port, its units go
    installed.write_text(yaml.safe_dump(doc))
    again = ctl("install", "--prefix", prefix)
    assert again.returncode == 0, again.stdout + again.stderr
    assert not (units / "disagg-decode-worker@d3.socket").exists() and (units / "disagg-decode-worker@d2.socket").exists()
    assert not (units / "disagg-front-door.socket").exists()
    assert not (units / "disagg-decode-worker@.service.d/front-door.conf").exists()
    gone = ctl("uninstall", "--prefix", prefix)
    assert gone.returncode == 0 and not list(units.glob("*.socket"))
