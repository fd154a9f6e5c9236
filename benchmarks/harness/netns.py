"""Hosts on one machine: each a network namespace with its own address on a shared bridge, its own
runtime and log directories (bind-mounted over the config's paths in a mount namespace of its own),
its own processes. Only those addresses and each namespace's loopback are used."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

BRIDGE = "dgbr0"
GATEWAY = "10.231.0.254"
PREFIX = 24


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def available() -> str:
    """'' when this machine can make network namespaces here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2's ip and util-linux's unshare"
    probe = ip("netns", "add", "dg-probe", check=False)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    ip("netns", "del", "dg-probe", check=False)
    return ""


@dataclass
class Host:
    name: str
    address: str
    root: Path  # this host's own run/ and log/
    runtime_dir: Path  # the config's paths, which run/ and log/ are mounted over inside the host
    log_dir: Path

    @property
    def ns(self) -> str:
        return f"dg-{self.name}"

    @property
    def veth(self) -> str:
        return f"dgv-{self.name}"[:15]

    def argv(self, *command: str) -> list[str]:
        """``command`` run inside this host: its network namespace, its runtime and log dirs."""
        script = 'mount --bind "$1" "$2" && mount --bind "$3" "$4" && shift 4 && exec "$@"'
        return ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, "host", str(self.root / "run"), str(self.runtime_dir), str(self.root / "log"),
                str(self.log_dir), *command]

    def run(self, *command: str, timeout: float = 300, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*command), capture_output=True, text=True, timeout=timeout, env=env)

    def popen(self, *command: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(self.argv(*command), stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    def link(self, up: bool) -> None:
        """Cut (or restore) this host's only link to the others."""
        ip("link", "set", self.veth, "up" if up else "down")

    def pids(self) -> list[int]:
        out = ip("netns", "pids", self.ns, check=False).stdout.split()
        return [int(p) for p in out]

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def create(hosts: list[Host]) -> None:
    """The bridge, one namespace per host, a veth from each into the bridge."""
    destroy(hosts)
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{GATEWAY}/{PREFIX}", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    for h in hosts:
        for sub in ("run", "log"):
            (h.root / sub).mkdir(parents=True, exist_ok=True, mode=0o755)
        h.runtime_dir.mkdir(parents=True, exist_ok=True)
        h.log_dir.mkdir(parents=True, exist_ok=True)
        ip("netns", "add", h.ns)
        ip("link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
        ip("link", "set", h.veth, "master", BRIDGE)
        ip("link", "set", h.veth, "up")
        ip("-n", h.ns, "addr", "add", f"{h.address}/{PREFIX}", "dev", "eth0")
        ip("-n", h.ns, "link", "set", "eth0", "up")
        ip("-n", h.ns, "link", "set", "lo", "up")


def destroy(hosts: list[Host]) -> None:
    for h in hosts:
        if ip("netns", "pids", h.ns, check=False).returncode == 0:
            h.kill_all()
            deadline = time.monotonic() + 10
            while h.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
        ip("netns", "del", h.ns, check=False)
        ip("link", "del", h.veth, check=False)
    ip("link", "del", BRIDGE, check=False)
