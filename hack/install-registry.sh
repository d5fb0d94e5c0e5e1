#!/usr/bin/env bash
# Installs what the private-image tests start for themselves: Debian's docker-registry
# (the distribution registry; docker.io's registry image cannot be pulled here) and
# htpasswd for its logins. Nothing is started or configured: each test runs its own
# registry on loopback and removes it. Idempotent; run as root.
set -euo pipefail

missing=()
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v htpasswd >/dev/null || missing+=(apache2-utils)
command -v openssl >/dev/null || missing+=(openssl)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  # The package's own service would listen on :5000: a policy-rc.d that refuses
  # keeps it from starting (unless the machine has a policy of its own).
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "registry tools: $(docker-registry --version 2>/dev/null | head -1), $(command -v htpasswd)"
