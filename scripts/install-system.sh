#!/usr/bin/env bash
# System packages the tests use: Prometheus (with promtool), systemd's systemd-analyze,
# libibverbs1 (LMCache P2P) and iproute2 (network namespaces), from Debian. Skips what is already there.
set -euo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
# LMCache's P2P transfer engine (Mooncake) loads libibverbs even for TCP; ip for the multi-host test.
ldconfig -p | grep -q 'libibverbs.so.1 ' || need+=(libibverbs1)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    echo "install-system: apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts its prometheus service on install where an init runs; the tests
# start their own.
