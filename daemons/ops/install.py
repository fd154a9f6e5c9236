"""`disaggctl install` / `disaggctl uninstall`: put the systemd units, the config,
/etc/default/disagg and the `disagg` system user in place, idempotently.

Every action is planned first, then printed (``--dry-run`` stops there) and
carried out; running it twice changes nothing the second time. The units'
``ExecStart=`` points at the console scripts of the Python environment that
runs this command (the shipped units say /opt/disagg/.venv/bin).
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from daemons.config import ConfigError
from daemons.deployment import Deployment
from daemons.names import SHARED_FRONT_DOOR, DaemonId
from daemons.runtime.listen import url_host

if TYPE_CHECKING:
    from daemons.config import Config

log = logging.getLogger(__name__)

API_KEYS_PATH = Path("/etc/disagg/api-keys")
API_KEYS_HEADER = "# API keys of the disagg front door: one per line (Authorization: Bearer <key>).\n"

REPO_ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO_ROOT / "deploy" / "systemd"
SHIPPED_BIN = "/opt/disagg/.venv/bin"
USER = "disagg"
DEFAULTS_TEXT = """\
# Overrides for the disagg units (EnvironmentFile=-/etc/default/disagg).
# DISAGG_CONFIG=/etc/disagg/disagg.yaml
# DISAGG_LOG_LEVEL=INFO
# DISAGG_API_KEYS=key1,key2   (root only: this file is 0600; decode_worker.api_keys_file is the better place,
#                              re-read when it changes; neither reaches the engines' or LMCache's environment)
"""


@dataclass
class Action:
    what: str
    path: Path | None = None
    content: str | None = None
    command: list[str] | None = None
    mode: int = 0o644
    group: str | None = None  # the file's group (its owner stays the installing user, root)
    chmod_only: bool = False  # the file stays as it is; only its mode is set

    def describe(self) -> str:
        if self.command:
            return f"{self.what}: {' '.join(self.command)}"
        return f"{self.what}: {self.path}"


def unit_files() -> list[Path]:
    return sorted(p for p in UNIT_DIR.iterdir() if p.suffix in (".service", ".target", ".socket"))


def _listening_at(socket_unit: str, host: str, port: int) -> str:
    """A ``.socket`` unit's text with its ``ListenStream=`` at ``host``:``port``."""
    return re.sub(r"^ListenStream=.*$", f"ListenStream={url_host(host)}:{port}", socket_unit, flags=re.M)


def render_unit(path: Path, bin_dir: str, deployment: Deployment | None = None) -> str:
    """A shipped unit for this machine: ``ExecStart=`` at ``bin_dir``; a ``.socket`` listening where
    ``deployment`` has its worker listen."""
    text = path.read_text().replace(SHIPPED_BIN, bin_dir)
    if path.suffix == ".socket" and deployment is not None:
        kind = path.name.removeprefix("disagg-").removesuffix(".socket")
        worker = deployment.config.workers(kind).get(kind)  # every host gets the unit; ExecCondition= skips it
        if worker is not None:
            text = _listening_at(text, deployment.listen_address(kind), worker.port)
    config = deployment.config if deployment is not None else None
    if path.suffix == ".service" and config is not None:  # never SIGKILL a daemon in the middle of its drain
        shipped = re.search(r"^TimeoutStopSec=(\d+)$", text, flags=re.M)
        if shipped is not None and int(shipped.group(1)) < config.readiness.stop_budget_s:
            text = text.replace(shipped.group(0), f"TimeoutStopSec={config.readiness.stop_budget_s}")
    return text


INSTANCE_SOCKET_GLOB = "disagg-*-worker@*.socket"


def instance_sockets(deployment: Deployment) -> dict[str, str]:
    """A socket unit for every worker instance of ``deployment`` (file name -> text), made from the kind's shipped
    ``.socket``: the instance's address and port, its daemon's name for the descriptor, its template service.
    Template units cannot carry a port each; a unit file for one instance (``NAME@INSTANCE.socket``) can."""
    units = {}
    for name, (address, port) in deployment.held_sockets().items():
        daemon = DaemonId.parse(name)
        if daemon.instance is None:
            continue
        kind, instance = daemon.kind, daemon.instance
        shipped = (UNIT_DIR / f"disagg-{kind}.socket").read_text()
        text = _listening_at(shipped, address, port)
        text = re.sub(r"^FileDescriptorName=.*$", f"FileDescriptorName={name}", text, flags=re.M)
        text = re.sub(r"^Service=.*$", f"Service=disagg-{kind}@{instance}.service", text, flags=re.M)
        text = re.sub(r"^(Description=.*?)(,|:)", rf"\1 {instance}\2", text, count=1, flags=re.M)
        units[f"disagg-{kind}@{instance}.socket"] = text
    return units


FRONT_DOOR_SOCKET = "disagg-front-door.socket"
FRONT_DOOR_DROPIN = "front-door.conf"
FRONT_DOOR_DROPINS = ("disagg-decode-worker.service.d", "disagg-decode-worker@.service.d")


def front_door_units(deployment: Deployment) -> dict[str, str]:
    """The box's one endpoint under systemd (``decode_worker.shared_port``; empty without one): a socket unit
    (file name -> text) that every decode-worker service of this host inherits besides its own (a drop-in's
    ``Sockets=``, path relative to the unit directory). One listening socket, one backlog: each decode-worker
    accepts from it, and while one restarts the others take its connections."""
    held = deployment.held_sockets()
    if SHARED_FRONT_DOOR not in held:
        return {}
    local = [n for n in held if DaemonId.parse(n).kind == "decode-worker"]
    host, port = held[SHARED_FRONT_DOOR]
    first = DaemonId.parse(local[0])
    service = f"disagg-decode-worker@{first.instance}.service" if first.instance else "disagg-decode-worker.service"
    text = _listening_at((UNIT_DIR / "disagg-decode-worker.socket").read_text(), host, port)
    text = re.sub(r"^Description=.*$", "Description=disagg: the box's one endpoint, a socket every decode-worker "
                  "accepts on (decode_worker.shared_port), held across their restarts", text, flags=re.M)
    text = re.sub(r"^FileDescriptorName=.*$", f"FileDescriptorName={SHARED_FRONT_DOOR}", text, flags=re.M)
    # The unit systemd starts on a connection while no decode-worker runs (a socket unit names one).
    text = re.sub(r"^Service=.*$", f"Service={service}", text, flags=re.M)
    instanced = first.instance is not None
    own = "disagg-decode-worker@%i.socket" if instanced else "disagg-decode-worker.socket"
    dropin = ("# Written by `disaggctl install`: the box's one endpoint (decode_worker.shared_port).\n"
              f"[Unit]\nWants={FRONT_DOOR_SOCKET}\nAfter={FRONT_DOOR_SOCKET}\n\n"
              f"[Service]\n# Its own socket and the box's: Sockets= names every socket the service inherits.\n"
              f"Sockets={own} {FRONT_DOOR_SOCKET}\n")
    return {FRONT_DOOR_SOCKET: text, f"{FRONT_DOOR_DROPINS[int(instanced)]}/{FRONT_DOOR_DROPIN}": dropin}


def _front_door_files(unit_dir: Path) -> list[Path]:
    """The box's endpoint units installed in ``unit_dir`` (to replace or remove)."""
    return [p for p in (unit_dir / FRONT_DOOR_SOCKET, *(unit_dir / d / FRONT_DOOR_DROPIN for d in FRONT_DOOR_DROPINS))
            if p.exists()]


def _remove_front_door_file(prefix: Path, path: Path, why: str = "") -> list[Action]:
    """Remove one of the box's endpoint units: its socket (stopped first, like an instance's) or the drop-in."""
    if path.suffix == ".socket":
        return _remove_instance_socket(prefix, path, f"remove unit{why}")
    return [Action(f"remove drop-in{why}", path)]


def _this_host(config: Config) -> Deployment:
    """The deployment whose units this host gets: this host's in a cluster (every host's, where it cannot tell which
    it is)."""
    try:
        return Deployment.on_host(config)
    except ConfigError:
        log.warning("cannot tell which host of the cluster this is: socket units for every host's instances")
        return Deployment(config, every_host=True)


def _systemd_here(prefix: Path) -> bool:
    """Does the install target the running system's systemd (not a staged --prefix)?"""
    return prefix == Path("/") and shutil.which("systemctl") is not None and Path("/run/systemd/system").exists()


def _remove_instance_socket(prefix: Path, unit: Path, what: str) -> list[Action]:
    """Remove an instance's socket unit, stopped first where systemd runs it (a loaded socket unit keeps its port
    after its file is gone)."""
    stop = [Action("stop", command=["systemctl", "disable", "--now", unit.name])] if _systemd_here(prefix) else []
    return [*stop, Action(what, unit)]


def _load(path: Path) -> Config:
    from daemons.config import load_config

    return load_config(path, require_model=False)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def plan_install(prefix: Path, config: Path | None, bin_dir: str) -> list[Action]:
    actions: list[Action] = []
    if prefix == Path("/") and not _user_exists(USER):  # a staged --prefix gets no user
        actions.append(Action("create system user", command=[
            "useradd", "--system", "--home-dir", "/var/lib/disagg", "--no-create-home",
            "--shell", "/usr/sbin/nologin", "--user-group", USER]))
    # The units are rendered from the config the daemons will read: the one given, else the one installed here
    # before (an operator's edits: a new port, a longer drain), else the shipped GPU example written below. A config
    # that does not load stops the install (ConfigError): a socket unit with a guessed address could listen on
    # every interface while the config says loopback.
    installed = prefix / "etc/disagg/disagg.yaml"
    loaded = _this_host(_load(config or (installed if installed.exists() else REPO_ROOT / "etc" / "disagg-gpu.yaml")))
    for unit in unit_files():
        target = prefix / "etc/systemd/system" / unit.name
        content = render_unit(unit, bin_dir, loaded)
        if not target.exists() or target.read_text() != content:
            actions.append(Action("write unit", target, content))
    # One socket unit per instance (the template services want theirs); those of instances no longer in the config go.
    sockets = instance_sockets(loaded)
    unit_dir = prefix / "etc/systemd/system"
    for name, content in sockets.items():
        target = unit_dir / name
        if not target.exists() or target.read_text() != content:
            actions.append(Action("write unit (an instance's socket)", target, content))
    for stale in sorted(unit_dir.glob(INSTANCE_SOCKET_GLOB)) if unit_dir.exists() else ():
        if stale.name not in sockets:
            actions += _remove_instance_socket(prefix, stale, "remove unit (an instance no longer in the config)")
    # The box's one endpoint (decode_worker.shared_port): its socket unit and the decode-workers' drop-in.
    front = front_door_units(loaded)
    for name, content in front.items():
        target = unit_dir / name
        if not target.exists() or target.read_text() != content:
            actions.append(Action("write unit (the box's endpoint)", target, content))
    for stale in _front_door_files(unit_dir):
        if str(stale.relative_to(unit_dir)) not in front:
            actions += _remove_front_door_file(prefix, stale, " (no decode_worker.shared_port now)")
    actions += plan_cluster_dropins(prefix, config or (installed if installed.exists() else None))
    cfg_target = prefix / "etc/disagg/disagg.yaml"
    if not cfg_target.exists():
        source = config or (REPO_ROOT / "etc" / "disagg-gpu.yaml")
        actions.append(Action(f"write config (from {source})", cfg_target, Path(source).read_text()))
    defaults = prefix / "etc/default/disagg"
    if not defaults.exists():  # EnvironmentFile=: it may hold DISAGG_API_KEYS
        actions.append(Action("write defaults (root only)", defaults, DEFAULTS_TEXT, mode=0o600))
    elif defaults.stat().st_mode & 0o077:
        actions.append(Action(f"restrict to root (it may hold DISAGG_API_KEYS; was {defaults.stat().st_mode & 0o777:o})",
                              defaults, mode=0o600, chmod_only=True))
    keys = prefix / API_KEYS_PATH.relative_to("/")
    if not keys.exists():
        # The shipped GPU config serves beyond loopback and names this file: never without a key.
        actions.append(Action("write a new API key (give it to clients; add lines to rotate)", keys,
                              API_KEYS_HEADER + secrets.token_urlsafe(32) + "\n", mode=0o640,
                              group=USER if prefix == Path("/") else None))
    if actions and prefix == Path("/") and shutil.which("systemctl") and Path("/run/systemd/system").exists():
        actions.append(Action("reload systemd", command=["systemctl", "daemon-reload"]))
    return actions


DROPIN = "cluster.conf"


def cluster_dropin(private_network: str) -> str:
    return ("# Written by `disaggctl install` from the config's cluster section: the LMCache request, P2P and\n"
            "# coordinator ports and the prefill API talk to the other hosts on this network only.\n"
            f"[Service]\nIPAddressAllow={private_network}\n")


NFT_PATH = Path("/etc/disagg/disagg-cluster.nft")


def cluster_nftables(config: Config) -> str:
    """nftables rules that fence the ports our daemons and LMCache open on the private network to the cluster's own
    hosts (LMCache's have no authentication: a host that can write a chunk there can make answers wrong)."""
    cluster = config.cluster
    assert cluster is not None
    ports = sorted({config.lmcache.port, cluster.p2p_port, cluster.coordinator_port,
                    *(w.port for w in config.workers("prefill-worker").values())})
    hosts = sorted({h.address for h in cluster.hosts.values()})
    family = "ipv6_addr" if any(":" in a for a in hosts) else "ipv4_addr"
    saddr = "ip6 saddr" if family == "ipv6_addr" else "ip saddr"
    return (
        "# Written by `disaggctl install` from the config's cluster section. Load it on every host:\n"
        f"#   nft -f {NFT_PATH}\n"
        "# Only the cluster's hosts reach LMCache's request, P2P and coordinator ports and the prefill API; the\n"
        "# transfer engine (Mooncake, NIXL) may open more ports of its own: see docs/security.md.\n"
        "table inet disagg {\n"
        f"  set cluster_hosts {{ type {family}; elements = {{ {', '.join(hosts)} }} }}\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        '    iifname "lo" accept\n'
        f"    tcp dport {{ {', '.join(map(str, ports))} }} {saddr} != @cluster_hosts drop\n"
        "  }\n"
        "}\n")


def plan_cluster_dropins(prefix: Path, config: Path | None) -> list[Action]:
    """Several hosts: let the units that are confined to localhost reach the cluster's private network; the
    cluster's secret (a new one, where there is none: copy it to the other hosts) and the firewall rules."""
    if config is None:
        return []
    from daemons.config import load_config

    loaded = load_config(config, require_model=False)
    cluster = loaded.cluster
    if cluster is None:
        return []
    actions = []
    path = Path(cluster.secret_file or "/etc/disagg/cluster-secret")
    secret = prefix / path.relative_to("/") if path.is_absolute() else prefix / path
    if not secret.exists():
        actions.append(Action("write a new cluster secret (copy this file to every other host)", secret,
                              secrets.token_hex(32) + "\n", mode=0o640, group=USER if prefix == Path("/") else None))
    nft = prefix / NFT_PATH.relative_to("/")
    rules = cluster_nftables(loaded)
    if not nft.exists() or nft.read_text() != rules:
        actions.append(Action(f"write firewall rules (load them: nft -f {NFT_PATH})", nft, rules))
    for unit in unit_files():
        if unit.suffix != ".service" or "IPAddressDeny=any" not in unit.read_text():
            continue
        target = prefix / "etc/systemd/system" / f"{unit.name}.d" / DROPIN
        content = cluster_dropin(cluster.private_network)
        if not target.exists() or target.read_text() != content:
            actions.append(Action("write drop-in (cluster network)", target, content))
    return actions


def plan_uninstall(prefix: Path, purge: bool) -> list[Action]:
    actions: list[Action] = []
    for unit in unit_files():
        target = prefix / "etc/systemd/system" / unit.name
        if target.exists():
            actions.append(Action("remove unit", target))
        dropin = prefix / "etc/systemd/system" / f"{unit.name}.d" / DROPIN
        if dropin.exists():
            actions.append(Action("remove drop-in", dropin))
    unit_dir = prefix / "etc/systemd/system"
    for instance_socket in sorted(unit_dir.glob(INSTANCE_SOCKET_GLOB)) if unit_dir.exists() else ():
        actions += _remove_instance_socket(prefix, instance_socket, "remove unit")
    for front in _front_door_files(unit_dir) if unit_dir.exists() else ():
        actions += _remove_front_door_file(prefix, front)
    if purge:
        for path in (prefix / "etc/disagg/disagg.yaml", prefix / "etc/default/disagg",
                     prefix / API_KEYS_PATH.relative_to("/")):
            if path.exists():
                actions.append(Action("remove", path))
        if prefix == Path("/") and _user_exists(USER):
            actions.append(Action("remove system user", command=["userdel", USER]))
    if actions and prefix == Path("/") and shutil.which("systemctl") and Path("/run/systemd/system").exists():
        actions.append(Action("reload systemd", command=["systemctl", "daemon-reload"]))
    return actions


def apply(actions: list[Action], *, dry_run: bool, out: TextIO = sys.stdout) -> int:
    if not actions:
        out.write("nothing to do: already in place\n")
        return 0
    for action in actions:
        out.write(("would " if dry_run else "") + action.describe() + "\n")
        if dry_run:
            continue
        if action.command:
            subprocess.run(action.command, check=True)
        elif action.chmod_only and action.path is not None:
            os.chmod(action.path, action.mode)
        elif action.content is not None and action.path is not None:
            action.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = action.path.with_name(action.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, action.mode)
            with os.fdopen(fd, "w") as fh:
                fh.write(action.content)
            os.chmod(tmp, action.mode)
            if action.group is not None:
                shutil.chown(tmp, group=action.group)
            os.replace(tmp, action.path)
        elif action.path is not None:
            action.path.unlink()
    return 0
