# Shared by scripts/demo.sh and scripts/test.sh: make .venv and install blobchain into it.
# Usage: . scripts/_venv.sh "<pip extras, e.g. [test]>"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "blobchain needs Python >= 3.11 (found: $("$PY" --version 2>&1))" >&2
  exit 1
fi
VENV="${BLOBCHAIN_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian ships venv separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$VENV"; "$PY" -m venv "$VENV"
    else
      echo "python3 -m venv failed: install python3-venv (sudo apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
STAMP="$VENV/.blobchain-installed$1"
# Reinstall when what the install builds changed: the package list, or the C extension's source.
stale=
for f in pyproject.toml setup.py layers/_speedups.c; do
  [ "$ROOT/$f" -nt "$STAMP" ] && stale=1
done
if [ ! -f "$STAMP" ] || [ -n "$stale" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT$1" 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c 'import blobchain.client' && touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
