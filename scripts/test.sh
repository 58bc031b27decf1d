#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds the workspace once, runs every
# test (unit, property, integration, and end-to-end in network namespaces with real
# wireguard-go clients). Needs root for the end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || exec sudo -E "$0" "$@"
scripts/install-deps.sh
# Build once: the end-to-end tests run the portcullis binary built here.
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
