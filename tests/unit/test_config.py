"""Config validation: every mistake gives one message naming the key."""

from pathlib import Path

import pytest
import yaml

from daemons.config import ConfigError, load_config
from daemons.deployment import Deployment

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "disagg.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def base(model_dir: Path) -> dict:
    doc = yaml.safe_load((REPO / "etc" / "disagg.yaml").read_text())
    doc["model"]["path"] = str(model_dir)
    return doc


def error_of(tmp_path: Path, doc: object) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, doc))
    return str(exc.value)


def test_shipped_default_is_valid(tmp_path, model_dir):
    config = load_config(write(tmp_path, base(model_dir)))
    assert config.lmcache.chunk_size == 256
    assert config.decode_worker.kv_cache_memory_bytes == 268435456
    assert config.model.name == "tiny-llama"


def test_shipped_gpu_config_is_valid_but_for_the_model():
    config = load_config(REPO / "etc" / "disagg-gpu.yaml", require_model=False)
    assert (config.prefill_worker.device, config.decode_worker.device) == ("cuda:0", "cuda:1")
    assert config.model.max_model_len == 8000 and config.lmcache.chunk_size == 256
    with pytest.raises(ConfigError, match="model.path"):
        load_config(REPO / "etc" / "disagg-gpu.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path, model_dir):
    doc = base(model_dir)
    doc["runtime_dir"] = "run"
    config = load_config(write(tmp_path, doc))
    assert config.runtime_dir == tmp_path / "run"


# One bad value each; the message names the key.
BAD_VALUES = [
    ("decode_worker", "prot", 1, "decode_worker.prot: unknown key"),
    ("prefill_worker", "port", "eighty", "prefill_worker.port:"),
    ("lmcache", "http_port", 70000, "lmcache.http_port:"),
    ("lmcache", "chunk_size", 0, "lmcache.chunk_size:"),
    ("lmcache", "chunk_size", -256, "lmcache.chunk_size:"),
    ("decode_worker", "device", "gpu1", "decode_worker.device: must be 'cpu', 'cuda:N'"),
    ("lmcache", "host", "0.0.0.0", "lmcache.host: must be a loopback address"),
    ("readiness", "heartbeat_timeout_s", 3, "readiness: heartbeat_timeout_s must exceed"),
]


@pytest.mark.parametrize("section,key,value,expected", BAD_VALUES)
def test_bad_value_is_named(tmp_path, model_dir, section, key, value, expected):
    doc = base(model_dir)
    doc[section][key] = value
    assert expected in error_of(tmp_path, doc)


def test_unknown_section_is_named(tmp_path, model_dir):
    doc = base(model_dir)
    doc["lmcahce"] = {}
    assert "lmcahce: unknown key" in error_of(tmp_path, doc)


def test_port_clash_names_both_keys(tmp_path, model_dir):
    doc = base(model_dir)
    doc["decode_worker"]["metrics_port"] = doc["prefill_worker"]["port"]
    msg = error_of(tmp_path, doc)
    assert "prefill_worker.port" in msg and "decode_worker.metrics_port" in msg


def test_missing_model_directory(tmp_path, model_dir):
    doc = base(model_dir)
    doc["model"]["path"] = str(tmp_path / "nowhere")
    assert "model.path: no model at" in error_of(tmp_path, doc)


def test_missing_model_section(tmp_path, model_dir):
    doc = base(model_dir)
    del doc["model"]
    assert "model: required key is missing" in error_of(tmp_path, doc)


def test_cpu_worker_needs_kv_cache_memory(tmp_path, model_dir):
    doc = base(model_dir)
    del doc["prefill_worker"]["kv_cache_memory_bytes"]
    assert "prefill_worker: kv_cache_memory_bytes is required" in error_of(tmp_path, doc)


def test_not_yaml(tmp_path):
    assert "not valid YAML (line 2" in error_of(tmp_path, "model:\n  path: a: b\n")


def test_not_a_mapping(tmp_path):
    assert "must be a mapping" in error_of(tmp_path, "- a\n- b\n")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


def test_every_problem_is_reported(tmp_path, model_dir):
    doc = base(model_dir)
    doc["decode_worker"]["prot"] = 1
    doc["prefill_worker"]["port"] = "x"
    lines = error_of(tmp_path, doc).splitlines()
    assert len(lines) == 2 and all(line.startswith(str(tmp_path)) for line in lines)


def instances_doc(model_dir: Path) -> dict:
    doc = base(model_dir)
    doc["prefill_worker"]["instances"] = {
        "gpu0": {"device": "cpu", "port": 8110, "engine_port": 8111, "metrics_port": 9111},
        "gpu1": {"port": 8120, "engine_port": 8121, "metrics_port": 9121},
    }
    return doc


def test_instances_resolve_to_one_worker_each(tmp_path, model_dir):
    config = load_config(write(tmp_path, instances_doc(model_dir)))
    assert Deployment(config).daemon_names() == ["lmcache-server", "prefill-worker@gpu0", "prefill-worker@gpu1",
                                                 "decode-worker"]
    workers = config.workers("prefill-worker")
    assert workers["prefill-worker@gpu1"].port == 8120
    assert workers["prefill-worker@gpu1"].kv_cache_memory_bytes == 268435456  # inherited from the section
    assert config.worker("prefill-worker", "gpu0").engine_port == 8111
    with pytest.raises(ConfigError, match="start the daemon with --instance NAME"):
        config.worker("prefill-worker", None)
    with pytest.raises(ConfigError, match="no instance 'gpu7'"):
        config.worker("prefill-worker", "gpu7")
    with pytest.raises(ConfigError, match="no instance 'x'"):
        config.worker("decode-worker", "x")


def test_instance_port_clash_is_named(tmp_path, model_dir):
    doc = instances_doc(model_dir)
    doc["prefill_worker"]["instances"]["gpu1"]["metrics_port"] = 9111
    msg = error_of(tmp_path, doc)
    assert "prefill_worker.instances.gpu0.metrics_port and prefill_worker.instances.gpu1.metrics_port" in msg


def test_instance_unknown_key_is_named(tmp_path, model_dir):
    doc = instances_doc(model_dir)
    doc["prefill_worker"]["instances"]["gpu1"]["devcie"] = "cuda:1"
    assert "prefill_worker.instances.gpu1.devcie: unknown key" in error_of(tmp_path, doc)


def test_instance_bad_value_is_named(tmp_path, model_dir):
    doc = instances_doc(model_dir)
    doc["prefill_worker"]["instances"]["gpu1"]["device"] = "tpu"
    assert "prefill_worker.instances.gpu1.device: must be 'cpu', 'cuda:N'" in error_of(tmp_path, doc)


def test_instance_name_is_checked(tmp_path, model_dir):
    doc = instances_doc(model_dir)
    doc["prefill_worker"]["instances"]["a/b"] = {}
    assert "prefill_worker.instances: name 'a/b'" in error_of(tmp_path, doc)


def test_a_front_door_beyond_loopback_needs_keys_or_an_explicit_yes(tmp_path, model_dir, monkeypatch):
    monkeypatch.delenv("DISAGG_API_KEYS", raising=False)
    doc = base(model_dir)
    doc["decode_worker"]["host"] = "0.0.0.0"
    assert "beyond loopback and no API keys" in error_of(tmp_path, doc)
    doc["decode_worker"]["allow_unauthenticated"] = True
    load_config(write(tmp_path, doc))
    del doc["decode_worker"]["allow_unauthenticated"]
    doc["decode_worker"]["api_keys_file"] = str(tmp_path / "keys")
    load_config(write(tmp_path, doc))


@pytest.mark.parametrize("arg", ["--host", "--port=9", "--api-key", "--kv-transfer-config={}", "--model"])
def test_extra_engine_args_cannot_take_over_what_the_worker_owns(tmp_path, model_dir, arg):
    doc = base(model_dir)
    doc["prefill_worker"]["extra_engine_args"] = ["--seed", "1", arg]
    assert f"prefill_worker.extra_engine_args: {arg.split('=')[0]} is set by disagg" in error_of(
        tmp_path, doc)


def test_the_prefill_api_stays_on_loopback(tmp_path, model_dir):
    doc = base(model_dir)
    doc["prefill_worker"]["host"] = "0.0.0.0"
    assert "prefill_worker.host" in error_of(tmp_path, doc)


def test_shipped_one_gpu_config_splits_the_gpu_by_kv_cache_memory():
    config = load_config(REPO / "etc" / "disagg-1gpu.yaml", require_model=False)
    assert config.prefill_worker.device == config.decode_worker.device == "cuda:0"
    assert config.prefill_worker.kv_cache_memory_bytes == config.decode_worker.kv_cache_memory_bytes == 20 << 30


def test_two_workers_on_one_gpu_sized_only_by_utilization_are_refused(tmp_path, model_dir):
    doc = base(model_dir)
    for worker in ("prefill_worker", "decode_worker"):
        doc[worker].update(device="cuda:0", gpu_memory_utilization=0.4)
        doc[worker].pop("kv_cache_memory_bytes")
    message = error_of(tmp_path, doc)
    assert "prefill-worker, decode-worker share cuda:0" in message
    assert "prefill_worker.kv_cache_memory_bytes, decode_worker.kv_cache_memory_bytes" in message
    assert "No available memory for the cache blocks" in message
    doc["decode_worker"]["device"] = "cuda:1"  # one each: utilization alone is fine
    load_config(write(tmp_path, doc))


@pytest.mark.parametrize("args", [["--kv-cache-dtype", "fp8"], ["--kv-cache-dtype=fp8"], ["--kv_cache_dtype", "fp8"]])
def test_engines_that_disagree_on_the_kv_layout_are_refused(tmp_path, model_dir, args):
    doc = base(model_dir)
    doc["prefill_worker"]["extra_engine_args"] = args
    message = error_of(tmp_path, doc)
    assert "prefill_worker.extra_engine_args (prefill-worker) and decode_worker.extra_engine_args" in message
    assert "disagree on --kv-cache-dtype ('fp8' vs not set)" in message
    doc["decode_worker"]["extra_engine_args"] = ["--kv-cache-dtype", "fp8"]  # the same on both: fine
    load_config(write(tmp_path, doc))


def test_an_instance_that_disagrees_on_quantization_is_refused(tmp_path, model_dir):
    doc = base(model_dir)
    doc["prefill_worker"]["instances"] = {"a": {"port": 18300, "engine_port": 18301, "metrics_port": 18302},
                                          "b": {"port": 18310, "engine_port": 18311, "metrics_port": 18312,
                                                "extra_engine_args": ["-q", "fp8"]}}
    assert "disagree on --quantization" in error_of(tmp_path, doc)


def test_a_drain_shorter_than_the_request_deadlines_is_a_warning_naming_the_keys(tmp_path, model_dir):
    config = load_config(write(tmp_path, base(model_dir)))
    (warning,) = config.warnings()
    assert "readiness.drain_timeout_s (30) is shorter than decode_worker.request_timeout_s (600)" in warning
    doc = base(model_dir)
    doc["readiness"]["drain_timeout_s"] = 600
    assert load_config(write(tmp_path, doc)).warnings() == []
    assert load_config(write(tmp_path, doc)).readiness.stop_budget_s == 1215


# -- engines over several GPUs (issue 31) -------------------------------------------------------------------------
def gpus(tmp_path: Path, model_dir: Path, prefill: str, decode: str, **extra: object):  # type: ignore[no-untyped-def]
    doc = base(model_dir)
    doc["prefill_worker"].update(device=prefill, kv_cache_memory_bytes=1 << 30)
    doc["decode_worker"].update(device=decode, kv_cache_memory_bytes=1 << 30)
    for section, values in extra.items():
        doc.setdefault(section, {}).update(values)  # type: ignore[union-attr]
    return doc


def test_an_engine_spans_the_gpus_its_device_names_with_tensor_parallelism(tmp_path, model_dir):
    from daemons.children.engine import engine_argv, engine_env
    from daemons.engine_flags import gpu_indices

    assert gpu_indices("cuda:0-3") == [0, 1, 2, 3] and gpu_indices("cuda:4,6") == [4, 6] and gpu_indices("cpu") == []
    config = load_config(write(tmp_path, gpus(tmp_path, model_dir, "cuda:0-3", "cuda:4,5,6,7")))
    prefill, decode = config.prefill_worker, config.decode_worker
    assert (prefill.tensor_parallel_size, decode.tensor_parallel_size) == (4, 4)
    argv = engine_argv(Deployment(config), prefill, "kv_producer")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert engine_env(decode)["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert Deployment(config).local_engine_ranks() == 8  # every rank connects to LMCache
    assert Deployment(config).lmcache_workers() == (16, 10)
    one = load_config(write(tmp_path, gpus(tmp_path, model_dir, "cuda:0", "cuda:1")))
    assert "--tensor-parallel-size" not in engine_argv(Deployment(one), one.prefill_worker, "kv_producer")


def test_engines_of_different_tensor_parallel_sizes_are_refused_with_the_reason(tmp_path, model_dir):
    err = error_of(tmp_path, gpus(tmp_path, model_dir, "cuda:0-1", "cuda:2"))
    assert "different tensor-parallel sizes" in err and "world size and rank" in err


@pytest.mark.parametrize("flag", ["--tensor-parallel-size", "-tp", "--tensor-parallel-size=2"])
def test_a_tensor_parallel_flag_of_its_own_is_refused(tmp_path, model_dir, flag):
    doc = gpus(tmp_path, model_dir, "cuda:0", "cuda:1")
    doc["decode_worker"]["extra_engine_args"] = [flag] if "=" in flag else [flag, "2"]
    assert "tensor parallelism follows `device`" in error_of(tmp_path, doc)


@pytest.mark.parametrize("device", ["cuda:3-1", "cuda:0,0", "cuda:", "cuda:0-", "gpu:0"])
def test_a_device_that_names_no_sane_gpu_set_is_refused(tmp_path, model_dir, device):
    assert "decode_worker.device" in error_of(tmp_path, gpus(tmp_path, model_dir, "cuda:0", device))


def test_engines_that_share_one_of_their_gpus_must_be_sized(tmp_path, model_dir):
    doc = gpus(tmp_path, model_dir, "cuda:0-1", "cuda:1-2")
    doc["prefill_worker"]["kv_cache_memory_bytes"] = None
    assert "share cuda:1" in error_of(tmp_path, doc)


@pytest.mark.parametrize("layout", ["disagg-8gpu-7b.yaml", "disagg-8gpu-70b.yaml"])
def test_the_eight_gpu_layouts_pass_check_config(tmp_path, model_dir, layout):
    """(issue 31) An eight-GPU server: four prefill + four decode engines of a 7B model, and a 70B-class model with
    TP 4 prefill + TP 4 decode; `disaggctl check-config` (the real command) accepts each with a model in place."""
    import subprocess
    import sys

    doc = yaml.safe_load((REPO / "etc" / layout).read_text())
    doc["model"]["path"] = str(model_dir)
    doc["runtime_dir"], doc["log_dir"] = str(tmp_path / "run"), str(tmp_path / "log")
    path = write(tmp_path, doc)
    proc = subprocess.run([sys.executable, "-m", "daemons.ops.ctl", "--config", str(path), "check-config"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = load_config(path)
    from daemons.engine_flags import gpu_indices

    engines = [w for kind in ("prefill-worker", "decode-worker") for w in config.workers(kind).values()]
    used = sorted(g for w in engines for g in gpu_indices(w.device))
    assert used == list(range(8))  # every GPU of the box, once
    assert Deployment(config).local_engine_ranks() == 8
    # The 70B layout with a decode engine over three GPUs: refused, with the reason.
    if "70b" in layout:
        doc["decode_worker"]["device"] = "cuda:4-6"
        assert "different tensor-parallel sizes" in error_of(tmp_path, doc)


def test_worker_instances_get_a_supervisord_program_each(tmp_path, model_dir):
    """(issue 31) `disaggctl up` with instances exited 78: the shipped supervisord config had no program for one."""
    from daemons.ops.ctl import render_supervisor_conf, supervisor_conf

    config = load_config(REPO / "etc" / "disagg-8gpu-7b.yaml", require_model=False)
    conf = render_supervisor_conf(Deployment(config))
    for name in ("prefill-worker@p0", "prefill-worker@p3", "decode-worker@d0", "decode-worker@d3"):
        kind, instance = name.split("@")
        assert f"[program:{name}]" in conf
        assert f"disagg-{kind} --config %(ENV_DISAGG_CONFIG)s --instance {instance}\n" in conf
    assert "[program:prefill-worker]" not in conf and "[program:lmcache-coordinator]" not in conf
    assert supervisor_conf(Deployment(config)) == config.runtime_dir / "supervisord.conf"


def shared_doc(model_dir: Path) -> dict:
    doc = base(model_dir)
    doc["decode_worker"]["shared_port"] = 8090
    doc["decode_worker"]["instances"] = {
        "a": {"port": 8010, "engine_port": 8011, "metrics_port": 9120},
        "b": {"port": 8020, "engine_port": 8021, "metrics_port": 9121},
    }
    return doc


def test_decode_instances_share_one_endpoint_counted_once(tmp_path, model_dir):
    config = load_config(write(tmp_path, shared_doc(model_dir)))
    assert Deployment(config).shared_front_door() == ("127.0.0.1", 8090)
    assert config.listening_ports()["decode_worker.shared_port"] == 8090
    assert Deployment(load_config(write(tmp_path, base(model_dir)))).shared_front_door() is None


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["decode_worker"]["instances"]["b"].update(shared_port=8091), "different shared ports or hosts"),
    (lambda d: d["decode_worker"]["instances"]["b"].update(host="::1"), "different shared ports or hosts"),
    (lambda d: d["decode_worker"]["instances"]["b"].update(shared_port=None), "set for some instances and not others"),
    (lambda d: d["decode_worker"].update(shared_port=8010), "port 8010 is used by both"),
    (lambda d: d["decode_worker"].update(shared_port=9121), "port 9121 is used by both"),
])
def test_a_shared_port_that_is_not_one_endpoint_is_refused_with_the_reason(tmp_path, model_dir, change, expected):
    doc = shared_doc(model_dir)
    change(doc)
    assert expected in error_of(tmp_path, doc)


def test_a_reload_s_running_config_takes_only_the_applied_keys(tmp_path, model_dir):
    """with_applied: what a daemon applied live is what it compares the next reload against; the rest stays old."""
    from daemons.config import config_changes, with_applied

    doc = instances_doc(model_dir)
    old = load_config(write(tmp_path, doc))
    doc["decode_worker"]["routing"] = "round_robin"
    doc["prefill_worker"]["instances"]["gpu1"]["gpu_memory_utilization"] = 0.5
    doc["lmcache"] = {"chunk_size": 128}
    new = load_config(write(tmp_path, doc))
    changed = config_changes(old, new)
    live = {"decode_worker.routing", "prefill_worker.instances.gpu1.gpu_memory_utilization"}
    assert live < set(changed)
    running = with_applied(old, new, live)
    assert set(config_changes(running, new)) == set(changed) - live  # chunk_size: still to be reported
    assert running.workers("prefill-worker")["prefill-worker@gpu1"].gpu_memory_utilization == 0.5
    assert running.decode_worker.routing == "round_robin" and running.source == old.source
    back = with_applied(running, old, set(config_changes(running, old)) - {"lmcache.chunk_size"})
    assert config_changes(back, old) == {}  # an instance key removed again is removed
    assert with_applied(old, new, ()) is old
