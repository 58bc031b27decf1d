#!/usr/bin/env bash
# Three nodes on one PostgreSQL 15: revocation across nodes under iperf3 load (SCIM to
# node A -> last packet through node C, 20 trials), sustained identity changes per second,
# and catch-up of 10,000 changes. Release build. Needs root.
# Usage: scripts/bench-cluster.sh [revoke] [changes] [--trials N] [--changes N] [--catch-up N]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || exec sudo -E "$0" "$@"
scripts/install-deps.sh
cargo build --release --quiet -p portcullis -p portcullis-e2e --bins
PORTCULLIS_BIN="$PWD/target/release/portcullis" exec target/release/portcullis-bench-cluster "$@"
