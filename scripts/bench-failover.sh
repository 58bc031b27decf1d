#!/usr/bin/env bash
# Failover time for a stock wireguard-go client: two nodes of a site behind keepalived
# (VRRPv3, 0.5 s adverts, /readyz every second), kill -9 of the active gateway and the
# active node going dark, p50/p99 of the longest 10 ms ping gap; and the same kill with
# the client's own recovery only (resume_sessions = false). Release build. Needs root.
# Usage: scripts/bench-failover.sh [--trials N] [--baseline-trials N]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || exec sudo -E "$0" "$@"
scripts/install-deps.sh
cargo build --release --quiet -p portcullis -p portcullis-e2e --bins
PORTCULLIS_BIN="$PWD/target/release/portcullis" exec target/release/portcullis-bench-failover "$@"
