#!/usr/bin/env bash
# The main job: brings up the lab (gateway, real wireguard-go clients, private prod and dev
# networks in network namespaces), shows policies deciding real traffic and prints the
# audit trail. Needs root. Pass --hold to keep the lab up until Enter, --cluster for three
# nodes on PostgreSQL (a change on one node deciding traffic on another, a node killed).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || exec sudo -E "$0" "$@"
scripts/install-deps.sh
cargo build --quiet -p portcullis -p portcullis-e2e --bins
exec target/debug/portcullis-lab "$@"
