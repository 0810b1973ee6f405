#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Installs the Debian packages fanout needs to build and test, when some are
# missing. It runs at every `make test`, so the common case (everything is
# there) is a single dpkg-query and no output. As root it installs what is
# missing; as anyone else it prints the apt-get line to run and fails.

set -euo pipefail

PACKAGES="build-essential pkg-config librdkafka-dev libjansson-dev
  libinih-dev libcmocka-dev libcurl4-openssl-dev libnghttp2-dev libpq-dev
  libhiredis-dev libuv1-dev libwebsockets-dev libmicrohttpd-dev libjwt-dev
  libicu-dev libwslay-dev libssl-dev postgresql redis-server kcat"

POLICY=/usr/sbin/policy-rc.d

read -r -a wanted <<<"${PACKAGES//$'\n'/ }"

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "deps.sh: no dpkg here; install the equivalents of:" \
    "${wanted[*]}" >&2
  exit 0
fi

# One dpkg-query for the whole list: unknown names only print to stderr.
declare -A have=()
while read -r name state; do
  if [ "$state" = installed ]; then
    have[$name]=1
  fi
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' \
  "${wanted[@]}" 2>/dev/null || true)

missing=()
for p in "${wanted[@]}"; do
  if [ -z "${have[$p]:-}" ]; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "deps.sh: missing packages: ${missing[*]}" >&2
  echo "Install them with:" >&2
  echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "deps.sh: installing ${missing[*]}"

# Debian starts a package's service on install. The project runs private
# servers of its own, so keep the system-wide ones from starting, but only
# for the duration of this install and only if no policy is set already.
own_policy=0
restore_policy() {
  if [ "$own_policy" -eq 1 ]; then
    rm -f "$POLICY"
  fi
}
trap restore_policy EXIT
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$POLICY"
  chmod 755 "$POLICY"
  own_policy=1
fi

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y \
    --no-install-recommends "${missing[@]}"
}

# The package lists may be missing or stale (fresh containers): refresh
# them only when an install without a refresh fails.
if ! apt_install; then
  echo "deps.sh: install failed; running apt-get update and retrying" >&2
  apt-get update
  apt_install
fi
