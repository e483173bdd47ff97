"""Count and sha256-hash bytes while passing them through, in either direction.

The layer pipeline hashes each byte once, as it streams: :class:`HashingWriter` sits between the
tar writer and the compressor (its digest is the diffID), :class:`HashingReader` sits on a
stream being uploaded or converted. Neither buffers anything. :class:`OverlappedHashingWriter`
hashes big chunks on a helper thread while they go on downstream (compressor, store
hash, file write): sha256 releases the GIL, so on a big layer the diffID costs no wall time.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import BinaryIO

from blobchain.layers.errors import DigestMismatch
from blobchain.layers.lane import Lane

__all__ = ["HashingReader", "HashingWriter", "OverlappedHashingWriter"]


def _format(h: hashlib._Hash) -> str:
    return "sha256:" + h.hexdigest()


class _Hashed:
    """The running sha256 and byte count both directions share."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._size = 0

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of every byte passed so far."""
        return _format(self._hash)

    @property
    def size(self) -> int:
        return self._size

    def verify(self, expected: str) -> None:
        """Raise :class:`DigestMismatch` unless the bytes passed so far hash to ``expected``."""
        _verify(expected, self.digest, self._size)


class HashingWriter(_Hashed):
    """A ``write`` callable's front: hash and count each chunk, then forward it unchanged."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        super().__init__()
        self._write = write

    def write(self, data: bytes | bytearray | memoryview) -> int:
        # memoryview lengths count items, not bytes; nbytes is what was written.
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        self._hash.update(data)
        self._size += n
        self._write(data)  # type: ignore[arg-type]
        return n


# Below this a chunk is hashed inline: handing it to the thread costs more than hashing it.
_OVERLAP_MIN = 64 << 10


class OverlappedHashingWriter(HashingWriter):
    """A :class:`HashingWriter` that hashes big chunks on a helper thread (a
    :class:`~blobchain.layers.lane.Lane`) while the caller's ``write`` handles them downstream:
    the same digest (one hasher, fed in order), at most a few chunks in flight, so memory stays
    flat.

    Only immutable ``bytes`` are hashed on the thread (the caller could change anything else
    after ``write`` returns); other buffers, and small chunks, are hashed inline once the thread
    has caught up. Use it as a context manager, or call :meth:`close`, to stop the thread."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        super().__init__(write)
        self._lane: Lane[bytes] = Lane(self._hash.update, name="diffid-sha256")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if type(data) is bytes and n >= _OVERLAP_MIN:
            self._lane.put(data)
        else:
            self._lane.drain()
            self._hash.update(data)
        self._size += n
        self._write(data)  # type: ignore[arg-type]
        return n

    @property
    def digest(self) -> str:
        self._lane.drain()
        return _format(self._hash)

    def close(self) -> None:
        self._lane.close()

    def __enter__(self) -> OverlappedHashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HashingReader(_Hashed, io.RawIOBase):
    """A readable stream's front: every byte read through it is hashed and counted.

    Closing it does not close the wrapped stream (the caller owns that).
    """

    def __init__(self, raw: BinaryIO) -> None:
        _Hashed.__init__(self)
        io.RawIOBase.__init__(self)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        mv = memoryview(buffer).cast("B")
        readinto = getattr(self._raw, "readinto", None)
        if readinto is not None:
            n = readinto(mv)
            if n is None:  # non-blocking raw stream with nothing ready
                return None  # type: ignore[return-value]
        else:
            chunk = self._raw.read(len(mv))
            n = len(chunk)
            mv[:n] = chunk
        if n:
            self._hash.update(mv[:n])
            self._size += n
        return n


def _verify(expected: str, got: str, size: int) -> None:
    if got != expected:
        raise DigestMismatch(
            f"content digest {got} does not match expected {expected}", expected=expected, got=got, size=size
        )
