"""The rules every metadata store shares, written once: argument checks, the order of a write's
steps, and the errors a broken rule raises. A backend supplies atomic primitives (one SQLite
transaction, one Lua script) that apply a write and report which rule stopped it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from blobchain.layers.errors import Conflict, ConflictingParent, InvalidArgument
from blobchain.layers.records import LayerBlob, RefRecord, RefSpec, check_digest

__all__ = ["MetadataBase"]


class MetadataBase(ABC):
    """:class:`~blobchain.storage.metadata.MetadataStore` over a backend's primitives.

    ``token``/``claim_key`` fence a write on a single-flight claim (stores whose claims live
    elsewhere, the embedded one, accept and ignore them); ``release`` deletes the claim in the
    same atomic step where the store can (Redis)."""

    # --- the contract -------------------------------------------------------------------------

    def register(self, spec: RefSpec) -> RefRecord:
        rec, existing = self._register(spec)
        if existing is not None:
            raise self.spec_conflict(spec, existing)
        assert rec is not None
        return rec

    def set_blob(
        self,
        ref_id: str,
        blob: LayerBlob,
        *,
        token: str | None = None,
        claim_key: str | None = None,
        release: bool = False,
    ) -> RefRecord:
        """Add a blob (first = main, other variants appended, a known variant left alone; a
        rebuilt blob clears its damaged mark). Another diffID than the ref's -> Conflict."""
        check_digest(blob.digest)
        check_digest(blob.diff_id)
        if blob.size < 0:
            raise InvalidArgument(f"negative blob size {blob.size}", ref=ref_id, digest=blob.digest)
        self._check_token(ref_id, token)
        rec, existing_diff_id = self._set_blob(ref_id, blob, token, claim_key, release)
        if existing_diff_id is not None:
            raise Conflict(
                f"ref {ref_id} has diffID {existing_diff_id}; a blob with diffID {blob.diff_id} cannot join it",
                ref=ref_id,
                existing=existing_diff_id,
                given=blob.diff_id,
            )
        assert rec is not None
        return rec

    def set_chain(
        self,
        ref_id: str,
        chain_id: str,
        blob_chain_id: str,
        *,
        token: str | None = None,
        claim_key: str | None = None,
        release: bool = False,
    ) -> RefRecord:
        """Set the chain IDs once: values already set stand (and are returned)."""
        check_digest(chain_id)
        check_digest(blob_chain_id)
        self._check_token(ref_id, token)
        return self._set_chain(ref_id, chain_id, blob_chain_id, token, claim_key, release)

    def mark_damaged(self, ref_id: str, digest: str) -> RefRecord:
        check_digest(digest)
        return self._damaged(ref_id, digest, True)

    def clear_damaged(self, ref_id: str, digest: str) -> RefRecord:
        check_digest(digest)
        return self._damaged(ref_id, digest, False)

    def put_manifest(self, name: str, digests: list[str]) -> None:
        """Record (or re-point) manifest ``name``: its digests replace those recorded before."""
        if not name:
            raise InvalidArgument("manifest name must not be empty")
        self._put_manifest(name, sorted({check_digest(d) for d in digests}))

    @staticmethod
    def spec_conflict(spec: RefSpec, existing: RefSpec) -> ConflictingParent:
        return ConflictingParent(
            f"ref {spec.ref_id} is already registered with parent {existing.parent!r} and snapshot"
            f" {existing.snapshot!r} (got parent {spec.parent!r}, snapshot {spec.snapshot!r})",
            ref=spec.ref_id,
            existing=existing.to_dict(),
            given=spec.to_dict(),
        )

    @staticmethod
    def _check_token(ref_id: str, token: str | None) -> None:
        if token is not None and not token:
            raise InvalidArgument("empty fencing token", ref=ref_id)

    # --- the rest of the contract, read-only: straight to the backend -------------------------

    @abstractmethod
    def get(self, ref_id: str) -> RefRecord | None: ...

    @abstractmethod
    def chain_specs(self, ref_id: str) -> dict[str, RefSpec]: ...

    @abstractmethod
    def list_refs(self) -> Iterator[RefRecord]: ...

    @abstractmethod
    def manifest_digests(self) -> set[str]: ...

    # --- backend primitives: each one atomic step -------------------------------------------

    @abstractmethod
    def _register(self, spec: RefSpec) -> tuple[RefRecord | None, RefSpec | None]:
        """Create the ref unless it exists: (its record, None), or (None or the record, the
        existing spec) when the ref exists with another spec."""

    @abstractmethod
    def _set_blob(
        self, ref_id: str, blob: LayerBlob, token: str | None, claim_key: str | None, release: bool
    ) -> tuple[RefRecord | None, str | None]:
        """Apply the blob rules: (the record, None), or (None or the record, the ref's diffID)
        when ``blob`` has another diffID.
        RefNotFound for an unknown ref, ClaimLost when the fence refuses."""

    @abstractmethod
    def _set_chain(
        self,
        ref_id: str,
        chain_id: str,
        blob_chain_id: str,
        token: str | None,
        claim_key: str | None,
        release: bool,
    ) -> RefRecord: ...

    @abstractmethod
    def _damaged(self, ref_id: str, digest: str, mark: bool) -> RefRecord: ...

    @abstractmethod
    def _put_manifest(self, name: str, digests: list[str]) -> None: ...
