#!/usr/bin/env bash
# Staged upgrades: each release a checkout with its own .venv, side by side under $ROOT/releases, the running one
# named by the symlink $ROOT/current (systemd units and supervisord run $ROOT/current/.venv/bin/...). Nothing of
# the running release changes while the next one is staged; the switch is one atomic rename; a rollback is a switch.
#
#   scripts/release.sh stage NAME     copy this checkout to $ROOT/releases/NAME and install its .venv there
#                                     (EXTRA=gpu|cpu as scripts/install.sh); the running daemons are untouched
#   scripts/release.sh switch NAME    point $ROOT/current at it (the one before is kept as $ROOT/previous), then
#                                     restart rolling: `disaggctl restart` (supervisord) or unit by unit (systemd)
#   scripts/release.sh rollback       switch back to $ROOT/previous
#   scripts/release.sh list           the releases, and which one is current
# ROOT defaults to /opt/disagg. docs/operations.md, "Upgrades", has the whole procedure.
set -euo pipefail
ROOT="${ROOT:-/opt/disagg}"
here="$(cd "$(dirname "$0")/.." && pwd)"
cmd="${1:-}"; name="${2:-}"

point() {  # point() LINK TARGET: atomically (a new symlink renamed over the old)
    ln -sfn "$2" "$1.new.$$" && mv -T "$1.new.$$" "$1"
}

case "$cmd" in
  stage)
    [ -n "$name" ] || { echo "usage: $0 stage NAME" >&2; exit 2; }
    [ -n "${EXTRA:-}" ] || { echo "say which build: EXTRA=gpu (a GPU server) or EXTRA=cpu, as for scripts/install.sh" >&2; exit 2; }
    dest="$ROOT/releases/$name"
    [ -e "$dest" ] && { echo "release $name exists at $dest: stage under another name" >&2; exit 1; }
    mkdir -p "$ROOT/releases"
    # The checkout without its own .venv and var/ (models, runtime files): the release gets a fresh .venv.
    tar -C "$here" --exclude=./.venv --exclude=./var --exclude=./.git -cf - . | (mkdir -p "$dest" && tar -C "$dest" -xf -)
    (cd "$dest" && bash scripts/install.sh)
    "$dest/.venv/bin/python" -c "import vllm, lmcache, daemons; print('staged', '$name:', 'disagg', daemons.__version__, 'vllm', vllm.__version__)"
    echo "next: $0 switch $name, then a rolling restart (docs/operations.md, Upgrades)" ;;
  switch)
    [ -d "$ROOT/releases/$name/.venv" ] || { echo "no staged release $name in $ROOT/releases" >&2; exit 1; }
    if [ -L "$ROOT/current" ]; then point "$ROOT/previous" "$(readlink "$ROOT/current")"; fi
    point "$ROOT/current" "releases/$name"
    echo "current -> releases/$name (previous -> $(readlink "$ROOT/previous" 2>/dev/null || echo none)); now restart rolling" ;;
  rollback)
    [ -L "$ROOT/previous" ] || { echo "no previous release recorded in $ROOT/previous" >&2; exit 1; }
    back="$(readlink "$ROOT/previous")"
    point "$ROOT/previous" "$(readlink "$ROOT/current")"
    point "$ROOT/current" "$back"
    echo "current -> $back; now restart rolling" ;;
  list)
    cur="$(readlink "$ROOT/current" 2>/dev/null || true)"
    for d in "$ROOT"/releases/*/; do n="$(basename "$d")"; [ "releases/$n" = "$cur" ] && echo "* $n" || echo "  $n"; done ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
