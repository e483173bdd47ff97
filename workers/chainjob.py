"""Chain IDs, in order, once: BuildKit ``computeChainMetadata`` over a ref's ancestry."""

from __future__ import annotations

from blobchain.layers.errors import NonAddressableParent, RefNotFound
from blobchain.layers.identity import next_ids
from blobchain.layers.records import RefRecord, RefSpec
from blobchain.storage.metadata import MetadataStore
from blobchain.workers.errors import NoBlobs
from blobchain.workers.plan import ancestry

__all__ = ["chain_records", "finalize_chain"]


def chain_records(ref_id: str, metadata: MetadataStore) -> list[RefRecord]:
    """The records of ``ref_id`` and its ancestors, base first."""
    records: dict[str, RefRecord] = {}

    def lookup(r: str) -> RefSpec | None:
        rec = metadata.get(r)
        if rec is None:
            return None
        records[r] = rec
        return rec.spec

    order = ancestry(ref_id, lookup)
    if ref_id not in records:
        raise RefNotFound(f"unknown ref {ref_id}", ref=ref_id)
    return [records[r] for r in order]


def finalize_chain(ref_id: str, metadata: MetadataStore) -> list[RefRecord]:
    """Set chainID and blobChainID on ``ref_id`` and every ancestor that lacks them, parents
    first. Idempotent: a ref whose chain ID is set is left alone. A ref without a blob raises
    NoBlobs; a parent without chain IDs raises NonAddressableParent."""
    out: list[RefRecord] = []
    parent: RefRecord | None = None
    for rec in chain_records(ref_id, metadata):
        if rec.chain_id is None or rec.blob_chain_id is None:
            if rec.blob is None:
                raise NoBlobs(f"no blobs for ref {rec.ref_id}", ref=rec.ref_id)
            if parent is not None and (parent.chain_id is None or parent.blob_chain_id is None):
                raise NonAddressableParent("non-addressable parent", ref=rec.ref_id, parent=parent.ref_id)
            pair = None if parent is None else (parent.chain_id, parent.blob_chain_id)
            chain_id, blob_chain_id = next_ids(pair, rec.blob.digest, rec.blob.diff_id, ref=rec.ref_id)
            rec = metadata.set_chain(rec.ref_id, chain_id, blob_chain_id)
        out.append(rec)
        parent = rec
    return out
