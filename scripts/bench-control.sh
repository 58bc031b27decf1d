#!/usr/bin/env bash
# Data-plane latency under control-plane load: ping p99 through a wireguard-go tunnel,
# idle vs during 200 SCIM changes/s + 50 new HTTPS connections/s. Release build. Root.
# Usage: scripts/bench-control.sh [--secs N] [--rounds N] [--scim-rate N] [--tls-rate N]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || exec sudo -E "$0" "$@"
scripts/install-deps.sh
cargo build --release --quiet -p portcullis -p portcullis-e2e --bins
PORTCULLIS_BIN="$PWD/target/release/portcullis" exec target/release/portcullis-bench-control "$@"
