"""disaggctl: the operator's tool.

  check-config     validate the config without starting anything (exit 78 if bad)
  runs-here D      exit 0 if this machine (this host of a cluster) runs daemon D
  make-model DIR   write the small local random-weight model the embedded default uses
  status           the three daemons' state at a glance (--json); exit 0 only if all ready
  wait-ready       block until all three are ready, or --timeout
  up / down        start / stop the three daemons in the background under supervisord
  restart [D...]   rolling restart under supervisord: one daemon at a time, each once all are ready again
  supervisorctl …  supervisord's own control for this config (status, tail -f D, signal HUP D, ...)
  hold-sockets     hold the workers' listening sockets across their restarts (supervisord's disagg-sockets)
  demo             up, wait, send the seed's prompt, report KV reuse and TTFT, down
  install          the systemd units, config, defaults file, API key (cluster: secret, firewall rules)
  uninstall        remove what install put in place (--purge: the config and defaults too)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemons import __version__
from daemons.config import EX_CONFIG, Config, ConfigError, check_model_present, config_path, load_config
from daemons.deployment import HOST_ID_ENV, Deployment
from daemons.edge.auth import client_key
from daemons.names import COORDINATOR, DaemonId
from daemons.ops.make_model import SHAPES, make_model
from daemons.runtime.listen import loopback_if_wildcard, url_host
from daemons.runtime.statefile import PeerView, State, assess, pid_alive, read_state, retire_dead_records

log = logging.getLogger("disaggctl")

REPO_ROOT = Path(__file__).resolve().parents[2]
SUPERVISOR_CONF = REPO_ROOT / "deploy" / "supervisor" / "disagg.conf"
SEED_PROMPT = "Hello, how are you?" * 1000


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _load(args: argparse.Namespace, *, require_model: bool = True) -> Deployment:
    """The config (--config) as this host runs it (--host-id in a cluster)."""
    config = load_config(config_path(args.config), require_model=require_model)
    return Deployment.on_host(config, getattr(args, "host_id", None))


# -- status ------------------------------------------------------------------------------
def collect_status(deployment: Deployment) -> list[PeerView]:
    """The state of each of this host's daemons, from their state files."""
    config = deployment.config
    timeout = config.readiness.heartbeat_timeout_s
    return [assess(config.runtime_dir, name, timeout) for name in deployment.daemon_names()]


def all_ready(views: list[PeerView]) -> bool:
    return all(v.ready for v in views)


def format_status(views: list[PeerView]) -> str:
    rows = [("DAEMON", "STATE", "PID", "ENDPOINT", "UP", "REASON")]
    now = time.time()
    for v in views:
        r = v.record
        up = f"{now - r.started_at:.0f}s" if r and v.state not in ("absent", "stale", "stopped") else "-"
        rows.append((v.daemon, v.state, str(r.pid) if r else "-", r.endpoint if r else "-", up, v.reason or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5] for row in rows
    )


def cmd_status(args: argparse.Namespace) -> int:
    views = collect_status(_load(args, require_model=False))
    if args.json:
        _out(json.dumps({"all_ready": all_ready(views), "daemons": [v.to_json() for v in views]}, indent=2))
    else:
        _out(format_status(views))
    return 0 if all_ready(views) else 1


def wait_ready(deployment: Deployment, timeout_s: float, *, quiet: bool = False, fail_fast: bool = False) -> bool:
    """True once all three are ready; False on timeout, or at once on a failed daemon with fail_fast."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        views = collect_status(deployment)
        if all_ready(views):
            return True
        if fail_fast and any(v.state == State.FAILED.value for v in views):
            _out(format_status(views))
            return False
        summary = ", ".join(f"{v.daemon}={v.state}" for v in views)
        if summary != last and not quiet:
            log.info("waiting: %s", summary)
            last = summary
        if time.monotonic() > deadline:
            _out(format_status(views))
            return False
        time.sleep(1.0)


def cmd_wait_ready(args: argparse.Namespace) -> int:
    deployment = _load(args, require_model=False)
    t0 = time.monotonic()
    if wait_ready(deployment, args.timeout, fail_fast=args.fail_fast):
        _out(f"all ready after {time.monotonic() - t0:.1f}s")
        return 0
    _out(f"not all ready after {args.timeout:.0f}s")
    return 1


# -- config and model ----------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args).config
    for warning in config.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    _out(f"{config.source}: OK (model {config.model.name} at {config.model.path})")
    return 0


def cmd_runs_here(args: argparse.Namespace) -> int:
    """Exit 0 if this machine runs ``args.daemon`` (always, on one box, except lmcache-coordinator; and when
    the config is not valid, so the daemon itself reports it), else 1.

    The systemd units' ExecCondition=: on a host of a cluster, the units of other hosts' daemons are
    skipped (inactive, not failed), so every host installs the same units and target."""
    try:
        deployment = _load(args, require_model=False)
    except ConfigError as exc:
        # Not this command's to judge: the daemon starts, names the problem and exits 78 (a skipped
        # unit would hide a bad config).
        _out(f"config not valid ({str(exc).splitlines()[0]}): starting {args.daemon} to report it")
        return 0
    here = args.daemon in deployment.daemon_names()
    if not here:
        where = f"host {deployment.host_id}" if deployment.host_id else "one box (no cluster section)"
        _out(f"{args.daemon} does not run on {where}")
    return 0 if here else 1


def cmd_make_model(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if (out / "config.json").exists() and not args.force:
        _out(f"{out}: a model is already there (--force to rewrite it)")
        return 0
    make_model(out, SHAPES[args.shape], weights=not args.config_only)
    _out(f"wrote {out}")
    return 0


# -- up / down under supervisord ----------------------------------------------------------------
def supervisor_env(deployment: Deployment) -> dict[str, str]:
    """supervisord's environment: the paths its config reads, and which host of a cluster this is."""
    config = deployment.config
    env = dict(os.environ)
    env.update(
        # The console scripts supervisord runs: $DISAGG_BIN where the operator names a release's (a staged install
        # switched by a symlink: docs/operations.md, "Upgrades"), else beside the python running disaggctl.
        DISAGG_BIN=os.environ.get("DISAGG_BIN") or str(Path(sys.executable).parent),
        DISAGG_CONFIG=str(config.source),
        DISAGG_RUN_DIR=str(config.runtime_dir),
        DISAGG_LOG_DIR=str(config.log_dir),
        DISAGG_STOP_WAIT_S=str(config.readiness.stop_budget_s),  # never SIGKILL a daemon in its drain
    )
    if deployment.host_id is not None:
        env[HOST_ID_ENV] = deployment.host_id  # the daemons run as this host of the cluster
    return env


def _rendered(deployment: Deployment) -> bool:
    """Does this config need a supervisord config of its own (several hosts, or worker instances)?"""
    return deployment.config.cluster is not None or any(DaemonId.parse(n).instance for n in deployment.daemon_names())


def supervisor_conf(deployment: Deployment) -> Path:
    """The supervisord config for this machine: the shipped one for one box of one worker each; else (a host of a
    cluster, worker instances) one written to the runtime dir with exactly this host's programs."""
    return deployment.config.runtime_dir / "supervisord.conf" if _rendered(deployment) else SUPERVISOR_CONF


def render_supervisor_conf(deployment: Deployment) -> str:
    """The shipped config cut to this host's daemons: lmcache-coordinator is lmcache-server's program renamed, and
    a worker instance its kind's program named after it (``prefill-worker@a``) with ``--instance a``."""
    head, *programs = SUPERVISOR_CONF.read_text().split("\n[program:")
    sections = {p.split("]", 1)[0]: "[program:" + p for p in programs}
    sections[COORDINATOR] = sections["lmcache-server"].replace("[program:lmcache-server]", f"[program:{COORDINATOR}]") \
        .replace("disagg-lmcache-server", f"disagg-{COORDINATOR}").replace("priority=10", "priority=5")
    for name in deployment.daemon_names():
        daemon = DaemonId.parse(name)
        if daemon.instance:
            sections[name] = sections[daemon.kind].replace(f"[program:{daemon.kind}]", f"[program:{name}]") \
                .replace("--config %(ENV_DISAGG_CONFIG)s\n", f"--config %(ENV_DISAGG_CONFIG)s --instance {daemon.instance}\n", 1)
    local = ["disagg-sockets", *deployment.daemon_names()]
    return head.rstrip() + "\n\n" + "\n".join(sections[name].rstrip() + "\n" for name in local if name in sections)


def _supervisord_pid(config: Config) -> int | None:
    try:
        pid = int((config.runtime_dir / "supervisord.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


# supervisorctl's own calls that return at once (status, start: supervisord's startsecs, 10 s, then RUNNING).
SUPERVISORCTL_TIMEOUT_S = 120.0


def supervisorctl(deployment: Deployment, *words: str, conf: Path | None = None,
                  timeout_s: float = SUPERVISORCTL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "supervisorctl")
    conf = conf or supervisor_conf(deployment)
    return subprocess.run(
        [exe, "-c", str(conf), *words], env=supervisor_env(deployment), capture_output=True, text=True, timeout=timeout_s
    )


def up(deployment: Deployment, conf: Path | None = None) -> int:
    """Start supervisord with this host's programs (the held sockets' first), in the background."""
    config = deployment.config
    check_model_present(config)
    if _supervisord_pid(config):
        _out(f"already running (supervisord pid {_supervisord_pid(config)})")
        return 0
    config.runtime_dir.mkdir(parents=True, exist_ok=True)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    # What the previous run left (a failed record of a dead pid) must not be read as this run's.
    for daemon in retire_dead_records(config.runtime_dir, deployment.daemon_names()):
        log.info("%s: the previous run's state file moved aside (%s.json.last)", daemon, daemon)
    if conf is None:
        conf = supervisor_conf(deployment)
        if _rendered(deployment):
            conf.write_text(render_supervisor_conf(deployment))
    exe = str(Path(sys.executable).parent / "supervisord")
    proc = subprocess.run([exe, "-c", str(conf)], env=supervisor_env(deployment), capture_output=True, text=True)
    if proc.returncode != 0:
        _out(f"supervisord failed to start: {proc.stderr.strip() or proc.stdout.strip()}")
        return 1
    where = f" on host {deployment.host_id}" if deployment.host_id else ""
    _out(f"started {', '.join(deployment.daemon_names())}{where} under supervisord (logs in {config.log_dir})")
    return 0


def down(deployment: Deployment, conf: Path | None = None, timeout_s: float = 180.0) -> int:
    """Shut supervisord down (each daemon drains first); SIGKILL to its group past ``timeout_s``."""
    pid = _supervisord_pid(deployment.config)
    if pid is None:
        _out("not running")
        return 0
    supervisorctl(deployment, "shutdown", conf=conf)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        _out(f"supervisord (pid {pid}) still running after {timeout_s:.0f}s; sending SIGKILL to its group")
        os.killpg(os.getpgid(pid), signal.SIGKILL)
        return 1
    _out("stopped")
    return 0


def restart(deployment: Deployment, names: list[str], timeout_s: float = 900.0) -> int:
    """A rolling restart under supervisord: each daemon in turn (dependencies first), waiting after each until
    every daemon is ready again — decode-worker's ready means its canary passed: the KV path is back —
    before the next. Its held socket keeps decode-worker's clients in the backlog meanwhile."""
    config = deployment.config
    unknown = sorted(set(names) - set(deployment.daemon_names()))
    if unknown:
        _out(f"not a daemon of this host: {', '.join(unknown)} (these are: {', '.join(deployment.daemon_names())})")
        return 2
    for name in [n for n in deployment.daemon_names() if not names or n in names]:
        before = read_state(config.runtime_dir, name)
        t0 = time.monotonic()
        _out(f"restarting {name}")
        # Stop and start as two calls, the stop's client waiting as long as supervisord may (the daemon's drain:
        # readiness.stop_budget_s, rendered into stopwaitsecs): `supervisorctl restart` under one client timeout
        # was killed between its stop and its start once a drain took longer, leaving the daemon stopped.
        try:
            stop = supervisorctl(deployment, "stop", name, timeout_s=config.readiness.stop_budget_s + 30)
        except subprocess.TimeoutExpired:
            _out(f"{name} did not stop within {config.readiness.stop_budget_s + 30}s (its stop budget and a margin): "
                 "stopping the rolling restart; `disaggctl supervisorctl status` says where it is")
            return 1
        if stop.returncode != 0 and "not running" not in stop.stdout.lower():
            _out(f"supervisorctl stop {name} failed: {(stop.stdout + stop.stderr).strip()}")
            return 1
        proc = supervisorctl(deployment, "start", name)
        if proc.returncode != 0 or "ERROR" in proc.stdout:
            _out(f"supervisorctl start {name} failed: {(proc.stdout + proc.stderr).strip()}")
            return 1
        deadline = time.monotonic() + timeout_s
        while True:  # the new process's record first (the old one may still read ready for a heartbeat)
            now = read_state(config.runtime_dir, name)
            if now is not None and (before is None or now.pid != before.pid):
                break
            if time.monotonic() > deadline:
                _out(f"{name} wrote no record of a new process within {timeout_s:.0f}s")
                return 1
            time.sleep(0.5)
        if not wait_ready(deployment, max(1.0, deadline - time.monotonic()), quiet=True):
            _out(f"not all ready {timeout_s:.0f}s after restarting {name}: stopping the rolling restart")
            return 1
        _out(f"{name} restarted; all ready, the KV path back, after {time.monotonic() - t0:.1f}s")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    return restart(_load(args), list(args.daemons), args.timeout)


def cmd_supervisorctl(args: argparse.Namespace) -> int:
    """supervisorctl for the supervisord `disaggctl up` started, from any shell; its output and exit status."""
    deployment = _load(args, require_model=False)
    exe = str(Path(sys.executable).parent / "supervisorctl")
    words = list(args.words) or ["status"]
    # No deadline: an operator's `stop` or `restart` waits as long as a drain may (supervisord's stopwaitsecs), and
    # `tail -f` until interrupted; a client killed between stop and start would leave the daemon stopped.
    return subprocess.run([exe, "-c", str(supervisor_conf(deployment)), *words], env=supervisor_env(deployment)).returncode


def cmd_up(args: argparse.Namespace) -> int:
    return up(_load(args))


def cmd_down(args: argparse.Namespace) -> int:
    return down(_load(args, require_model=False))


# -- demo ---------------------------------------------------------------------------------------
def ask(base_url: str, model: str, prompt: str, max_tokens: int, timeout_s: float = 600.0,
        api_key: str | None = None) -> dict[str, Any]:
    """Stream one completion; returns text, usage, TTFT and the path it took."""
    import httpx

    from daemons.ops.openai_client import complete, completion_body

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        got = complete(client, base_url, completion_body(model, prompt, max_tokens), headers=headers)
    if got.status != 200:
        raise RuntimeError(f"front door answered {got.status}: {got.body.decode(errors='replace')[:300]}")
    return {
        "text": got.text,
        "prompt_tokens": got.prompt_tokens,
        "cached_tokens": got.cached_tokens,
        "ttft_s": got.ttft_s,
        "e2e_s": time.perf_counter() - got.t0,
        "path": got.path or "?",
        "fallback_reason": got.reason,
    }


def cmd_hold_sockets(args: argparse.Namespace) -> int:
    from daemons.ops.socket_holder import hold

    return hold(_load(args, require_model=False))


def cmd_demo(args: argparse.Namespace) -> int:
    deployment = _load(args, require_model=False)
    config = deployment.config
    if not (config.model.path / "config.json").exists():
        _out(f"making the local model at {config.model.path}")
        make_model(config.model.path)
    check_model_present(config)
    t0 = time.monotonic()
    if up(deployment) != 0:
        return 1
    try:
        if not wait_ready(deployment, args.timeout, fail_fast=False):
            _out(f"the daemons were not ready after {args.timeout:.0f}s; logs are in {config.log_dir}")
            return 1
        _out(f"all three daemons ready after {time.monotonic() - t0:.1f}s")
        dw = config.decode_worker
        host = url_host(loopback_if_wildcard(dw.host))
        result = ask(f"http://{host}:{dw.port}", config.model.name, SEED_PROMPT, args.max_tokens,
                     api_key=client_key(dw.api_keys_file))
        _out(f"prompt: {SEED_PROMPT[:19]!r} x 1000")
        _out(f"generated: {result['text']!r}")
        computed = int(result["prompt_tokens"]) - int(result["cached_tokens"])
        _out(
            f"path: {result['path']}{' (' + str(result['fallback_reason']) + ')' if result['fallback_reason'] else ''}; "
            f"prompt tokens from LMCache: {result['cached_tokens']}, computed by decode: {computed}"
        )
        _out(f"prompt_tokens={result['prompt_tokens']} cached_tokens={result['cached_tokens']} "
             f"ttft_s={float(result['ttft_s']):.3f}")
        return 0
    finally:
        if not args.keep:
            down(deployment)


def cmd_install(args: argparse.Namespace) -> int:
    from daemons.ops.install import apply, plan_install

    bin_dir = args.bin_dir or str(Path(sys.executable).parent)
    config = Path(args.config) if args.config else None
    try:
        actions = plan_install(Path(args.prefix), config, bin_dir)
    except ConfigError as exc:
        _out(f"install: {exc}\nnothing written: the units are rendered from the config (fix it, then install again)")
        return EX_CONFIG
    return apply(actions, dry_run=args.dry_run)


def cmd_uninstall(args: argparse.Namespace) -> int:
    from daemons.ops.install import apply, plan_uninstall

    return apply(plan_uninstall(Path(args.prefix), args.purge), dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    """disaggctl's command line (the docs' command lines are checked against it: tests/unit/test_docs_commands.py)."""
    parser = argparse.ArgumentParser(prog="disaggctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--config", help="config file (default: $DISAGG_CONFIG or etc/disagg.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("check-config", help="validate the config").set_defaults(func=cmd_check_config)
    p = sub.add_parser("runs-here", help="exit 0 if this host runs DAEMON (systemd's ExecCondition=)")
    p.add_argument("daemon")
    p.set_defaults(func=cmd_runs_here)
    p = sub.add_parser("make-model", help="write a small local random-weight model")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true")
    p.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    p.add_argument("--config-only", action="store_true",
                   help="write config and tokenizer, no weights (use with model.load_format: dummy)")
    p.set_defaults(func=cmd_make_model)
    p = sub.add_parser("status", help="state of the three daemons")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("wait-ready", help="wait until all three daemons are ready")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--fail-fast", action="store_true",
                   help="give up as soon as a daemon is failed (without a supervisor restarting it)")
    p.set_defaults(func=cmd_wait_ready)
    sub.add_parser("up", help="start the daemons under supervisord").set_defaults(func=cmd_up)
    p = sub.add_parser("restart", help="rolling restart under supervisord: one daemon at a time, each waiting for "
                       "the KV path to be back before the next")
    p.add_argument("daemons", nargs="*", help="which (default: all of this host's, dependencies first)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds each may take to be ready again")
    p.set_defaults(func=cmd_restart)
    sub.add_parser("hold-sockets", help="hold the workers' listening sockets across their restarts (supervisord's "
                   "disagg-sockets program)").set_defaults(func=cmd_hold_sockets)
    sub.add_parser("down", help="stop them").set_defaults(func=cmd_down)
    p = sub.add_parser("supervisorctl", help="supervisord's own control for this config's supervisord (the shipped "
                       "conf needs variables a shell does not have: this passes them): status, tail -f NAME, ...")
    p.add_argument("words", nargs=argparse.REMAINDER, help="supervisorctl's command and arguments")
    p.set_defaults(func=cmd_supervisorctl)
    p = sub.add_parser("demo", help="start, send the seed's prompt, report, stop")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for readiness")
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--keep", action="store_true", help="leave the daemons running")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("install", help="install the systemd units, config, defaults file and user")
    p.add_argument("--prefix", default="/")
    p.add_argument("--bin-dir", help="where the disagg-* scripts are (default: this Python's bin/)")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_install)
    p = sub.add_parser("uninstall", help="remove what install put in place")
    p.add_argument("--prefix", default="/")
    p.add_argument("--purge", action="store_true", help="also the config, defaults file and user")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_uninstall)

    parser.add_argument("--host-id", help="on several hosts: which host of cluster.hosts this is (default: "
                        "$DISAGG_HOST_ID, else the host whose address this machine has)")
    # Subcommand options may also carry --config and --host-id.
    for action in sub.choices.values():
        action.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        action.add_argument("--host-id", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s disaggctl: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for line in str(exc).splitlines():
            sys.stderr.write(f"bad config: {line}\n")
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
