"""The blob contract: a content-addressed store with an ingest protocol.

Lifecycle (containerd's ``content.Store`` shape): ``ingest(ref)`` opens an :class:`Ingest`; the
caller ``write``s bytes; ``commit`` verifies size and digest (computed by the ingest itself from
the bytes it received) and publishes the blob under ``blobs/sha256/<hex>`` atomically, or
``abort`` discards it. A blob that already exists is never rewritten; committing the same digest
again is success. No partial or mismatched blob is ever visible under a digest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable

__all__ = ["BlobInfo", "BlobReader", "BlobWriter", "ContentStore", "Ingest"]


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    labels: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Ingest(Protocol):
    """One blob being written. Also a context manager: leaving it with an exception aborts."""

    def write(self, data: bytes | memoryview, /) -> int: ...

    @property
    def offset(self) -> int:
        """Bytes written so far."""
        ...

    def commit(
        self, *, size: int | None = None, expected: str | None = None, labels: Mapping[str, str] | None = None
    ) -> BlobInfo:
        """Verify (size, expected digest) against what was written, then publish.

        Raises DigestMismatch on a mismatch (and aborts). If the blob already exists, the ingest
        is dropped and the existing blob's info returned (labels merged). Always closes the ingest.
        """
        ...

    def abort(self) -> None: ...

    def __enter__(self) -> Ingest: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class BlobReader(Protocol):
    def info(self, digest: str) -> BlobInfo | None:
        """The blob's info, or None if absent."""
        ...

    def open(self, digest: str, offset: int = 0) -> BinaryIO:
        """A reader over the blob's bytes from ``offset`` on; raises NotFound if absent."""
        ...


@runtime_checkable
class BlobWriter(Protocol):
    def ingest(self, ref: str) -> Ingest:
        """Start writing a blob. ``ref`` names the ingest (for debugging and sweeping)."""
        ...


@runtime_checkable
class ContentStore(BlobReader, BlobWriter, Protocol):
    def delete(self, digest: str) -> bool:
        """Remove a blob; True if it existed."""
        ...

    def list_digests(self) -> Iterator[str]: ...

    def set_labels(self, digest: str, labels: Mapping[str, str]) -> BlobInfo:
        """Merge labels into a stored blob's labels."""
        ...

    def sweep(self, older_than_s: float) -> int:
        """Remove leftover ingests older than the given age; returns how many were removed."""
        ...
