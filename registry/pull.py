"""Read an image from a registry: manifests by tag or digest, blobs streamed on demand.

:class:`RegistryImageSource` is the registry side of :class:`blobchain.client.image.ImageSource`:
a pull-only client (a read-only token is enough), every byte verified while it streams
(manifests against the digest the reference or registry names, blobs against their descriptor),
and blobs fetched only when a caller opens them: resolving an image reads its manifest and
config, never its layers.
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
from blobchain.storage.content.verified import VerifyingReader

__all__ = ["ACCEPT", "RegistryImageSource"]

ACCEPT = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_MANIFEST_LIKE = frozenset(ACCEPT)


class RegistryImageSource:
    """An image in ``REGISTRY/REPO:TAG`` (or ``@DIGEST``). ``blob_gets`` counts blob downloads
    (what laziness promises to keep low)."""

    def __init__(
        self,
        reference: str | Reference,
        options: TransportOptions | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> None:
        self.ref = parse_reference(reference) if isinstance(reference, str) else reference
        self.name = str(self.ref)
        self.options = options or TransportOptions()
        self._client: RegistryClient | None = None
        self._cancel = cancel
        self._top: tuple[Descriptor, bytes] | None = None
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
        return f"RegistryImageSource({self.name})"

    def _manifest(self, reference: str, expected: str | None) -> tuple[Descriptor, bytes]:
        data, media_type = self.client.get_manifest(reference, ACCEPT)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if expected is not None and digest != expected:
            raise DigestMismatch(
                f"{self.name}: manifest {reference} hashes to {digest}, not {expected}",
                expected=expected,
                got=digest,
                digest=expected,
            )
        return Descriptor(media_type, digest, len(data)), data

    def top(self) -> Descriptor:
        if self._top is None:
            self._top = self._manifest(self.ref.reference, self.ref.digest)
        return self._top[0]

    def read_blob(self, desc: Descriptor, limit: int = 4 << 20) -> bytes:
        if self._top is not None and desc.digest == self._top[0].digest:
            return self._top[1]
        if desc.media_type in _MANIFEST_LIKE:
            got, data = self._manifest(desc.digest, desc.digest)
            if got.size != desc.size:
                raise RegistryProtocolError(
                    f"{self.name}: manifest {desc.digest} is {got.size} bytes, not {desc.size}"
                )
            return data
        if desc.size > limit:
            raise RegistryProtocolError(
                f"{self.name}: {desc.digest} is {desc.size} bytes, too big for a config"
            )
        with self.open_blob(desc) as f:
            parts: list[bytes] = []
            got = 0
            # raw reads may return short: read to the end (the verifier raises on a bad blob)
            while chunk := f.read(max(1, desc.size + 1 - got)):
                parts.append(chunk)
                got += len(chunk)
        return b"".join(parts)

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        with self._lock:
            self.blob_gets += 1
        raw = self.client.open_blob(desc.digest)
        return VerifyingReader(raw, desc.digest, size=desc.size, where=f"{self.name} blob {desc.digest}")  # type: ignore[return-value]
