#!/usr/bin/env bash
# Side-by-side throughput: portcullis vs wireguard-go as the gateway, same namespaces,
# same wireguard-go client, iperf3 1 and 4 streams both ways. Release build. Needs root.
# Usage: scripts/bench-throughput.sh [--seconds N] [--reps N]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || exec sudo -E "$0" "$@"
scripts/install-deps.sh
cargo build --release --quiet -p portcullis -p portcullis-e2e --bins
PORTCULLIS_BIN="$PWD/target/release/portcullis" exec target/release/portcullis-bench-net "$@"
