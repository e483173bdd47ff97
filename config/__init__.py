"""Settings and wiring: ``load_settings`` reads configuration once; ``open_deps`` is the only
place that chooses implementations.

Loaded on first use (PEP 562): importing ``blobchain.config.factory`` or ``.defaults`` must not
import pydantic (the CLI's start-up)."""

from typing import TYPE_CHECKING

from blobchain.layers.lazy import lazy_exports

if TYPE_CHECKING:
    from blobchain.config.factory import DepsOpener, open_deps
    from blobchain.config.settings import Settings, load_settings, redact_url

_LAZY = {
    "DepsOpener": "blobchain.config.factory",
    "open_deps": "blobchain.config.factory",
    "Settings": "blobchain.config.settings",
    "load_settings": "blobchain.config.settings",
    "redact_url": "blobchain.config.defaults",
}

__all__ = ["DepsOpener", "Settings", "load_settings", "open_deps", "redact_url"]


__getattr__ = lazy_exports(__name__, _LAZY)
