"""Garbage collection of the content store: delete blobs nothing refers to.

Roots: every ref record's blobs (main and variants), every recorded manifest's digests, every
digest held by a live lease, and, for a :class:`LocalContentStore`, everything reachable from the
layout's ``index.json`` (index -> manifests/indexes -> config + layers), so exported images are
safe even if nobody recorded them.

The candidates are listed *before* the roots are read: a blob committed after the listing is not a
candidate, and a record or lease written before the roots are read protects its blob. Writers put
a blob's digest on their lease before the ingest commits it (so before it can be listed) and keep
the lease until its record exists; ``grace_s`` additionally spares blobs younger than that, by
the creation time every store gives on its blob info (``BlobInfo.created``; a store that cannot
tell is spared too).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from blobchain.layers.errors import FailedPrecondition, InvalidArgument, NotFound
from blobchain.layers.records import check_digest
from blobchain.storage.content import ContentStore
from blobchain.storage.content.local import LocalContentStore
from blobchain.storage.metadata import LeaseStore, MetadataStore

__all__ = [
    "INGEST_MAX_AGE_S",
    "GCReport",
    "MetadataWithLeases",
    "collect_garbage",
    "gc_roots",
    "layout_digests",
]

INGEST_MAX_AGE_S = 24 * 3600.0

# Descriptors worth opening to follow further (everything else is a leaf: config, layer, ...).
_TRAVERSABLE = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)


@runtime_checkable
class MetadataWithLeases(MetadataStore, LeaseStore, Protocol):
    """A metadata store that also keeps leases (both embedded and Redis stores are)."""


@dataclass(frozen=True)
class GCReport:
    kept: int
    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def gc_roots(content: ContentStore, metadata: MetadataWithLeases) -> set[str]:
    """Every digest that must survive a collection."""
    # Leases before records: a writer records its blob *then* drops its lease, so reading in
    # this order sees every blob in one or the other (the other order can miss one in between).
    keep: set[str] = set(metadata.live_digests())
    keep |= metadata.manifest_digests()
    for rec in metadata.list_refs():
        keep.update(b.digest for b in rec.blobs())
    if isinstance(content, LocalContentStore):
        keep |= layout_digests(content)
    return keep


def layout_digests(store: LocalContentStore) -> set[str]:
    """Digests reachable from the layout's ``index.json`` (empty if there is none).

    An unreadable index or manifest raises FailedPrecondition: deleting without knowing what the
    exported images need would be worse than not collecting.
    """
    index_path = store.root / "index.json"
    try:
        index = _json_doc(index_path.read_bytes(), str(index_path))
    except FileNotFoundError:
        return set()
    seen: set[str] = set()
    stack: list[Any] = list(_children(index, str(index_path)))
    while stack:
        desc = stack.pop()
        if not isinstance(desc, dict):
            continue
        digest = desc.get("digest")
        try:
            check_digest(digest)  # type: ignore[arg-type]
        except InvalidArgument:
            continue  # another algorithm, or junk: nothing our store could hold
        if digest in seen:
            continue
        seen.add(digest)
        if desc.get("mediaType") not in _TRAVERSABLE:
            continue
        try:
            with store.open(digest) as f:
                doc = _json_doc(f.read(), digest)
        except NotFound:
            continue  # the layout points at a blob it lacks; nothing below it to keep
        stack.extend(_children(doc, digest))
    return seen


def _json_doc(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise FailedPrecondition(
            f"cannot collect garbage: {where} is not valid JSON ({e})", path=where
        ) from e
    if not isinstance(doc, dict):
        raise FailedPrecondition(f"cannot collect garbage: {where} is not a JSON object", path=where)
    return doc


def _children(doc: dict[str, Any], where: str) -> list[Any]:
    out: list[Any] = []
    for key in ("manifests", "layers", "blobs"):
        items = doc.get(key)
        if isinstance(items, list):
            out.extend(items)
    for key in ("config", "subject"):
        if isinstance(doc.get(key), dict):
            out.append(doc[key])
    return out


def collect_garbage(
    content: ContentStore, metadata: MetadataWithLeases, *, dry_run: bool = False, grace_s: float = 0
) -> GCReport:
    """Delete (or, with ``dry_run``, only report) every blob outside :func:`gc_roots`."""
    candidates = list(content.list_digests())
    keep = gc_roots(content, metadata)
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
