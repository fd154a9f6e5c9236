"""TTFT against prompt length from `benchmarks/kv_reuse.py` output (its markdown table):
decode engine with the KV from LMCache, decode engine recomputing, and the front door.

    python -m benchmarks.plot_ttft --png ttft.png cpu=results/kv_reuse-cpu.txt gpu=results/crossover.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness.kv_reuse_table import rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="label=path of a kv_reuse.py output")
    p.add_argument("--png", type=Path, required=True)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.inputs), figsize=(6 * len(args.inputs), 4.2), squeeze=False)
    for ax, item in zip(axes[0], args.inputs, strict=True):
        label, _, path = item.partition("=")
        data = rows(Path(path).read_text())
        if not data:
            print(f"{path}: no kv_reuse table rows", file=sys.stderr)
            return 1
        tokens = [d[0] for d in data]
        ax.plot(tokens, [d[1] for d in data], marker="o", label="decode engine, KV from LMCache")
        ax.plot(tokens, [d[2] for d in data], marker="o", label="decode engine, recompute (colocated)")
        ax.plot(tokens, [d[3] for d in data], marker="s", linestyle="--", label="front door (prefill call + KV load)")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time to first token (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
