"""The per-ref record contract.

Rules shared by every implementation (embedded SQLite, Redis), each done atomically:
- ``register(spec)``: creates the ref, or returns the existing record if the spec is identical;
  a different parent/snapshot/kind/layer type raises ConflictingParent.
- ``set_blob(ref, blob)``: the first blob becomes the ref's main blob; later blobs with another
  ``variant`` are added as variants (same diffID required, else Conflict); an existing variant is
  left alone. Idempotent.
- ``set_chain(ref, chain_id, blob_chain_id)``: idempotent; a ref whose chain ID is already set is
  left alone (the stored values are returned).
- ``mark_damaged(ref, digest)``: records that the ref's blob ``digest`` was found corrupt (it is
  then in ``RefRecord.damaged``); ``set_blob`` of a blob with that digest (the rebuild) or
  ``clear_damaged`` (a full re-verification passed) removes the mark. Unknown ref: RefNotFound.
- ``token``: when given, the write happens only if the claim service still holds that claim token
  for ``claim_key`` (default: the ref id) (fencing); otherwise ClaimLost. Embedded stores may
  ignore it (their file locks die with their holder).

The checks, the order of each write and its errors are written once in
:class:`~blobchain.storage.metadata.base.MetadataBase`; each backend supplies atomic primitives.
GC leases are another contract: :mod:`blobchain.storage.leases`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from blobchain.layers.records import LayerBlob, RefRecord, RefSpec

__all__ = ["MetadataStore"]


@runtime_checkable
class MetadataStore(Protocol):
    def get(self, ref_id: str) -> RefRecord | None: ...

    def chain_specs(self, ref_id: str) -> dict[str, RefSpec]:
        """The specs of ``ref_id`` and its registered ancestors, in one read (one round trip
        per few thousand refs); stops at a missing parent or a cycle (the caller's ancestry walk
        reports those). Empty if ``ref_id`` is unknown."""
        ...

    def register(self, spec: RefSpec) -> RefRecord: ...

    def set_blob(
        self, ref_id: str, blob: LayerBlob, *, token: str | None = None, claim_key: str | None = None
    ) -> RefRecord:
        """``token``/``claim_key``: fence the write on that claim (see the module doc)."""
        ...

    def set_chain(self, ref_id: str, chain_id: str, blob_chain_id: str) -> RefRecord: ...

    def mark_damaged(self, ref_id: str, digest: str) -> RefRecord: ...

    def clear_damaged(self, ref_id: str, digest: str) -> RefRecord: ...

    def list_refs(self) -> Iterator[RefRecord]: ...

    def put_manifest(self, name: str, digests: list[str]) -> None:
        """Record the blobs an exported manifest references (they survive GC)."""
        ...

    def manifest_digests(self) -> set[str]: ...

