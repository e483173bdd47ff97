#!/usr/bin/env bash
# Build a sample chain of three snapshots and export it as an OCI image, embedded (no services).
set -euo pipefail
. "$(dirname "$0")/_venv.sh" ""
exec blobchain demo "$@"
