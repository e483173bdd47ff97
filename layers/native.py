"""The optional native helpers, and the one switch that turns them off.

``blobchain.layers._speedups`` (``layers/_speedups.c``, built by ``setup.py`` when a C compiler
is there) holds byte-for-byte twins of the tightest per-entry steps: the USTAR header block, the
read of one small file body, and an ``lgetxattr`` that answers "absent" without an exception.
The pure-Python code stays the reference: every caller falls back to it when :data:`lib` is
None (no compiler at install time, or ``BLOBCHAIN_PURE_PYTHON=1``) and whenever a native helper
answers None ("not the common case": the Python path then decides, and raises the named error).
Tests flip :data:`lib` to compare both paths byte for byte.

``BLOBCHAIN_NO_GETXATTRAT=1`` makes the helpers look ``security.capability`` up by path
(``lgetxattr``) instead of ``getxattrat(2)`` relative to the listed directory (Linux >= 6.13),
as they do by themselves on a kernel that answers ENOSYS: CI runs both (same bytes).
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["available", "lib"]


def _load() -> ModuleType | None:
    try:
        from blobchain.layers import _speedups
    except ImportError:
        return None
    return _speedups


available: ModuleType | None = _load()
"""The compiled module, whether or not it is switched on."""

if available is not None and os.environ.get("BLOBCHAIN_NO_GETXATTRAT", "") not in ("", "0"):
    available.set_getxattrat(False)

# Read on every call by the hot loop, so tests can switch it.
lib: ModuleType | None = None if os.environ.get("BLOBCHAIN_PURE_PYTHON", "") not in ("", "0") else available
