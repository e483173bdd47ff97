#!/usr/bin/env bash
# Run the whole test suite. Tests start the services they need (redis-server, SeaweedFS,
# a private containerd) on free ports and stop them after; peer tools (containerd, umoci,
# skopeo, oci-image-tool, redis-server) come from Debian's packages, installed here when root.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -z "${BLOBCHAIN_SKIP_APT:-}" ]; then
  need=""
  for tool in containerd:containerd ctr:containerd umoci:umoci skopeo:skopeo oci-image-tool:oci-image-tool \
              redis-server:redis-server docker-compose:docker-compose qemu-x86_64:qemu-user; do
    command -v "${tool%%:*}" >/dev/null || need="$need ${tool#*:}"
  done
  if [ -n "$need" ]; then
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null \
      || echo "warning: could not install:$need (the tests that need them will skip)" >&2
  fi
fi
. "$ROOT/scripts/_venv.sh" "[test]"
cd "$ROOT"
exec python -m pytest "$@"
