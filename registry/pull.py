"""Read from a registry repository: manifests by tag or digest, blobs streamed on demand.

:class:`RegistryPuller` is a pull-only client (a read-only token is enough). Manifests are
checked against the digest the reference names (or, for a tag, hashed to give the image its
digest); blob bytes are handed out raw, for the caller to verify as they stream
(``client/image.py`` wraps them in the content stores' verifying reader). Nothing is fetched
until asked for: resolving an image reads its manifest and config, never its layers.
"""

from __future__ import annotations

import hashlib
import threading
from typing import BinaryIO

from blobchain.layers.errors import DigestMismatch
from blobchain.layers.records import Descriptor
from blobchain.registry.client import RegistryClient, TransportOptions
from blobchain.registry.errors import RegistryProtocolError
from blobchain.registry.reference import Reference, parse_reference

__all__ = ["ACCEPT", "RegistryPuller"]

ACCEPT = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


class RegistryPuller:
    """``REGISTRY/REPO:TAG`` (or ``@DIGEST``) for reading. ``blob_gets`` counts blob downloads."""

    def __init__(
        self,
        reference: str | Reference,
        options: TransportOptions | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> None:
        self.ref = parse_reference(reference) if isinstance(reference, str) else reference
        self.options = options or TransportOptions()
        self._client: RegistryClient | None = None
        self._cancel = cancel
        self._lock = threading.Lock()
        self.blob_gets = 0

    @property
    def client(self) -> RegistryClient:
        with self._lock:
            if self._client is None:
                self._client = RegistryClient(self.ref, self.options, cancel=self._cancel, push=False)
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __repr__(self) -> str:
        return f"RegistryPuller({self.ref})"

    def manifest(
        self, reference: str | None = None, expected: Descriptor | None = None
    ) -> tuple[Descriptor, bytes]:
        """The manifest (or index) ``reference`` names (default: the puller's own), checked
        against ``expected`` (digest and size) or the reference's digest."""
        reference = reference or self.ref.reference
        want = (
            expected.digest
            if expected is not None
            else self.ref.digest
            if reference == self.ref.digest
            else None
        )
        data, media_type = self.client.get_manifest(reference, ACCEPT)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if want is not None and digest != want:
            raise DigestMismatch(
                f"{self.ref.registry}/{self.ref.repository}: manifest {reference} hashes to {digest}, not {want}",
                expected=want,
                got=digest,
                digest=want,
            )
        if expected is not None and len(data) != expected.size:
            raise RegistryProtocolError(f"manifest {reference} is {len(data)} bytes, not {expected.size}")
        return Descriptor(media_type, digest, len(data)), data

    def open_raw(self, digest: str, offset: int = 0) -> BinaryIO:
        """The blob's bytes as the registry sends them (unverified: the caller verifies)."""
        with self._lock:
            self.blob_gets += 1
        return self.client.open_blob(digest, offset)
