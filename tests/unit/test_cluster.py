"""Several hosts: the cluster section, which host this is, the commands it derives, readiness over
HTTP and who is blamed when KV does not cross hosts. Fakes only (no engines, no namespaces)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from daemons.children.engine import kv_transfer_config
from daemons.config import ConfigError, load_config
from daemons.decode_worker import p2p_peers
from daemons.deployment import Deployment
from daemons.kv.canary import CanaryResult
from daemons.lmcache_coordinator import coordinator_argv
from daemons.lmcache_server import lmcache_argv
from daemons.runtime.digest import config_digest
from daemons.runtime.remote_state import judge, state_route
from daemons.runtime.statefile import PeerView, StateRecord
from daemons.runtime.states import State

REPO = Path(__file__).resolve().parents[2]


def doc(model_dir: Path, **cluster_overrides: object) -> dict:
    d = yaml.safe_load((REPO / "etc" / "disagg.yaml").read_text())
    d["model"]["path"] = str(model_dir)
    (model_dir / "cluster-secret").write_text("a-cluster-secret-for-tests\n")
    d["cluster"] = {
        "private_network": "10.9.0.0/24",
        "secret_file": str(model_dir / "cluster-secret"),
        "hosts": {
            "p1": {"address": "10.9.0.2", "daemons": ["lmcache-server", "prefill-worker"]},
            "d1": {"address": "10.9.0.1", "daemons": ["lmcache-coordinator", "lmcache-server", "decode-worker"]},
        },
        **cluster_overrides,
    }
    return d


def load(tmp_path: Path, d: dict):
    p = tmp_path / "disagg.yaml"
    p.write_text(yaml.safe_dump(d))
    return load_config(p)


def error_of(tmp_path: Path, d: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, d)
    return str(exc.value)


def test_each_host_runs_only_its_daemons_and_binds_its_private_address(tmp_path, model_dir):
    config = load(tmp_path, doc(model_dir))
    prefill, decode = Deployment.on_host(config, "p1"), Deployment.on_host(config, "d1")
    assert prefill.daemon_names() == ["lmcache-server", "prefill-worker"]
    assert decode.daemon_names() == ["lmcache-coordinator", "lmcache-server", "decode-worker"]
    assert prefill.lmcache_address == "10.9.0.2" and decode.lmcache_address == "10.9.0.1"
    # The decode host reaches the prefill API at the prefill host's address; LMCache's HTTP API stays on loopback.
    assert decode.address_of("prefill-worker") == "10.9.0.2" and not decode.is_local("prefill-worker")
    argv = lmcache_argv(prefill, "p1.abc")
    options = argv[argv.index("server") + 1:]  # LMCache's CLI: `<python> -P -m <wrapper> server --flag value ...`
    flags = dict(zip(options[0::2], options[1::2], strict=True))
    assert flags["--host"] == "10.9.0.2" and flags["--http-host"] == "127.0.0.1"
    assert flags["--coordinator-url"] == "http://10.9.0.1:9300"
    assert flags["--p2p-advertise-url"] == "10.9.0.2:8555" and flags["--instance-id"] == "p1.abc"
    assert flags["--p2p-transfer-engine"] == "mooncake_te"
    assert kv_transfer_config(prefill, "kv_producer")["kv_connector_extra_config"]["lmcache.mp.host"] == \
        "tcp://10.9.0.2"
    assert coordinator_argv(decode)[4:8] == ["--host", "10.9.0.1", "--port", "9300"]
    # One box: nothing changes.
    one = load(tmp_path, {k: v for k, v in doc(model_dir).items() if k != "cluster"})
    assert Deployment.on_host(one) == Deployment(one) and "--coordinator-url" not in lmcache_argv(Deployment(one))


def test_the_digest_spans_hosts(tmp_path, model_dir):
    a = load(tmp_path, doc(model_dir))
    b = load(tmp_path, doc(model_dir))
    assert config_digest(a) == config_digest(b)  # the file's, whichever host reads it
    other = load(tmp_path, doc(model_dir, p2p_port=8600))
    assert config_digest(other) != config_digest(b)  # a host with another layout is told apart


def test_a_clusters_config_runs_as_one_host_unless_every_host_is_asked_for(tmp_path, model_dir):
    """Without a host a cluster's deployment would give LMCache `--instance-id None` and the one-box supervisord
    config: refused; `disaggctl install` asks for every host's units where it cannot tell which host it is on."""
    config = load(tmp_path, doc(model_dir))
    with pytest.raises(ValueError, match="runs as one of its hosts"):
        Deployment(config)
    with pytest.raises(ValueError, match="no host 'x1'"):
        Deployment(config, "x1")
    every = Deployment(config, every_host=True)
    assert every.daemon_names() == ["lmcache-coordinator", "lmcache-server", "prefill-worker", "decode-worker"]
    assert set(every.held_sockets()) == {"prefill-worker", "decode-worker"}


def test_which_host_from_flag_env_or_local_address(tmp_path, model_dir, monkeypatch):
    config = load(tmp_path, doc(model_dir))
    monkeypatch.delenv("DISAGG_HOST_ID", raising=False)
    with pytest.raises(ConfigError, match="cannot tell which host"):
        Deployment.on_host(config)  # neither 10.9.0.1 nor 10.9.0.2 is this machine's
    monkeypatch.setenv("DISAGG_HOST_ID", "d1")
    assert Deployment.on_host(config).host_id == "d1"
    with pytest.raises(ConfigError, match="no host 'x1'"):
        Deployment.on_host(config, "x1")
    d = doc(model_dir)
    d["cluster"]["hosts"]["d1"]["address"] = "10.9.0.1"
    d["cluster"]["private_network"] = "10.9.0.0/24"
    monkeypatch.delenv("DISAGG_HOST_ID")
    import daemons.deployment

    monkeypatch.setattr(daemons.deployment, "local_addresses", lambda cands: ["10.9.0.2"])
    assert Deployment.on_host(load(tmp_path, d)).host_id == "p1"


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(private_network="8.8.8.0/24"), "not a private network"),
    (lambda c: c.update(private_network="0.0.0.0/0"), "not a private network"),
    (lambda c: c["hosts"]["p1"].update(address="10.8.0.2"), "not in private_network"),
    (lambda c: c["hosts"]["p1"].update(address="127.0.0.1"), "cannot be reached from another host"),
    (lambda c: c["hosts"]["p1"].update(daemons=["prefill-worker"]), "runs its own lmcache-server"),
    (lambda c: c["hosts"]["p1"].update(daemons=["lmcache-server", "prefill-worker", "decode-worker"]),
     "decode-worker already runs on"),
    (lambda c: c["hosts"]["d1"].update(daemons=["lmcache-server", "decode-worker"]),
     "exactly one host runs lmcache-coordinator"),
    (lambda c: c["hosts"]["p1"].update(daemons=["lmcache-server", "prefil-worker"]), "unknown daemon"),
    (lambda c: c["hosts"]["p1"].update(daemons=["lmcache-server"]), "no host runs prefill-worker"),
    (lambda c: c["hosts"]["p1"].update(address="10.9.0.1"), "same address"),
])
def test_bad_cluster_layouts_are_config_errors(tmp_path, model_dir, change, message):
    d = doc(model_dir)
    change(d["cluster"])
    assert message in error_of(tmp_path, d)


def test_a_daemon_refuses_to_run_on_a_host_that_does_not_run_it(tmp_path, model_dir, monkeypatch):
    from daemons.decode_worker import DecodeWorker
    from daemons.runtime.cli import run_daemon

    d = doc(model_dir)
    d["runtime_dir"] = str(tmp_path / "run")
    path = tmp_path / "disagg.yaml"
    path.write_text(yaml.safe_dump(d))
    assert run_daemon(DecodeWorker, ["--config", str(path), "--host-id", "p1"]) == 78


def test_supervisord_config_holds_only_this_hosts_programs(tmp_path, model_dir):
    from daemons.ops.ctl import render_supervisor_conf

    config = load(tmp_path, doc(model_dir))
    prefill = render_supervisor_conf(Deployment.on_host(config, "p1"))
    decode = render_supervisor_conf(Deployment.on_host(config, "d1"))
    assert "[program:prefill-worker]" in prefill and "[program:decode-worker]" not in prefill
    assert "[program:lmcache-coordinator]" not in prefill
    assert "[program:lmcache-coordinator]" in decode and "disagg-lmcache-coordinator --config" in decode
    assert "[program:prefill-worker]" not in decode and "[supervisord]" in decode


def record(state: State = State.READY, digest: str = "abc", daemon: str = "prefill-worker") -> StateRecord:
    return StateRecord(daemon=daemon, pid=42, state=state, endpoint="10.9.0.2:8100", metrics="127.0.0.1:9101",
                       config_digest=digest, version="0", started_at=1.0, heartbeat=time.time())


@pytest.mark.parametrize("answer, usable, says", [
    ({"record": record().to_json(), "heartbeat_age_s": 1.0}, True, ""),
    ({"record": record().to_json(), "heartbeat_age_s": 60.0}, False, "60s old"),
    ({"record": record(digest="zzz").to_json(), "heartbeat_age_s": 1.0}, False, "differs from ours"),
    ({"record": record(State.LOADING).to_json(), "heartbeat_age_s": 1.0}, False, ""),
    ({"record": record(State.FAILED).to_json(), "heartbeat_age_s": 1.0}, False, "failed"),
    ({"record": record(daemon="decode-worker").to_json(), "heartbeat_age_s": 1.0}, False, "answers as"),
    ({"record": {"daemon": "prefill-worker"}, "heartbeat_age_s": 1.0}, False, "not a valid"),
    ([1, 2], False, "not a valid"),
])
def test_a_remote_peer_is_judged_by_the_local_rules(answer, usable, says):
    view = judge("prefill-worker", answer, 15.0, "abc")
    assert view.usable is usable and says in view.reason


def test_the_state_route_serves_the_last_record_with_its_age():
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    last = None
    app = Starlette(routes=[state_route(lambda: last)])
    with TestClient(app) as client:
        assert client.get("/disagg/state").status_code == 503
        last = (record(), time.monotonic() - 3.0)
        body = client.get("/disagg/state").json()
    assert body["record"]["daemon"] == "prefill-worker" and 2.5 < body["heartbeat_age_s"] < 10


def view_with_p2p(peers: list[str]) -> PeerView:
    rec = record(daemon="lmcache-server")
    rec.details["p2p"] = {"state": "registered", "peers": peers}
    return PeerView("lmcache-server", "ready", True, "", rec)


def test_kv_that_does_not_cross_hosts_is_blamed_on_the_link_only_without_a_p2p_peer(tmp_path, model_dir):
    from daemons.decode_worker import DecodeWorker

    assert p2p_peers(view_with_p2p(["p1.18c0ffee"])) == {"p1"}
    d = doc(model_dir)
    d["runtime_dir"] = str(tmp_path / "run")
    d["log_dir"] = str(tmp_path / "log")
    worker = DecodeWorker(load(tmp_path, d), host_id="d1")
    assert worker.remote_prefills == {"prefill-worker": "p1"}
    assert worker.peers.remote == {"prefill-worker": "http://10.9.0.2:8100/disagg/state"}
    missed = CanaryResult(False, "decode_load", "0 of 256 tokens loaded", 256)
    worker.peers.views["lmcache-server"] = view_with_p2p([])
    assert worker._blame_p2p("prefill-worker", missed).hop == "p2p_fetch"
    worker.peers.views["lmcache-server"] = view_with_p2p(["p1.1"])
    assert worker._blame_p2p("prefill-worker", missed).hop == "decode_load"  # the link is there: decode's fault
    ok = CanaryResult(True, expected=256, cached=256)
    assert worker._blame_p2p("prefill-worker", ok) is ok


def test_install_lets_confined_units_reach_the_private_network(tmp_path, model_dir):
    from daemons.ops.install import plan_install

    path = tmp_path / "disagg.yaml"
    path.write_text(yaml.safe_dump(doc(model_dir)))
    actions = plan_install(tmp_path / "root", path, "/x/bin")
    dropins = {a.path.parent.name: a.content for a in actions if a.path is not None and a.path.name == "cluster.conf"}
    assert "disagg-lmcache-server.service.d" in dropins and "disagg-prefill-worker.service.d" in dropins
    assert all("IPAddressAllow=10.9.0.0/24" in c for c in dropins.values())
    units = {a.path.name: a.content for a in actions if a.path is not None and a.path.suffix == ".service"}
    assert "runs-here lmcache-coordinator" in units["disagg-lmcache-coordinator.service"]
    assert "ExecCondition=/x/bin/disaggctl" in units["disagg-prefill-worker.service"]


def test_runs_here_decides_which_units_start(tmp_path, model_dir, capsys):
    from daemons.ops.ctl import main

    path = tmp_path / "disagg.yaml"
    path.write_text(yaml.safe_dump(doc(model_dir)))
    assert main(["--config", str(path), "--host-id", "p1", "runs-here", "prefill-worker"]) == 0
    assert main(["--config", str(path), "--host-id", "p1", "runs-here", "decode-worker"]) == 1
    assert "does not run on host p1" in capsys.readouterr().out
    assert main(["--config", str(path), "--host-id", "d1", "runs-here", "lmcache-coordinator"]) == 0
    one = {k: v for k, v in doc(model_dir).items() if k != "cluster"}
    path.write_text(yaml.safe_dump(one))
    assert main(["--config", str(path), "runs-here", "decode-worker"]) == 0
    assert main(["--config", str(path), "runs-here", "lmcache-coordinator"]) == 1
    path.write_text("model: [")  # a bad config is the daemon's to report (exit 78), not a skipped unit
    assert main(["--config", str(path), "runs-here", "decode-worker"]) == 0


def test_the_shipped_cluster_example_is_valid():
    config = load_config(REPO / "etc" / "disagg-cluster.yaml", require_model=False)
    assert Deployment.on_host(config, "gpu-a").daemon_names() == ["lmcache-server", "prefill-worker"]
    assert Deployment.on_host(config, "gpu-b").daemon_names() == ["lmcache-coordinator", "lmcache-server", "decode-worker"]
    assert config.cluster is not None and config.cluster.p2p_transfer_engine == "nixl"


def test_a_peer_host_back_as_a_new_lmcache_instance_restarts_this_hosts_lmcache(tmp_path, model_dir):
    """LMCache keeps its transfer channel to a peer by address: a prefill host whose LMCache restarted (a new
    instance id, the same address) is read through a dead channel until the decode host's LMCache restarts too.
    Only the reading side restarts (no ping-pong), and only once the old instance is no longer listed."""
    from daemons.lmcache_server import LMCacheServer

    d = doc(model_dir)
    d["runtime_dir"] = str(tmp_path / "run")
    d["log_dir"] = str(tmp_path / "log")
    server = LMCacheServer(load(tmp_path, d), host_id="d1")
    assert server.instance_id.startswith("d1.")
    assert server.replaced_peers(["p1.18c0ffee"]) == ""  # the first one seen
    assert server.replaced_peers(["p1.18c0ffee"]) == ""  # the same
    # The new instance registers while the old one is still listed: not yet (dropping the old adapter would
    # close the channel a new process shares with the new one).
    assert server.replaced_peers(["p1.18c0ffee", "p1.18c0fff0"]) == ""
    assert server.replaced_peers(["p1.18c0fff0"]) == "p1 (p1.18c0ffee -> p1.18c0fff0)"
    assert server.replaced_peers(["p1.18c0fff0"]) == ""  # no news
    assert server.replaced_peers(["p1.18c0ffee"]) == ""  # an older one listed again: not a restart
    argv = server.child.argv
    assert argv[argv.index("--instance-id") + 1] == server.instance_id
    # The prefill host does not read KV from the decode host: a restarted decode host is no news there.
    prefill = LMCacheServer(load(tmp_path, d), host_id="p1")
    assert prefill.replaced_peers(["d1.1"]) == "" and prefill.replaced_peers(["d1.2"]) == ""
    assert server.reads_from("p1") and not prefill.reads_from("d1")


def test_across_hosts_the_prefill_api_answers_only_the_clusters_daemons(tmp_path, model_dir):
    """(issue 30.10) On the private network anyone could call the prefill API (its /whole route generates whole
    answers) past the front door's keys and admission. Now a call without the cluster's secret is 401; decode-worker's
    clients carry it (its failover and migration pool, its probes and canary, its remote state reads)."""
    import asyncio

    import httpx

    from daemons.decode_worker import DecodeWorker
    from daemons.edge.cluster_auth import HEADER
    from daemons.prefill_worker import PrefillWorker

    d = doc(model_dir)
    d["runtime_dir"], d["log_dir"] = str(tmp_path / "run"), str(tmp_path / "log")
    prefill = PrefillWorker(load(tmp_path, d), host_id="p1")
    decode = DecodeWorker(load(tmp_path, d), host_id="d1")
    secret = (model_dir / "cluster-secret").read_text().strip()

    async def ask(headers: dict[str, str], path: str) -> int:
        transport = httpx.ASGITransport(prefill.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://p1") as client:
            if path == "/disagg/state":
                return (await client.get(path, headers=headers)).status_code
            return (await client.post(path, json={"model": "m", "prompt": "x"}, headers=headers)).status_code

    for path in ("/v1/completions", "/whole/v1/completions", "/disagg/state"):
        assert asyncio.run(ask({}, path)) == 401
        assert asyncio.run(ask({HEADER: "wrong-but-long-enough-secret"}, path)) == 401
    assert asyncio.run(ask({}, "/health")) != 401  # probes stay open
    # With the secret the call gets past the gate (to the engine, which does not run here).
    assert asyncio.run(ask({HEADER: secret}, "/disagg/state")) != 401
    assert decode.http.headers[HEADER] == secret and decode.upstream.headers == {HEADER: secret}
    assert decode.peers.remote_headers == {HEADER: secret}


def test_a_missing_or_short_cluster_secret_is_a_config_error(tmp_path, model_dir):
    from daemons.config import ConfigError
    from daemons.prefill_worker import PrefillWorker

    d = doc(model_dir)
    d["runtime_dir"], d["log_dir"] = str(tmp_path / "run"), str(tmp_path / "log")
    (model_dir / "cluster-secret").write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        PrefillWorker(load(tmp_path, d), host_id="p1")
    # Not set (a cluster mid-roll from a release without it): allowed, loudly; nothing is enforced.
    del d["cluster"]["secret_file"]
    config = load(tmp_path, d)
    assert any("cluster.secret_file is not set" in w for w in config.warnings())
    assert PrefillWorker(config, host_id="p1").cluster_secret == ""


def test_install_fences_lmcaches_ports_to_the_clusters_hosts(tmp_path, model_dir):
    import shutil
    import subprocess

    from daemons.ops.install import cluster_nftables

    rules = cluster_nftables(load(tmp_path, doc(model_dir)))
    assert "elements = { 10.9.0.1, 10.9.0.2 }" in rules
    assert "tcp dport { 5555, 8100, 8555, 9300 } ip saddr != @cluster_hosts drop" in rules
    nft = shutil.which("nft")
    if nft is not None:  # the syntax, where nftables is installed
        path = tmp_path / "rules.nft"
        path.write_text(rules)
        assert subprocess.run([nft, "-c", "-f", str(path)], capture_output=True).returncode == 0
