"""Check a whole content store: every blob re-read through its verifying reader.

``verify_store`` reports each blob as ``ok`` or ``corrupt`` (and, with ``repair``, moves every
corrupt copy into quarantine and marks the records that name it, so the next request for those
refs rebuilds them from their snapshots). Without ``repair`` nothing is changed: no copy is
moved, no record marked. Records naming a blob the store lacks are reported as ``missing``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from blobchain.layers.errors import DigestMismatch, NotFound
from blobchain.layers.records import RefRecord
from blobchain.storage.content import ContentStore
from blobchain.storage.metadata import MetadataStore

__all__ = ["BlobCheck", "VerifyReport", "mark_damaged", "verify_store"]

OK, CORRUPT, MISSING = "ok", "corrupt", "missing"


@dataclass(frozen=True)
class BlobCheck:
    digest: str
    status: str  # ok | corrupt | missing
    size: int | None = None
    refs: tuple[str, ...] = ()  # refs whose records name this blob
    message: str = ""
    quarantined: str = ""  # where the bad copy went (repair only)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"digest": self.digest, "status": self.status, "size": self.size}
        if self.refs:
            d["refs"] = list(self.refs)
        if self.message:
            d["message"] = self.message
        if self.quarantined:
            d["quarantined"] = self.quarantined
        return d


@dataclass(frozen=True)
class VerifyReport:
    store: str
    blobs: tuple[BlobCheck, ...] = ()
    repaired: bool = False
    quarantine: tuple[str, ...] = field(default=())  # every quarantined copy in the store

    @property
    def bad(self) -> tuple[BlobCheck, ...]:
        return tuple(b for b in self.blobs if b.status != OK)

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "checked": len(self.blobs),
            "ok": sum(b.status == OK for b in self.blobs),
            "corrupt": sum(b.status == CORRUPT for b in self.blobs),
            "missing": sum(b.status == MISSING for b in self.blobs),
            "repaired": self.repaired,
            "blobs": [b.to_dict() for b in self.blobs],
            "quarantine": list(self.quarantine),
        }


def _refs_by_digest(records: Iterable[RefRecord]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rec in records:
        for blob in rec.blobs():
            out.setdefault(blob.digest, []).append(rec.ref_id)
    return out


def mark_damaged(metadata: MetadataStore, digest: str, records: Iterable[RefRecord] | None = None) -> list[str]:
    """Mark every ref (of ``records``, default all) whose record names ``digest``; their ids."""
    refs = _refs_by_digest(metadata.list_refs() if records is None else records).get(digest, [])
    for ref_id in refs:
        metadata.mark_damaged(ref_id, digest)
    return refs


def verify_store(
    content: ContentStore,
    metadata: MetadataStore | None = None,
    *,
    repair: bool = False,
    progress: Callable[[BlobCheck], None] | None = None,
) -> VerifyReport:
    """Read every blob of ``content`` in full; see the module doc."""
    records = list(metadata.list_refs()) if metadata is not None else []
    refs = _refs_by_digest(records)
    checks: list[BlobCheck] = []

    def note(check: BlobCheck) -> None:
        checks.append(check)
        if progress is not None:
            progress(check)

    seen: set[str] = set()
    for digest in content.list_digests():
        seen.add(digest)
        named = tuple(sorted(set(refs.get(digest, ()))))
        try:
            info = content.verify(digest, quarantine=repair)
        except DigestMismatch as e:
            where = str(e.details.get("quarantined", ""))
            if repair and metadata is not None:
                for ref_id in named:
                    metadata.mark_damaged(ref_id, digest)
            note(BlobCheck(digest, CORRUPT, int(e.details.get("size", 0)), named, e.message, where))
            continue
        except NotFound:
            info = None
        if info is None:  # deleted (by GC, or another verify) while we listed
            continue
        note(BlobCheck(digest, OK, info.size, named))
    # A base image's layer is not missing: it is fetched from the base when something needs it.
    lazy = {b.digest for r in records for b in r.blobs() if b.from_base}
    for digest in sorted(set(refs) - seen - lazy):
        note(BlobCheck(digest, MISSING, None, tuple(sorted(set(refs[digest]))), "no blob in the store"))
    return VerifyReport(repr(content), tuple(checks), repair, tuple(content.quarantined()))
