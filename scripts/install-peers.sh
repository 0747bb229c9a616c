#!/usr/bin/env bash
# Installs the Debian programs the tests and benchmarks run as real peers.
# Idempotent: does nothing when every program is already there.
set -euo pipefail
PKGS=(haproxy nginx libnginx-mod-stream iperf3 wrk fail2ban prosody prosody-modules lua-unbound redis-server crowdsec pebble gcc libc6-dev
      openssl curl iproute2 nftables procps psmisc systemd chromium)
need=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian peers: ${need[*]}"
$SUDO apt-get update -q
# Installed services must not auto-start: tests start their own instances.
printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
$SUDO chmod +x /usr/sbin/policy-rc.d
# crowdsec's postinst registers to CrowdSec's Central API (network) unless this file already has
# content; the tests run their own offline LAPI and never read /etc/crowdsec.
if [[ " ${need[*]} " == *" crowdsec "* ]]; then
  $SUDO mkdir -p /etc/crowdsec
  [ -s /etc/crowdsec/online_api_credentials.yaml ] || \
    echo "# Central API registration disabled (offline test machine)" | $SUDO tee /etc/crowdsec/online_api_credentials.yaml >/dev/null
fi
DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y \
  --no-install-recommends "${need[@]}"
