"""LMCache's server, started so that it can say where it is stuck: ``python -m daemons.children.lmcache_main ARGS``
runs ``python -m lmcache.cli.main ARGS`` with :mod:`faulthandler` registered on SIGUSR1, and with its P2P reads
over Mooncake made to wait for every chunk (:mod:`daemons.children.mooncake_reads`: as shipped, a chunk can be
handed to the engine before its last bytes have landed).

lmcache-server sends SIGUSR1 before it restarts an LMCache that stopped answering: every thread's Python stack
goes to stderr (the child's log, through its keeper), written by the signal handler itself, without the GIL, so
it works while one of LMCache's threads holds the GIL in a CUDA call (the wedge in docs/faults.md). The standard
library only, and the one fix, applied when LMCache imports the module it fixes: nothing else here may slow
LMCache's start or change what it does.
"""

from __future__ import annotations

import faulthandler
import runpy
import signal
import sys

from daemons.children import mooncake_reads


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    mooncake_reads.install()
    sys.argv = ["lmcache", *sys.argv[1:]]
    runpy.run_module("lmcache.cli.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
