#!/usr/bin/env bash
# Installs what the lab and the tests need, idempotently and unattended.
# Only missing Debian packages are installed; apt-get update runs only when needed.
set -euo pipefail

packages=(
  wireguard-go      # the stock WireGuard client used in the lab and tests
  wireguard-tools   # wg, to configure it
  iproute2          # ip netns, veth
  iputils-ping      # ping through the tunnel
  iperf3            # throughput benchmark
  procps            # sysctl
  kmod
  clickhouse-server # the audit store (Debian's 18.16), started by the lab and tests themselves
  clickhouse-client
  zookeeper         # coordinates ClickHouse 18.16's replicated audit tables in the replica tests
  postgresql-15     # the cluster's shared state, started by the tests themselves (initdb into a temp dir)
  keepalived        # VRRP: moves a site's address between nodes in the failover tests (run inside their namespaces)
  slapd             # OpenLDAP (syncprov, memberof) for the LDAP sync tests, started by the tests
  ldap-utils        # ldapmodify, ldapsearch
  openssl           # test certificates for HTTPS and ldaps://
  curl              # an independent HTTPS client in the TLS tests
  oathtool          # the reference TOTP implementation the second-factor tests check against
  ca-certificates
  python3-requests  # the other-language API client and the SAML browser in the tests
  python3-prometheus-client  # its strict OpenMetrics parser reads /metrics in the tests
  # SAML: samael's xmlsec bindings are generated at build time (bindgen, libclang)
  pkg-config
  libclang-dev
  libxml2-dev
  libxslt1-dev
  libxmlsec1-dev
  libssl-dev
  libtool
  # the SAML IdP the tests start (SimpleSAMLphp under php -S)
  simplesamlphp
  php-cli
  php-xml
  php-mbstring
  # the console's browser tests: Debian's Chromium, driven by playwright-core (npm)
  chromium
  chromium-driver
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # slapd: no system directory is configured; the tests run their own servers.
  echo "slapd slapd/no_configuration boolean true" | { [[ $(id -u) -eq 0 ]] && debconf-set-selections || sudo debconf-set-selections; }
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq -o DPkg::Lock::Timeout=300
  # --no-install-recommends: wireguard-tools would otherwise pull in a kernel package.
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}"
fi

# playwright-core for the browser tests, from the lockfile (no browser download: it
# drives /usr/bin/chromium). Skipped when the lockfile's version is already there.
command -v npm >/dev/null || { echo "node and npm are required (the machine's Node.js 20)" >&2; exit 1; }
browser_dir="$(dirname "$0")/../tests/browser"
browser_dir="$(cd "$browser_dir" && pwd)"
wanted=$(node -p "require('$browser_dir/package-lock.json').packages['node_modules/playwright-core'].version")
installed=$(node -p "require('$browser_dir/node_modules/playwright-core/package.json').version" 2>/dev/null || true)
if [[ "$installed" != "$wanted" ]]; then
  (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi

# chdb-core: current ClickHouse (26.x) embedded in Python; the tests run the trail's schema,
# Native blocks and queries on it too (no current server package is available here).
chdb_wanted=26.9.0
if ! python3 -c "import chdb, sys; sys.exit(chdb.__version__ != '$chdb_wanted')" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check "chdb-core==$chdb_wanted"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo is required (install Rust with rustup)" >&2
  exit 1
fi
if [[ ! -e /dev/net/tun ]]; then
  echo "/dev/net/tun is missing: the gateway and wireguard-go need TUN devices" >&2
  exit 1
fi
