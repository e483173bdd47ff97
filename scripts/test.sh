#!/usr/bin/env bash
# Run the whole test suite. Tests start the services they need (redis-server, SeaweedFS,
# a private containerd) on free ports and stop them after; the peer tools come from Debian's
# packages, installed here when root. Under CI=true a peer that cannot be installed fails the
# run here, and a test that still finds one missing fails instead of skipping (tests/services.py).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
case "${CI:-}" in 1|true|TRUE|True|yes) in_ci=1 ;; *) in_ci= ;; esac

# Every peer the suite runs, as COMMAND:DEBIAN-PACKAGE, one per line (add yours on its own line).
PEERS=(
  containerd:containerd
  ctr:containerd
  umoci:umoci
  skopeo:skopeo
  oci-image-tool:oci-image-tool
  redis-server:redis-server
  docker-compose:docker-compose
  setpriv:util-linux
  mount:mount
  cp:coreutils
  docker-registry:docker-registry
  podman:podman
  qemu-x86_64:qemu-user
  ip:iproute2
  taskset:util-linux
)

missing_peers() {
  local tool
  for tool in "${PEERS[@]}"; do
    command -v "${tool%%:*}" >/dev/null || echo "${tool#*:}"
  done | sort -u
}

need="$(missing_peers | tr '\n' ' ')"
if [ -n "${need// /}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -z "${BLOBCHAIN_SKIP_APT:-}" ]; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null; }; then
    echo "could not install: $need" >&2
  fi
  need="$(missing_peers | tr '\n' ' ')"
fi
if [ -n "${need// /}" ]; then
  if [ -n "$in_ci" ]; then
    echo "error: peer tools missing under CI=true (Debian packages: $need); the tests that need them cannot run" >&2
    exit 1
  fi
  echo "warning: peer tools missing (Debian packages: $need): the tests that need them will skip" >&2
fi

. "$ROOT/scripts/_venv.sh" "[test]"
cd "$ROOT"
exec python -m pytest "$@"
