"""Several hosts on one machine: KV across the hosts' link, against raw TCP on the same link, and
TTFT with the KV fetched from the other host against recomputing it.

Two network namespaces on a bridge stand in for a prefill host and a decode host (the same layout as
tests/e2e/test_hosts.py, run as root). Measured in one run:
  raw TCP     one Python socket stream, prefill host -> decode host, 1 GiB;
  P2P KV      LMCache's own measure of each P2P load (bytes / submit-to-complete, the
              lmcache_mp_l2_load_throughput histogram of the decode host's server, l2_name="p2p");
  TTFT        benchmarks/hosts_client.py inside the decode host: the decode engine with the prompt's
              KV from the prefill host vs the decode engine computing the prompt.

    sudo .venv/bin/python -m benchmarks.hosts [--lengths 1024,4096] [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness.netns import available
from benchmarks.harness.scrape import metric_value
from benchmarks.harness.two_hosts import DECODE_ADDR, PREFILL_ADDR, PY, Cluster

REPO = Path(__file__).resolve().parents[1]

RAW_BYTES = 1 << 30
RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 5999)); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 22)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""
SENDER = """
import socket, sys, time
for _ in range(100):
    try:
        s = socket.create_connection((sys.argv[1], 5999)); break
    except OSError: time.sleep(0.1)
buf = bytes(1 << 22)
for _ in range(int(sys.argv[2]) // len(buf)): s.sendall(buf)
s.close()
"""


def raw_tcp(cluster: Cluster, work: Path) -> float:
    """GB/s of one TCP stream from the prefill host to the decode host."""
    log = work / "receiver.log"
    receiver = cluster.decode.popen("python3", "-c", RECEIVER, DECODE_ADDR, log=log)
    deadline = time.monotonic() + 10
    while "listening" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    cluster.prefill.run("python3", "-c", SENDER, DECODE_ADDR, str(RAW_BYTES), timeout=300)
    receiver.wait(timeout=60)
    n, seconds = log.read_text().split()[-2:]
    return int(n) / float(seconds) / 1e9


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int = 4) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * heads * head_dim * dtype_bytes


def p2p_hist(cluster: Cluster) -> tuple[float, float]:
    text = cluster.metrics(cluster.decode, 9100)
    name = "lmcache_mp_l2_load_throughput_GB_per_second"
    return (metric_value(text, name + "_sum", 'l2_name="p2p"'), metric_value(text, name + "_count", 'l2_name="p2p"'))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    why = available()
    if why:
        print(f"hosts benchmark: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="disagg-hosts-"))
    cluster = Cluster(work)
    t0 = time.monotonic()
    try:
        cluster.up()
        ready_s = time.monotonic() - t0
        tcp = [raw_tcp(cluster, work) for _ in range(3)]
        before = p2p_hist(cluster)
        proc = cluster.decode.run(PY, str(REPO / "benchmarks" / "hosts_client.py"), "--prefill-api",
                                  f"http://{PREFILL_ADDR}:8100", "--lengths", args.lengths, "--reps", str(args.reps),
                                  timeout=1800)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        ttft = json.loads(proc.stdout.strip().splitlines()[-1])
        after = p2p_hist(cluster)
    finally:
        cluster.down()
    loads = after[1] - before[1]
    import lmcache
    import vllm  # only for the versions line

    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, CPU only, network namespaces",
        "versions": {"vllm": vllm.__version__, "lmcache": getattr(lmcache, "__version__", "?")},
        "ready_s": round(ready_s, 1),
        "raw_tcp_GBps": [round(x, 3) for x in tcp],
        "p2p_loads": loads,
        "p2p_load_GBps_mean": round((after[0] - before[0]) / loads, 3) if loads else None,
        "kv_bytes_per_token": kv_bytes_per_token(REPO / "var" / "models" / "tiny-llama"),
        "ttft": ttft["lengths"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
