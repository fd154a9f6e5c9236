"""Faults injected while requests flow, and the time until the KV path is back.

For each fault: load runs (several clients, streaming and not); once requests
flow, the fault is injected (``kill -9``/``SIGTERM`` of a daemon or an engine,
``SIGSTOP`` for ``hold_s`` then ``SIGCONT``, or several of these at the same
moment: a compound fault) and *seen to take effect* (a killed process gone, a
stopped one in state ``T``) before anything else is judged; from the moment the
fault ends (the ``SIGCONT``, or earlier when the stack itself replaced the
stopped process, the restart's end for a planned one), the clock runs until a
request *started after that moment* comes back ``disaggregated`` with cached
tokens > 0 (the KV path, not merely a success). A row counts requests sent /
succeeded (by path) / failed cleanly / lost / hung.

:func:`fault_for` is the catalogue (``"decode engine:kill"``,
``"LMCache server process:stop+decode engine:kill"``, ...), aimed at the processes
the state files name. Used by ``tests/e2e/test_faults.py`` (CPU, in CI) and
``benchmarks/gpu_faults.py`` (the same rows on a GPU).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness.load import Load, Record
from daemons.children.stacks import process_state
from daemons.config import Config, load_config
from daemons.deployment import Deployment
from daemons.runtime.statefile import StateRecord, read_state


class FaultNotSeen(AssertionError):
    """The fault did not take effect (the process was not gone, or not stopped): nothing after it can be judged."""


@dataclass
class Fault:
    name: str
    pid: Callable[[], int]  # the process to hit, looked up at injection time
    sig: int = signal.SIGKILL  # 0: no signal (a planned operation, done by ``after``)
    hold_s: float = 0.0  # SIGSTOP: how long before SIGCONT
    after: Callable[[], None] | None = None  # e.g. start a daemon again where no supervisor does
    also: tuple[Fault, ...] = ()  # signals sent at the same moment (a compound fault; no hold or after of theirs)


def gone(pid: int) -> bool:
    return process_state(pid) in ("", "Z", "X")


async def seen_to_take_effect(pid: int, sig: int, deadline_s: float = 10.0) -> None:
    """Wait until the signal visibly took effect: a SIGKILLed process gone, a SIGSTOPped one stopped."""
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        return  # SIGTERM drains, SIGHUP reloads: their effect is the row itself
    deadline = time.monotonic() + deadline_s
    while True:
        state = process_state(pid)
        if (sig == signal.SIGKILL and gone(pid)) or (sig == signal.SIGSTOP and state in ("T", "t")):
            return
        if time.monotonic() > deadline:
            raise FaultNotSeen(f"{signal.Signals(sig).name} of pid {pid} did not take effect in {deadline_s:.0f}s "
                               f"(state {state or 'gone'})")
        await asyncio.sleep(0.05)


async def hold(pid: int, hold_s: float) -> str:
    """Keep ``pid`` stopped for ``hold_s``, then SIGCONT; end early when the stack replaced it (killed the stopped
    process: its own wedge detection). How the hold ended."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < hold_s:
        if gone(pid):
            return f"stopped process killed by the stack after {time.monotonic() - t0:.1f}s"
        await asyncio.sleep(0.25)
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return "stopped process gone at the SIGCONT"
    return f"SIGCONT after {hold_s:.0f}s"


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
    ended: str = ""  # how a held fault ended (SIGCONT, or the stack killed the stopped process)
    injected_to_back_s: float | None = None  # the injection -> the first KV-path answer after the fault's end

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
    """Run ``load``, inject ``fault`` once requests flow, see it take effect, measure the way back to the KV path.

    Raises :class:`FaultNotSeen` when the fault did not take effect (the row would prove nothing)."""
    load.stop = asyncio.Event()
    load.records = []
    # Until stopped here (the recovery is found, or its bound passed); an `after` (a rolling restart) may take minutes.
    load.duration_s = warmup_s + fault.hold_s + recovery_bound_s + 1800
    task = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(warmup_s)
        injected = time.monotonic() - load.t0
        targets = [(f.pid(), f.sig) for f in (fault, *fault.also)]
        for pid, sig in targets:
            if sig:
                os.kill(pid, sig)
        for pid, sig in targets:
            await seen_to_take_effect(pid, sig)
        ended = await hold(targets[0][0], fault.hold_s) if fault.hold_s else ""
        for pid, sig in targets[1:]:  # a compound's other stopped processes go on with the first
            if sig == signal.SIGSTOP and not gone(pid):
                os.kill(pid, signal.SIGCONT)
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
    finally:
        load.stop.set()
        await task
    row = summarize(fault.name, load.records, recovery, recovery_bound_s)
    row.ended = ended
    row.injected_to_back_s = None if recovery is None else fault_end + recovery - injected
    back_at = fault_end + (recovery if recovery is not None else recovery_bound_s)
    row.served_per_s_before = served_per_s(load.records, 0.0, injected)
    row.served_per_s_during = served_per_s(load.records, injected, back_at)
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


# -- the catalogue ------------------------------------------------------------------------------------------
@dataclass
class Stack:
    """The stack a fault is aimed at: its config (and the file it came from, for ``disaggctl``)."""

    config_path: Path
    config: Config = field(init=False)

    def __post_init__(self) -> None:
        self.config = load_config(self.config_path)

    def record(self, daemon: str) -> StateRecord:
        record = read_state(self.config.runtime_dir, daemon)
        if record is None:
            raise FaultNotSeen(f"no state file for {daemon}: nothing to aim at")
        return record

    def pid_of(self, target: str) -> Callable[[], int]:
        """``decode engine``, ``prefill keeper``, ``LMCache server process`` or a daemon's name -> its pid, looked
        up when the fault lands."""
        if target.endswith((" engine", " keeper")):  # "decode engine", "decode-worker@d0 keeper" (an instance's)
            worker, _, part = target.rpartition(" ")
            worker = worker if "-worker" in worker else f"{worker}-worker"
            # The keeper stands between the worker and its engine (daemons/children/keeper.py).
            return lambda: int(self.record(worker).details[f"{part}_pid"])  # type: ignore[call-overload]
        if target == "LMCache server process":
            return lambda: int(self.record("lmcache-server").details["child_pid"])  # type: ignore[call-overload]
        return lambda: self.record(target).pid

    def ctl(self, *words: str, timeout_s: float = 1500) -> None:
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "daemons.ops.ctl", "--config", str(self.config_path), *words],
                              capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise AssertionError(f"disaggctl {' '.join(words)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")

    def start_when_exited(self, name: str, timeout_s: float = 180) -> None:
        """An operator's `supervisorctl start` once the drained daemon has exited (SIGTERM is a stop)."""
        from daemons.ops.ctl import supervisorctl

        deadline = time.monotonic() + timeout_s

        def status() -> str:
            proc = supervisorctl(Deployment(self.config), "status", name)
            return proc.stdout + proc.stderr

        while "RUNNING" in status() or "STOPPING" in status():
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not exit within {timeout_s:.0f}s of SIGTERM")
            time.sleep(0.5)
        supervisorctl(Deployment(self.config), "start", name)


def fault_for(case: str, stack: Stack, *, hold_s: float) -> Fault:
    """The fault named ``case`` (``target:how``, ``+`` joining faults that land at the same moment), aimed at the
    processes of ``stack``. ``how``: kill (-9), stop (SIGSTOP for ``hold_s``, or ``stop@SECONDS``), term, hup,
    restart (planned: ``disaggctl restart``; target ``all``: every daemon, rolling)."""
    first, *more = case.split("+")
    also = tuple(fault_for(part, stack, hold_s=hold_s) for part in more)
    target, _, how = first.partition(":")
    how, _, own_hold = how.partition("@")  # "LMCache server process:stop@60": this row's own hold
    hold_s = float(own_hold) if own_hold else hold_s
    pid = stack.pid_of(target)
    if how == "kill":
        fault = Fault(f"kill -9 {target}", pid, signal.SIGKILL)
    elif how == "stop":
        fault = Fault(f"SIGSTOP {target} {hold_s:.0f}s", pid, signal.SIGSTOP, hold_s)
    elif how == "restart":
        names = [] if target == "all" else [target]
        label = "rolling restart of every daemon" if target == "all" else f"planned restart of {target}"
        fault = Fault(label, os.getpid, 0, after=lambda: stack.ctl("restart", *names))
    elif how == "hup":  # a reload (logrotate's postrotate, systemctl reload): it must not stop anything
        fault = Fault(f"SIGHUP {target}", pid, signal.SIGHUP)
    elif how == "term" and target.endswith(" engine"):  # the worker restarts its engine by itself
        fault = Fault(f"SIGTERM {target}", pid, signal.SIGTERM)
    elif how == "term":
        fault = Fault(f"SIGTERM {target} (then start)", pid, signal.SIGTERM,
                      after=lambda: stack.start_when_exited(target))
    else:
        raise ValueError(f"unknown fault {first!r}")
    if also:
        fault.name = " + ".join([fault.name, *(f.name for f in also)])
        fault.also = also
    return fault
