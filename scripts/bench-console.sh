#!/usr/bin/env bash
# The console's audit search on a large generated trail (default 10 million rows), first
# page p50/p99 through the console's route, signed in through the IdP. Release build. Root.
# Usage: scripts/bench-console.sh [--rows N] [--queries N]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || exec sudo -E "$0" "$@"
scripts/install-deps.sh
cargo build --release --quiet -p portcullis -p portcullis-e2e --bins
PORTCULLIS_BIN="$PWD/target/release/portcullis" exec target/release/portcullis-bench-console "$@"
