"""Rules every content store shares for reading: verified reads and whole-blob verification.

:class:`VerifyingReader` sits on a blob's raw byte stream. It hashes (sha256) and counts what
passes, and checks the digest when the last expected byte arrives (or at end of stream), before
returning those bytes: a consumer that stops at the blob's size never receives the tail of a
mismatched blob, one that reads to EOF gets DigestMismatch instead of EOF. On a mismatch it calls
the store's ``on_mismatch`` (which quarantines the copy it read) once, then raises; later reads
raise again.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from blobchain.layers.errors import DigestMismatch
from blobchain.storage.content import BlobInfo

__all__ = ["VerifyingReader", "drain_verified"]

_CHUNK = 1 << 20


class VerifyingReader(io.RawIOBase):
    """A raw stream that verifies ``digest`` (and ``size``, when known) as it is read."""

    def __init__(
        self,
        raw: Any,
        digest: str,
        *,
        size: int | None,
        where: str,
        on_mismatch: Callable[[DigestMismatch], str | None] | None = None,
        skip: int = 0,
    ) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._expected_size = size
        self._where = where
        self._on_mismatch = on_mismatch
        self._hash = hashlib.sha256()
        self._size = 0
        self._verified = False
        self._error: DigestMismatch | None = None
        self._skip = max(0, skip)  # leading bytes hashed but not returned (a read from an offset)

    def readable(self) -> bool:
        return True

    @property
    def verified(self) -> bool:
        """True once every byte has been read and matched the digest."""
        return self._verified

    def readinto(self, buffer: Any) -> int | None:
        if self._error is not None:
            raise self._error
        mv = memoryview(buffer).cast("B")
        while self._skip:
            n = self._take(mv[: min(len(mv), self._skip)])
            if not n:
                return n  # 0 at the end, None from a non-blocking stream with nothing yet
            self._skip -= n
        return self._take(mv)

    def _take(self, mv: memoryview) -> int | None:
        n: int | None = self._raw.readinto(mv)
        if n is None:  # pragma: no cover - only non-blocking streams
            return None
        if n == 0:
            if not self._verified:
                self._check()
            return 0
        self._hash.update(mv[:n])
        self._size += n
        if self._expected_size is not None:
            if self._size > self._expected_size or self._verified:
                self._fail(f"{self._where} holds more than the {self._expected_size} bytes it should")
            if self._size == self._expected_size:
                self._check()  # before the consumer gets these last bytes
        return n

    def _check(self) -> None:
        got = "sha256:" + self._hash.hexdigest()
        if got != self._digest:
            self._fail(f"{self._where} is corrupt: its content hashes to {got}", got=got)
        self._verified = True

    def _fail(self, message: str, *, got: str = "") -> None:
        err = DigestMismatch(
            f"{message}, not {self._digest}",
            expected=self._digest,
            got=got or "sha256:" + self._hash.hexdigest(),
            digest=self._digest,
            size=self._size,
        )
        self._error = err
        if self._on_mismatch is not None:
            on_mismatch, self._on_mismatch = self._on_mismatch, None
            where = _quarantine(on_mismatch, err)
            if where:
                err.details["quarantined"] = where
                err.message += f"; the bad copy was moved to {where}"
                err.args = (err.message,)
        raise err

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()
            finally:
                super().close()


def _quarantine(on_mismatch: Callable[[DigestMismatch], str | None], err: DigestMismatch) -> str:
    """Run the store's quarantine; its own failure must not hide the mismatch."""
    try:
        return on_mismatch(err) or ""
    except Exception as e:  # reported with the mismatch; the copy stays where it was
        err.details["quarantine_error"] = f"{type(e).__name__}: {e}"
        return ""


class _Opener(Protocol):
    def info(self, digest: str) -> BlobInfo | None: ...

    def open(self, digest: str, *, quarantine: bool = True) -> BinaryIO: ...


def drain_verified(store: _Opener, digest: str, *, quarantine: bool = True) -> BlobInfo | None:
    """Read all of a blob through its verifying reader; its info, or None if absent."""
    from blobchain.layers.errors import NotFound

    info = store.info(digest)
    if info is None:
        return None
    try:
        with store.open(digest, quarantine=quarantine) as f:
            while f.read(_CHUNK):
                pass
    except NotFound:
        return None
    return info
