"""Settings and wiring: ``load_settings`` reads configuration once; ``open_deps`` is the only
place that chooses implementations."""

from blobchain.config.factory import DepsOpener, open_deps
from blobchain.config.settings import Settings, load_settings, redact_url

__all__ = ["DepsOpener", "Settings", "load_settings", "open_deps", "redact_url"]
