"""Print etc/disagg-gpu.yaml adapted to the lent GPU box: a Mistral-7B-shaped model
with dummy weights in /tmp/model (no hub there), LMCache 0.5.3's server flags, and
the Triton attention backend (FlashAttention is not carried). EAGER=1|0 overrides the
config's enforce_eager (0: CUDA graphs); OVERFLOW_BACKLOG / OVERFLOW_LOCAL override
decode_worker.overflow_backlog_tokens / overflow_max_local_tokens, BALANCE=1|0
decode_worker.balance_short_prompts; ONE_GPU=1 puts both workers on cuda:0, each engine's memory split by
kv_cache_memory_bytes (KV_BYTES, default 20 GiB) besides gpu_memory_utilization 0.4 (with the utilization alone
the second engine finds no memory for its cache: vLLM's profile counts the first engine's)."""

import os
import sys
from pathlib import Path

import yaml

doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "etc" / "disagg-gpu.yaml").read_text())
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
if os.environ.get("ONE_GPU") == "1":
    for worker in ("prefill_worker", "decode_worker"):
        doc[worker].update(device="cuda:0", gpu_memory_utilization=0.4,
                           kv_cache_memory_bytes=int(os.environ.get("KV_BYTES", 20 << 30)))
doc["decode_worker"]["host"] = "127.0.0.1"  # the bench client is local: no API keys
doc["decode_worker"].pop("api_keys_file", None)
print(yaml.safe_dump(doc, sort_keys=False))
