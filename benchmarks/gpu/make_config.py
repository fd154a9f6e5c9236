"""Print etc/disagg-gpu.yaml adapted to the lent GPU box: a Mistral-7B-shaped model
with dummy weights in /tmp/model (no hub there), LMCache 0.5.3's server flags, and
the Triton attention backend (FlashAttention is not carried). EAGER=1|0 overrides the
config's enforce_eager (0: CUDA graphs); OVERFLOW_BACKLOG / OVERFLOW_LOCAL override
decode_worker.overflow_backlog_tokens / overflow_max_local_tokens, BALANCE=1|0
decode_worker.balance_short_prompts; ONE_GPU=1 starts from etc/disagg-1gpu.yaml (both workers on cuda:0,
each engine's memory split by
kv_cache_memory_bytes, KV_BYTES to change the 20 GiB; with gpu_memory_utilization alone the second engine finds
no memory for its cache: vLLM's profile counts the first engine's). BOX=1 (with ONE_GPU=1): two prefill-worker and
two decode-worker instances on cuda:0 behind the box's one endpoint (decode_worker.shared_port 8000), KV_BYTES each
(default 10 GiB), for a small model (SHAPE=llama-3.2-1b in env.sh); ROUTING=load|round_robin sets
decode_worker.routing."""

import os
import sys
from pathlib import Path

import yaml

ONE_GPU = os.environ.get("ONE_GPU") == "1"
shipped = "disagg-1gpu.yaml" if ONE_GPU else "disagg-gpu.yaml"
doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "etc" / shipped).read_text())
doc["runtime_dir"] = "/tmp/disagg/run"
doc["log_dir"] = sys.argv[1] if len(sys.argv) > 1 else "/tmp/disagg/log"
doc["model"].update(path="/tmp/model", load_format="dummy", dtype="bfloat16")
doc["lmcache"]["transfer_mode"] = None
if os.environ.get("EAGER") in ("0", "1"):
    doc["model"]["enforce_eager"] = os.environ["EAGER"] == "1"
for worker in ("prefill_worker", "decode_worker"):
    doc[worker]["extra_engine_args"] = ["--attention-backend", "TRITON_ATTN"]
for env, key in (("OVERFLOW_BACKLOG", "overflow_backlog_tokens"), ("OVERFLOW_LOCAL", "overflow_max_local_tokens")):
    if os.environ.get(env):
        doc["decode_worker"][key] = int(os.environ[env])
if os.environ.get("BALANCE") in ("0", "1"):
    doc["decode_worker"]["balance_short_prompts"] = os.environ["BALANCE"] == "1"
if ONE_GPU and os.environ.get("KV_BYTES"):  # etc/disagg-1gpu.yaml: both on cuda:0, 20 GiB of KV each
    for worker in ("prefill_worker", "decode_worker"):
        doc[worker]["kv_cache_memory_bytes"] = int(os.environ["KV_BYTES"])
if ONE_GPU and os.environ.get("BOX") == "1":
    kv = int(os.environ.get("KV_BYTES", 10 << 30))
    one = {"device": "cuda:0", "gpu_memory_utilization": 0.2, "kv_cache_memory_bytes": kv}
    doc["prefill_worker"].update(one, instances={
        "p0": {"port": 8100, "engine_port": 8101, "metrics_port": 9110},
        "p1": {"port": 8102, "engine_port": 8103, "metrics_port": 9111}})
    doc["decode_worker"].update(one, shared_port=8000, instances={
        "d0": {"port": 8010, "engine_port": 8011, "metrics_port": 9120},
        "d1": {"port": 8020, "engine_port": 8021, "metrics_port": 9121}})
    for worker in ("prefill_worker", "decode_worker"):
        for key in ("port", "engine_port", "metrics_port"):
            doc[worker].pop(key, None)
    doc["model"]["served_name"] = "m"
if os.environ.get("ROUTING"):
    doc["decode_worker"]["routing"] = os.environ["ROUTING"]
doc["decode_worker"]["host"] = "127.0.0.1"  # the bench client is local: no API keys
doc["decode_worker"].pop("api_keys_file", None)
print(yaml.safe_dump(doc, sort_keys=False))
