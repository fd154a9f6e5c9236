"""Faults injected while requests flow, and the time until the KV path is back.

For each fault: load runs (several clients, streaming and not); once requests
flow, the fault is injected (``kill -9``/``SIGTERM`` of a daemon or an engine,
``SIGSTOP`` for ``hold_s`` then ``SIGCONT``); from the moment the fault ends,
the clock runs until a request *started after that moment* comes back
``disaggregated`` with cached tokens > 0 (the KV path, not merely a success).
A row counts requests sent / succeeded (by path) / failed cleanly / lost / hung.

Used by ``tests/e2e/test_faults.py`` (CPU, in CI) and ``benchmarks/gpu/kv_path.sh``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.harness.load import Load, Record


@dataclass
class Fault:
    name: str
    pid: Callable[[], int]  # the process to hit, looked up at injection time
    sig: int = signal.SIGKILL  # 0: no signal (a planned operation, done by ``after``)
    hold_s: float = 0.0  # SIGSTOP: how long before SIGCONT
    after: Callable[[], None] | None = None  # e.g. start a daemon again where no supervisor does


@dataclass
class Row:
    fault: str
    sent: int
    succeeded: int
    disaggregated: int
    recomputed: int
    fallback: int
    failover: int
    failed_cleanly: int
    refused: int
    lost: int
    hung: int
    recovery_s: float | None  # fault end -> first KV-path answer to a request sent after it
    bound_s: float
    problems: tuple[str, ...] = ()  # what the lost / hung / failed requests saw
    served_per_s_before: float = 0.0  # answers per second before the fault
    served_per_s_during: float = 0.0  # answers per second from the fault until the KV path was back
    kv_checked: int = 0  # answers whose first token was cross-checked (greedy, KV from prefill)
    kv_mismatched: int = 0  # of those, x-disagg-kv-check: mismatch (must be 0 on a healthy stack)
    timing_problems: tuple[str, ...] = ()  # answers whose Server-Timing did not add up, and why


    @property
    def recovered(self) -> bool:
        return self.recovery_s is not None

    def line(self) -> str:
        rec = f"{self.recovery_s:.1f}" if self.recovery_s is not None else f"> {self.bound_s:.0f}"
        return (f"| {self.fault} | {self.sent} | {self.succeeded} ({self.disaggregated} / {self.recomputed} / "
                f"{self.fallback} / {self.failover}) | {self.failed_cleanly} | {self.refused} | {self.lost} | "
                f"{self.hung} | {rec} | {self.served_per_s_before:.1f} / {self.served_per_s_during:.1f} |")


HEADER = ("| fault | sent | succeeded (disaggregated / recomputed / fallback / failover) | failed cleanly | refused "
          "| lost | hung | KV path back after (s) | served/s before / until back |\n|---|---|---|---|---|---|---|---|---|")


def kv_path_answer(r: Record) -> bool:
    return r.outcome == "succeeded" and r.path == "disaggregated" and r.cached_tokens > 0


async def run_fault(load: Load, fault: Fault, *, warmup_s: float, recovery_bound_s: float) -> Row:
    """Run ``load``, inject ``fault`` once requests flow, measure the way back to the KV path."""
    load.stop = asyncio.Event()
    load.records = []
    # Until stopped here (the recovery is found, or its bound passed); an `after` (a rolling restart) may take minutes.
    load.duration_s = warmup_s + fault.hold_s + recovery_bound_s + 1800
    task = asyncio.create_task(load.run())
    await asyncio.sleep(warmup_s)
    pid = fault.pid()
    os.kill(pid, fault.sig)
    if fault.hold_s:
        await asyncio.sleep(fault.hold_s)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # killed meanwhile (wedge detection): the restart is the recovery
    if fault.after is not None:
        await asyncio.to_thread(fault.after)  # never block the clients' loop
    fault_end = time.monotonic() - load.t0
    recovery: float | None = None
    deadline = time.monotonic() + recovery_bound_s
    while time.monotonic() < deadline and recovery is None:
        await asyncio.sleep(0.5)
        back = [r for r in load.records if r.start >= fault_end and kv_path_answer(r)]
        if back:
            recovery = min(r.end for r in back) - fault_end
    load.stop.set()
    await task
    row = summarize(fault.name, load.records, recovery, recovery_bound_s)
    injected = warmup_s
    back = fault_end + (recovery if recovery is not None else recovery_bound_s)
    row.served_per_s_before = served_per_s(load.records, 0.0, injected)
    row.served_per_s_during = served_per_s(load.records, injected, back)
    return row


def served_per_s(records: list[Record], start: float, end: float) -> float:
    """Answers that arrived between ``start`` and ``end`` (seconds into the load), per second."""
    return sum(1 for r in records if r.outcome == "succeeded" and start <= r.end <= end) / max(1e-9, end - start)


def summarize(name: str, records: list[Record], recovery: float | None, bound_s: float) -> Row:
    outcomes = Counter(r.outcome for r in records)
    paths = Counter(r.path for r in records if r.outcome == "succeeded")
    problems = Counter(f"{r.outcome}: {'stream' if r.stream else 'non-stream'} HTTP {r.status} {r.error}"
                       for r in records if r.outcome in ("lost", "hung", "failed_cleanly"))
    row = Row(name, len(records), outcomes["succeeded"], paths["disaggregated"], paths["recomputed"],
              paths["fallback"], paths["failover"], outcomes["failed_cleanly"], outcomes["refused"], outcomes["lost"],
              outcomes["hung"], recovery, bound_s, tuple(f"{n}x {what}" for what, n in problems.most_common(5)))
    row.kv_checked = sum(1 for r in records if r.kv_check)
    row.kv_mismatched = sum(1 for r in records if r.kv_check == "mismatch")
    row.timing_problems = tuple(p for p in (r.timing_problem for r in records) if p)[:5]
    return row
