"""The ingest rules every content store shares: hash while writing, verify on commit, publish
through the backend, discard on any failure.

A backend subclasses :class:`IngestBase` and supplies three primitives: ``_write`` (store the
bytes somewhere private), ``_publish`` (make the verified bytes visible under their digest,
never replacing an existing blob, and return its info) and ``_discard`` (drop whatever was
written; never raises). Everything a caller can observe (the running digest, the size and
digest checks and their :class:`DigestMismatch` details, closing on commit or abort, aborting
when a ``with`` block is left without a commit) is decided here, once.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping

from blobchain.layers.errors import DigestMismatch, FailedPrecondition
from blobchain.layers.records import check_digest
from blobchain.storage.content import BlobInfo

__all__ = ["IngestBase"]


class IngestBase(ABC):
    def __init__(self, ref: str) -> None:
        self.ref = ref
        self._hash = hashlib.sha256()
        self._offset = 0
        self._closed = False

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def write(self, data: bytes | memoryview, /) -> int:
        self._require_open()
        mv = memoryview(data).cast("B")
        try:
            self._write(mv)
        except BaseException:
            self.abort()
            raise
        self._hash.update(mv)
        self._offset += len(mv)
        return len(mv)

    def commit(
        self, *, size: int | None = None, expected: str | None = None, labels: Mapping[str, str] | None = None
    ) -> BlobInfo:
        """Verify (size, expected digest) against what was written, then publish; see
        :class:`~blobchain.storage.content.Ingest`. Always closes the ingest."""
        self._require_open()
        try:
            digest = self._verify(size, expected)
            info = self._publish(digest, dict(labels or {}))
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return info

    def abort(self) -> None:
        """Discard everything written (idempotent; cleanup failures are left to the sweeper)."""
        self._closed = True
        self._discard()

    def __enter__(self) -> IngestBase:
        return self

    def __exit__(self, *exc: object) -> None:
        # Leaving the block without a commit (an exception, KeyboardInterrupt, or simply no
        # commit) discards the ingest; the exception, if any, propagates.
        if not self._closed:
            self.abort()

    def _require_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"ingest {self.ref!r} is closed", ref=self.ref)

    def _verify(self, size: int | None, expected: str | None) -> str:
        """The digest of what was written, if it is what the caller said it would be."""
        if expected is not None:
            check_digest(expected)
        got = self.digest
        if size is not None and size != self._offset:
            raise DigestMismatch(
                f"ingest {self.ref!r}: wrote {self._offset} bytes, expected {size}",
                expected=expected or "",
                got=got,
                expected_size=size,
                got_size=self._offset,
                ref=self.ref,
            )
        if expected is not None and expected != got:
            raise DigestMismatch(
                f"ingest {self.ref!r}: digest {got} does not match expected {expected}",
                expected=expected,
                got=got,
                ref=self.ref,
            )
        return got

    # --- backend primitives -----------------------------------------------------------------

    @abstractmethod
    def _write(self, data: memoryview) -> None:
        """Store ``data`` after what was written so far (privately: nothing visible yet)."""

    @abstractmethod
    def _publish(self, digest: str, labels: dict[str, str]) -> BlobInfo:
        """Make the written bytes visible as ``digest`` (an existing blob is kept: same bytes;
        ``labels`` merged) and return its info. Clean up the private copy."""

    @abstractmethod
    def _discard(self) -> None:
        """Drop whatever was written; never raises."""
