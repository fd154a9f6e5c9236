"""Releases side by side, switched by a symlink: what a staged install looks like (``scripts/release.sh``), made
cheaply for tests that roll the stack from one release to the next.

``<root>/releases/<name>/`` holds ``src/daemons`` (this checkout's package, its ``__version__`` set to the release's)
and ``bin/`` (the console scripts supervisord and systemd run: ``disagg-*``, ``disaggctl``, ``supervisord``,
``supervisorctl``), each running this environment's python on that ``src`` (``-P``: as a console script does,
never the package in the working directory, which ``python -m`` would put first: a checkout's ``daemons/``);
``<root>/current`` points at one release and is switched atomically (a new symlink renamed over the old). A
release staged by ``scripts/release.sh`` is a whole virtual environment instead; the switch is the same.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "disagg-lmcache-server": "daemons.lmcache_server", "disagg-prefill-worker": "daemons.prefill_worker",
    "disagg-decode-worker": "daemons.decode_worker", "disagg-lmcache-coordinator": "daemons.lmcache_coordinator",
    "disaggctl": "daemons.ops.ctl", "supervisord": "supervisor.supervisord", "supervisorctl": "supervisor.supervisorctl",
}


def make_release(root: Path, name: str, version: str) -> Path:
    """``<root>/releases/<name>``: this checkout's daemons at ``version``, and its bin/ (returned: the release)."""
    release = root / "releases" / name
    src = release / "src"
    for part in ("daemons", "deploy", "etc"):  # the package finds its supervisord config and units beside it
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    init = src / "daemons" / "__init__.py"
    init.write_text(re.sub(r'__version__ = ".*"', f'__version__ = "{version}"', init.read_text()))
    (release / "bin").mkdir(parents=True)
    for script, module in SCRIPTS.items():
        path = release / "bin" / script
        path.write_text(f'#!/bin/sh\nexport PYTHONPATH="{src}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
                        f'exec "{sys.executable}" -P -m {module} "$@"\n')
        path.chmod(0o755)
    return release


def switch(root: Path, name: str) -> None:
    """Point ``<root>/current`` at release ``name``, atomically: a process that starts sees one release or the other."""
    new = root / f".current-{os.getpid()}"
    new.unlink(missing_ok=True)
    new.symlink_to(Path("releases") / name)
    os.replace(new, root / "current")


def current_bin(root: Path) -> Path:
    return root / "current" / "bin"
