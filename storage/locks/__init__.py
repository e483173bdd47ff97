"""The single-flight contract: a lease on a key, held by a token.

``try_acquire(key, ttl_s)`` returns a :class:`Lease` or None (someone else holds it; never
blocks). The holder calls ``refresh()`` from a heartbeat (raises LeaseLost once it has expired
and someone else took over) and ``release()`` when done. A dead holder's lease expires after
``ttl_s`` and the next ``try_acquire`` takes it over. The lock only saves work: correctness comes
from deterministic blobs and conditional creates.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Lease", "LockService"]


@runtime_checkable
class Lease(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def token(self) -> str: ...

    def refresh(self) -> None: ...

    def release(self) -> None: ...


@runtime_checkable
class LockService(Protocol):
    def try_acquire(self, key: str, ttl_s: float) -> Lease | None: ...

    def holder(self, key: str) -> str | None:
        """The token currently holding ``key``, if any."""
        ...
