#!/usr/bin/env bash
# Revocation latency under load (iperf3 + a 2 ms ping through a wireguard-go tunnel):
# SCIM deactivation and LDAP group removal, 20 trials each. Release build. Needs root.
# Usage: scripts/bench-revocation.sh [scim] [ldap] [--trials N]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || exec sudo -E "$0" "$@"
scripts/install-deps.sh
cargo build --release --quiet -p portcullis -p portcullis-e2e --bins
PORTCULLIS_BIN="$PWD/target/release/portcullis" exec target/release/portcullis-bench-revoke "$@"
