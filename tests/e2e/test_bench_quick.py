"""`make bench` in its quick mode, against the running test stack: the benchmarks run to
the end and produce their tables and plot (untimed: CI asserts nothing about speed)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from benchmarks.harness.kv_reuse_table import rows

from .conftest import REPO

pytestmark = pytest.mark.stack


def test_make_bench_quick_mode_runs_to_the_end(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "QUICK": "1", "BENCH_OUT": str(tmp_path), "BENCH_CONFIG": str(stack.config)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "bench.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    overhead = [json.loads(line.split(" ", 3)[3]) for line in (tmp_path / "frontdoor_overhead.txt").read_text()
                .splitlines() if line.startswith(("run 1 non-stream ", "run 1 stream "))]
    assert len(overhead) == 2 and all(r["disagg"]["rps"] > 0 and r["toy"]["rps"] > 0 for r in overhead)
    table = rows((tmp_path / "kv_reuse-cpu.txt").read_text())
    assert [n for n, *_ in table] and all(hit > 0 and miss > 0 for _, hit, miss, _ in table)
    assert (tmp_path / "ttft-cpu.png").stat().st_size > 10_000
    points = [json.loads(line) for line in (tmp_path / "goodput-cpu.jsonl").read_text().splitlines()]
    assert [p["rate"] for p in points] and all(p["sent"] > 0 for p in points)
    assert all(p["ok"] == p["sent"] for p in points), [p["errors"] for p in points]  # the stack answered them all
    assert all(len(r) == 5 for p in points for r in p["requests"])  # TTFT + each request's ITL quantiles
    assert (tmp_path / "goodput-cpu.png").stat().st_size > 10_000
