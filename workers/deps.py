"""What a unit of work needs: the stores and the snapshot roots it may read."""

from __future__ import annotations

from dataclasses import dataclass

from blobchain.storage.content import ContentStore
from blobchain.storage.locks import LockService
from blobchain.storage.metadata import LeaseStore, MetadataStore

__all__ = ["Deps"]


@dataclass(frozen=True)
class Deps:
    content: ContentStore
    metadata: MetadataStore
    leases: LeaseStore
    locks: LockService
    # Snapshot paths must resolve inside one of these; None = any path (embedded CLI default).
    roots: tuple[str, ...] | None = None
    # Threads for intra-layer compression; None = all cores.
    threads: int | None = None
    lease_ttl_s: float = 60.0
