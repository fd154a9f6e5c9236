"""The fault matrix on a GPU (or any running stack): faults under four clients of disaggregated-length prompts.

Against a running stack (``benchmarks/gpu/faults.sh`` starts one on one GPU), a *plan* of steps, in order:

- a fault case of :func:`benchmarks.harness.faults.fault_for` (``decode engine:kill``,
  ``LMCache server process:stop@60``, ``LMCache server process:stop+decode engine:kill``, ``all:restart``...):
  load runs, the fault lands and is seen to take effect, the row counts sent / ok (by path) / refused / failed /
  lost / hung and the time back to the KV path; lmcache-server's restarts in place (by reason) and what it logged
  about them come with the row;
- ``measure:LABEL:SECONDS``: the same load with no fault: answers and client TTFT p50 / p90 / p99 (for A/B steps);
- ``set:KEY=VALUE;KEY=VALUE``: rewrite the stack's config file (dotted keys; a daemon reads it at its next start:
  follow with a planned restart).

Each step's result is appended to ``OUT/faults.jsonl`` and ``OUT/faults.md`` as soon as it is known (a device
call may end mid-plan); lmcache-server's log lines about restarts, and the stacks it took, to
``OUT/lmcache-events.txt``.

  python -m benchmarks.gpu_faults --config /tmp/disagg-gpu.yaml --out $OUT --tokens 3000 \\
      --plan "measure:workers-derived:40,decode engine:kill,LMCache server process:stop@60"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.harness.faults import HEADER, Row, Stack, fault_for, run_fault
from benchmarks.harness.load import Load, summary
from benchmarks.harness.scrape import metric_value
from daemons.deployment import Deployment
from daemons.kv.canary import vocabulary
from daemons.metrics import LMCACHE_RESTART_REASONS
from daemons.ops.ctl import wait_ready

# What lmcache-server logs about restarting LMCache (and the stacks it takes first).
EVENT_MARKERS = ("restarting this host's LMCache", "is restarted because", "Thread 0x", "Current thread 0x",
                 '  File "', "py-spy dump", "no stack to take", "answers again", "exiting to be restarted")


def lmcache_restarts(stack: Stack) -> dict[str, float]:
    """lmcache-server's restarts in place so far, by reason (an empty dict when its metrics do not answer)."""
    lm = stack.config.lmcache_server
    try:
        text = httpx.get(f"http://{lm.metrics_host}:{lm.metrics_port}/metrics", timeout=5, trust_env=False).text
    except httpx.HTTPError:
        return {}
    return {r: metric_value(text, "disagg_lmcache_restarts_total", f'reason="{r}"') for r in LMCACHE_RESTART_REASONS}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(load: Load, seconds: float) -> dict[str, Any]:
    load.duration_s, load.stop, load.records = seconds, None, []
    records = asyncio.run(load.run())
    ttft = [r.client_ttft_ms for r in records if r.outcome == "succeeded" and r.client_ttft_ms is not None]
    return {**summary(records), "served_per_s": summary(records)["succeeded"] / seconds,  # type: ignore[operator]
            "ttft_ms_p50": percentile(ttft, 0.5), "ttft_ms_p90": percentile(ttft, 0.9),
            "ttft_ms_p99": percentile(ttft, 0.99), "ttft_ms_mean": statistics.fmean(ttft) if ttft else None}


def set_keys(path: Path, assignments: str) -> dict[str, Any]:
    """Rewrite the config file: ``a.b=1;c=x`` (YAML values)."""
    doc = yaml.safe_load(path.read_text())
    done = {}
    for assignment in filter(None, assignments.split(";")):
        key, _, raw = assignment.partition("=")
        *sections, leaf = key.strip().split(".")
        node = doc
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = done[key.strip()] = yaml.safe_load(raw)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return done


class Log:
    """Results as they come: JSON lines, a markdown table, and lmcache-server's restart lines."""

    def __init__(self, out: Path, lmcache_log: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.lmcache_log = lmcache_log
        self.offset = lmcache_log.stat().st_size if lmcache_log.exists() else 0
        (out / "faults.md").write_text(HEADER + "\n")

    def step(self, result: dict[str, Any], line: str = "") -> None:
        with (self.out / "faults.jsonl").open("a") as fh:
            fh.write(json.dumps(result, default=str) + "\n")
        if line:
            with (self.out / "faults.md").open("a") as fh:
                fh.write(line + "\n")
        print(json.dumps(result, default=str), flush=True)

    def lmcache_events(self, label: str) -> list[str]:
        """lmcache-server's lines about restarts since the last call, also appended to lmcache-events.txt."""
        try:
            with self.lmcache_log.open("rb") as fh:
                fh.seek(self.offset)
                text = fh.read().decode(errors="replace")
                self.offset = fh.tell()
        except OSError:
            return []
        lines = [line[:400] for line in text.splitlines() if any(m in line for m in EVENT_MARKERS)]
        with (self.out / "lmcache-events.txt").open("a") as fh:
            fh.write(f"== {label}\n" + "\n".join(lines) + "\n")
        return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--plan", required=True, help="comma-separated steps (see the module's doc)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokens", type=int, default=3000, help="prompt tokens (above decode_worker.disaggregate_min_tokens)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--hold-s", type=float, default=25.0, help="SIGSTOP hold unless a case says stop@SECONDS")
    p.add_argument("--warmup-s", type=float, default=8.0)
    p.add_argument("--bound-s", type=float, default=240.0, help="KV path back within this, or the row says not")
    p.add_argument("--ready-timeout-s", type=float, default=420.0)
    a = p.parse_args()
    stack = Stack(a.config)
    cfg = stack.config
    if a.tokens < cfg.decode_worker.disaggregate_min_tokens:
        p.error(f"--tokens {a.tokens} is below decode_worker.disaggregate_min_tokens "
                f"({cfg.decode_worker.disaggregate_min_tokens}): no KV would load")
    log = Log(a.out, Path(cfg.log_dir) / "lmcache-server.out")
    door = Deployment(cfg).shared_front_door()  # the box's one endpoint, where the config has one
    url = f"http://127.0.0.1:{door[1] if door else cfg.decode_worker.port}"
    load = Load(url, cfg.model.name, vocabulary(cfg.model.path), clients=a.clients, prompt_tokens=a.tokens,
                max_tokens=a.max_tokens, deadline_s=300)
    for step in filter(None, (s.strip() for s in a.plan.split(","))):
        t0 = time.time()
        if not wait_ready(Deployment(cfg), a.ready_timeout_s, quiet=True):
            log.step({"step": step, "error": f"stack not ready within {a.ready_timeout_s:.0f}s: plan stopped"})
            return 1
        if step.startswith("set:"):
            log.step({"step": step, "set": set_keys(a.config, step.removeprefix("set:"))})
            continue
        if step.startswith("measure:"):
            _, label, seconds = step.split(":")
            log.step({"step": step, "label": label, **measure(load, float(seconds)), "at": t0})
            continue
        before = lmcache_restarts(stack)
        try:
            row: Row | None = asyncio.run(run_fault(load, fault_for(step, stack, hold_s=a.hold_s),
                                                    warmup_s=a.warmup_s, recovery_bound_s=a.bound_s))
        except AssertionError as exc:  # FaultNotSeen, a planned operation that failed
            log.step({"step": step, "error": str(exc)[:2000], "at": t0})
            continue
        assert row is not None
        ready = wait_ready(Deployment(cfg), a.ready_timeout_s, quiet=True)
        after = lmcache_restarts(stack)
        # A restarted lmcache-server counts from 0 again: then its whole count is this row's.
        restarted = any(after[k] < before.get(k, 0.0) for k in after)
        restarts = {k: after[k] - (0.0 if restarted else before.get(k, 0.0)) for k in after}
        restarts = {k: n for k, n in restarts.items() if n}
        log.step({"step": step, **row.__dict__, "lmcache_restarts": restarts, "all_ready_after": ready,
                  "events": log.lmcache_events(step)[-40:], "at": t0, "seconds": time.time() - t0},
                 row.line() + (f" restarts: {restarts}" if restarts else "") + (f" ended: {row.ended}" if row.ended else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
