"""GC leases: named, timed sets of blob digests that garbage collection must keep.

containerd's ``leases.Manager``, reduced to what blobchain uses: a writer creates a lease,
puts a blob's digest on it *before* the ingest commits it, and deletes the lease once the blob
is recorded; a client holds the blobs of a computed chain the same way until it is done with
them. An expired lease protects nothing.

Rules shared by every implementation (:class:`LeaseBase`): a lease id is a non-empty string, a
ttl is a finite number >= 0, a resource is a ``sha256:`` digest, adding to a missing or expired
lease is MissingLease, re-creating a lease extends it (its resources kept), deleting an absent
lease is fine. Implementations: :mod:`.sqlite` (embedded) and :mod:`.redis` (distributed).

Not to be confused with single-flight claims (:mod:`blobchain.storage.claims`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

from blobchain.layers.errors import FailedPrecondition, InvalidArgument, register
from blobchain.layers.records import check_digest

__all__ = ["LeaseBase", "LeaseManager", "MissingLease"]


@register
class MissingLease(FailedPrecondition):
    """No such GC lease (or it expired), or a computation was asked for without one."""

    code = "missing_lease"


@runtime_checkable
class LeaseManager(Protocol):
    def create_lease(self, lease_id: str, ttl_s: float) -> None:
        """Create a lease expiring ``ttl_s`` from now, or extend an existing one to that."""
        ...

    def add_resource(self, lease_id: str, digest: str) -> None: ...

    def delete_lease(self, lease_id: str) -> None: ...

    def live_digests(self) -> set[str]:
        """Digests referenced by leases that have not expired."""
        ...


class LeaseBase(ABC):
    """The checks of the contract, once; a backend supplies the storage primitives."""

    def create_lease(self, lease_id: str, ttl_s: float) -> None:
        if not lease_id:
            raise InvalidArgument("lease id must not be empty")
        if not isinstance(ttl_s, (int, float)) or math.isnan(ttl_s) or ttl_s < 0:
            raise InvalidArgument(f"invalid lease ttl {ttl_s!r}", lease=lease_id)
        self._create(lease_id, float(ttl_s))

    def add_resource(self, lease_id: str, digest: str) -> None:
        check_digest(digest)
        if not self._add(lease_id, digest):
            raise MissingLease(f"lease {lease_id} does not exist or has expired", lease=lease_id)

    def delete_lease(self, lease_id: str) -> None:
        self._delete(lease_id)

    def live_digests(self) -> set[str]:
        return self._live()

    # --- backend primitives (atomic each) --------------------------------------------------

    @abstractmethod
    def _create(self, lease_id: str, ttl_s: float) -> None:
        """Upsert the lease's expiry to now + ``ttl_s`` (the backend's clock)."""

    @abstractmethod
    def _add(self, lease_id: str, digest: str) -> bool:
        """Add ``digest`` if the lease exists and has not expired; whether it did."""

    @abstractmethod
    def _delete(self, lease_id: str) -> None: ...

    @abstractmethod
    def _live(self) -> set[str]: ...
