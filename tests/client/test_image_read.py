"""Reading small blobs (manifests, configs) of an image: whole, verified, whatever the chunking."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest

from blobchain.client.image import InvalidImage, _verified_bytes
from blobchain.layers.errors import DigestMismatch
from blobchain.layers.records import Descriptor


class _Trickle(io.RawIOBase):
    """A raw stream that hands out one byte per read, as a network body may."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._data:
            return 0
        buffer[0] = self._data[0]
        self._data = self._data[1:]
        return 1


def _desc(data: bytes) -> Descriptor:
    return Descriptor("application/json", "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def test_a_trickled_blob_is_read_whole() -> None:
    # regression: one raw read was taken for the whole blob (short reads cut configs)
    data = b'{"rootfs": {"diff_ids": []}}' * 10
    assert _verified_bytes(_Trickle(data), _desc(data), "x", 1 << 20) == data  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [b"tampered", b"short", b"longer than it should be, by a lot"])
def test_a_wrong_small_blob_is_digest_mismatch(bad: bytes) -> None:
    data = b"tampered-not"
    with pytest.raises(DigestMismatch):
        _verified_bytes(_Trickle(bad), _desc(data), "x", 1 << 20)  # type: ignore[arg-type]


def test_an_oversized_manifest_is_refused_before_reading() -> None:
    with pytest.raises(InvalidImage):
        _verified_bytes(_Trickle(b""), Descriptor("x", "sha256:" + "0" * 64, 10 << 20), "x", 1 << 20)  # type: ignore[arg-type]
