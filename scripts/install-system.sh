#!/usr/bin/env bash
# System packages the tests use: Prometheus (with promtool) and systemd's
# systemd-analyze, from Debian. Skips what is already there.
set -euo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
    echo "install-system: apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts its prometheus service on install where an init runs; the tests
# start their own.
