"""The blob contract: a content-addressed store with an ingest protocol.

Lifecycle (containerd's ``content.Store`` shape): ``ingest(ref)`` opens an :class:`Ingest`; the
caller ``write``s bytes; ``commit`` verifies size and digest (computed by the ingest itself from
the bytes it received) and publishes the blob under ``blobs/sha256/<hex>`` atomically, or
``abort`` discards it. A blob that already exists is never rewritten; committing the same digest
again is success. No partial or mismatched blob is ever visible under a digest.

The write rules are written once (:class:`~blobchain.storage.content.ingest.IngestBase`: hash,
verify, then the backend's ``_publish``).

Every read is verified: ``open`` hands out a reader that hashes the bytes as they pass and raises
:class:`~blobchain.layers.errors.DigestMismatch` *before* the consumer gets the last bytes of a
blob whose content does not match its name; the store then quarantines the bad copy (moves it
aside, never deletes it) so that the next writer can publish good bytes. ``verify`` reads a whole
blob that way (``quick=True``: only if the store's evidence says it may have changed since it was
written or last verified).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable

__all__ = ["BlobInfo", "BlobReader", "BlobWriter", "ContentStore", "Ingest", "ingest_tag"]


def ingest_tag(ref: str) -> str:
    """A short, name-safe tag of an ingest ref, part of every temp name/key the ingest makes, so
    one ref's leftovers can be swept (``sweep(ref=...)``) without knowing anything else."""
    return hashlib.sha256(ref.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    labels: Mapping[str, str] = field(default_factory=dict)
    # When the blob was last published (a re-commit of the same bytes refreshes it), in seconds
    # since the epoch; what GC's grace period measures. None when the store cannot tell.
    created: float | None = field(default=None, compare=False)


@runtime_checkable
class Ingest(Protocol):
    """One blob being written. Also a context manager: leaving it with an exception aborts."""

    def write(self, data: bytes | memoryview, /) -> int: ...

    @property
    def offset(self) -> int:
        """Bytes written so far."""
        ...

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the bytes written so far: what a commit now would publish (so a
        writer can lease it against GC before it becomes visible)."""
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

    def open(self, digest: str, offset: int = 0, *, quarantine: bool = True) -> BinaryIO:
        """A verifying reader over the blob's bytes from ``offset`` on; raises NotFound if absent.

        The reader raises DigestMismatch before handing over the last bytes of a blob that does
        not hash to ``digest``; with ``quarantine`` the store first moves the bad copy aside. A
        reader from ``offset`` still hashes the bytes before it (read, not returned).
        """
        ...

    def verify(self, digest: str, *, quick: bool = False, quarantine: bool = True) -> BlobInfo | None:
        """Read the whole blob through a verifying reader: its info if intact, None if absent,
        DigestMismatch (after quarantining, unless told not to) if not. ``quick``: trust the
        blob without reading it when nothing suggests it changed since it was published or last
        verified (local: size, mtime, ctime, inode; S3: our sha256 marker in its metadata)."""
        ...


@runtime_checkable
class BlobWriter(Protocol):
    def ingest(self, ref: str) -> Ingest:
        """Start writing a blob. ``ref`` names the ingest (for debugging and sweeping)."""
        ...


@runtime_checkable
class ContentStore(BlobReader, BlobWriter, Protocol):
    # Capabilities, said by each store rather than guessed from its class:
    cheap_labels: bool
    """True when ``set_labels`` is a metadata write (local); False when it rewrites the blob
    (S3 copies the object onto itself), so optional labels such as mount hints are skipped."""

    @property
    def layout_root(self) -> str | None:
        """The OCI image layout directory this store is (local), None when it is not a
        directory (S3): an export into that directory writes no second copy of a blob."""
        ...

    def delete(self, digest: str) -> bool:
        """Remove a blob; True if it existed."""
        ...

    def list_digests(self) -> Iterator[str]: ...

    def set_labels(self, digest: str, labels: Mapping[str, str]) -> BlobInfo:
        """Merge labels into a stored blob's labels."""
        ...

    def sweep(self, older_than_s: float, *, ref: str | None = None) -> int:
        """Remove leftover ingests older than the given age (only those of ingest ``ref``, if
        given: a new holder of a ref's lease drops a dead holder's uploads); returns how many."""
        ...

    def sweep_orphans(self) -> int:
        """Remove leftover ingests whose writer is known to be dead (local: its process is gone);
        returns how many. A store that cannot tell removes none (``sweep`` by age gets them)."""
        ...

    def pinned(self) -> set[str]:
        """Digests the store itself keeps alive, whatever the records say (GC roots; local: all
        that the layout's ``index.json`` reaches)."""
        ...

    def quarantine(self, digest: str, *, reason: str = "") -> str | None:
        """Move a blob aside (local ``.blobchain/quarantine/``, S3 ``quarantine/``), out of
        every reader's and GC's sight; returns where it went, None if it was absent."""
        ...

    def quarantined(self) -> Iterator[str]:
        """Where the quarantined copies are (paths or keys), oldest first."""
        ...
