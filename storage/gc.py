"""Garbage collection of the content store: delete blobs nothing refers to.

Roots: every ref record's blobs (main and variants), every recorded manifest's digests, every
digest held by a live GC lease, and whatever the content store itself pins
(``ContentStore.pinned``: for the local OCI layout, everything reachable from its ``index.json``),
so exported images are safe even if nobody recorded them.

The candidates are listed *before* the roots are read: a blob committed after the listing is not a
candidate, and a record or lease written before the roots are read protects its blob. Writers put
a blob's digest on their lease before the ingest commits it (so before it can be listed) and keep
the lease until its record exists; ``grace_s`` additionally spares blobs younger than that, by
the creation time every store gives on its blob info (``BlobInfo.created``; a store that cannot
tell is spared too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from blobchain.storage.content import ContentStore
from blobchain.storage.leases import LeaseManager
from blobchain.storage.metadata import MetadataStore

__all__ = [
    "INGEST_MAX_AGE_S",
    "GCReport",
    "collect_garbage",
    "gc_roots",
]

INGEST_MAX_AGE_S = 24 * 3600.0

@dataclass(frozen=True)
class GCReport:
    kept: int
    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def gc_roots(content: ContentStore, metadata: MetadataStore, leases: LeaseManager) -> set[str]:
    """Every digest that must survive a collection."""
    # Leases before records: a writer records its blob *then* drops its lease, so reading in
    # this order sees every blob in one or the other (the other order can miss one in between).
    keep: set[str] = set(leases.live_digests())
    keep |= metadata.manifest_digests()
    for rec in metadata.list_refs():
        keep.update(b.digest for b in rec.blobs())
    keep |= content.pinned()
    return keep


def collect_garbage(
    content: ContentStore,
    metadata: MetadataStore,
    leases: LeaseManager,
    *,
    dry_run: bool = False,
    grace_s: float = 0,
) -> GCReport:
    """Delete (or, with ``dry_run``, only report) every blob outside :func:`gc_roots`."""
    candidates = list(content.list_digests())
    keep = gc_roots(content, metadata, leases)
    cutoff = time.time() - grace_s
    deleted: list[str] = []
    freed = 0
    for digest in candidates:
        if digest in keep:
            continue
        info = content.info(digest)
        if info is None:
            continue  # deleted by someone else meanwhile
        if grace_s > 0 and (info.created is None or info.created > cutoff):
            continue
        if not dry_run and not content.delete(digest):
            continue
        deleted.append(digest)
        freed += info.size
    if not dry_run:
        content.sweep(INGEST_MAX_AGE_S)
    return GCReport(kept=len(candidates) - len(deleted), deleted=deleted, freed_bytes=freed)
