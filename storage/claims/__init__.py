"""The single-flight contract: a claim on a key, held by a token.

``try_acquire(key, ttl_s)`` returns a :class:`Claim` or None (someone else holds it; never
blocks). The holder calls ``refresh()`` from a heartbeat (raises :class:`ClaimLost` once it has
expired and someone else took over) and ``release()`` when done. A dead holder's claim expires
after ``ttl_s`` and the next ``try_acquire`` takes it over. A claim only saves work:
correctness comes from deterministic blobs and conditional creates.

Implementations: :mod:`.local` (``flock``, embedded) and :mod:`.redis` (distributed). Not to be
confused with GC leases (:mod:`blobchain.storage.leases`), which hold blobs against collection.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from blobchain.layers.errors import Conflict, register

__all__ = ["Claim", "ClaimLost", "ClaimService"]


@register
class ClaimLost(Conflict):
    """The single-flight claim expired or was taken over while its holder worked.

    The code keeps its original spelling: codes are a stable, published contract (exit codes,
    Celery results)."""

    code = "lease_lost"


@runtime_checkable
class Claim(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def token(self) -> str: ...

    def refresh(self) -> None: ...

    def release(self) -> None: ...


@runtime_checkable
class ClaimService(Protocol):
    def try_acquire(self, key: str, ttl_s: float) -> Claim | None: ...

    def holder(self, key: str) -> str | None:
        """The token currently holding ``key``, if any."""
        ...
