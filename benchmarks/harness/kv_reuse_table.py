"""Reading the markdown table `python -m benchmarks.kv_reuse` prints (the plot and `make bench`'s test read it)."""

from __future__ import annotations

import re

ROW = re.compile(r"^\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|\s*([\d.]+)\s*s?\s*\|\s*([\d.]+)\s*s?\s*\|[^|]*\|\s*([\d.]+)\s*s?\s*\|")


def rows(text: str) -> list[tuple[int, float, float, float]]:
    """(prompt tokens, TTFT with KV from LMCache, TTFT recomputing, front-door TTFT) per table row."""
    out = []
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if m:
            out.append((int(m.group(1).replace(",", "")), float(m.group(3)), float(m.group(4)), float(m.group(5))))
    return sorted(out)
