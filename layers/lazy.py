"""Package attributes that load their module on first use (PEP 562).

``blobchain.layers``, ``blobchain.config`` and ``blobchain.client`` export names whose modules
pull in the engine, pydantic or Celery; a CLI run that never touches them should not pay for the
imports. Each package sets ``__getattr__ = lazy_exports(__name__, {name: module})``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names[attr]`` is the module that defines
    ``attr`` (absolute, or relative to ``package`` when it starts with a dot). The value is
    cached in the package's namespace, so each name is resolved once."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:  # e.g. a submodule, which the import system then loads instead
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
