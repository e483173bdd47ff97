from __future__ import annotations

import array
import hashlib
import io

import pytest

from blobchain.layers.digest import HashingReader, HashingWriter
from blobchain.layers.errors import DigestMismatch
from blobchain.layers.records import EMPTY_LAYER_DIFF_ID

EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
DATA = bytes(range(256)) * 4099  # not a multiple of any read size used below


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_writer_empty() -> None:
    w = HashingWriter(lambda b: None)
    assert w.digest == EMPTY_SHA256
    assert w.size == 0


def test_writer_hashes_counts_and_forwards_in_order() -> None:
    out = bytearray()
    w = HashingWriter(out.extend)
    returned = [w.write(DATA[i : i + 1000]) for i in range(0, len(DATA), 1000)]
    assert bytes(out) == DATA
    assert sum(returned) == len(DATA)
    assert w.size == len(DATA)
    assert w.digest == _sha(DATA)


def test_writer_digest_is_readable_midway() -> None:
    w = HashingWriter(lambda b: None)
    w.write(b"abc")
    assert w.digest == _sha(b"abc")
    w.write(b"def")
    assert w.digest == _sha(b"abcdef")


def test_writer_counts_bytes_of_wide_memoryviews() -> None:
    arr = array.array("i", range(1000))  # 4 bytes per item
    w = HashingWriter(lambda b: None)
    assert w.write(memoryview(arr)) == 4000
    assert w.size == 4000
    assert w.digest == _sha(arr.tobytes())


def test_empty_tar_is_the_empty_layer_diff_id() -> None:
    # An empty layer tar is two 512-byte zero blocks; its sha256 is the well-known empty diffID.
    w = HashingWriter(lambda b: None)
    w.write(bytes(1024))
    assert w.digest == EMPTY_LAYER_DIFF_ID


def test_writer_sink_error_propagates() -> None:
    def broken(_: bytes) -> None:
        raise OSError("disk full")

    w = HashingWriter(broken)
    with pytest.raises(OSError, match="disk full"):
        w.write(b"x")


def test_writer_verify() -> None:
    w = HashingWriter(lambda b: None)
    w.write(b"hello")
    w.verify(_sha(b"hello"))
    with pytest.raises(DigestMismatch) as ei:
        w.verify(EMPTY_SHA256)
    assert ei.value.expected == EMPTY_SHA256
    assert ei.value.got == _sha(b"hello")


@pytest.mark.parametrize("read_size", [1, 7, 4096, 1 << 20, -1])
def test_reader_read(read_size: int) -> None:
    r = HashingReader(io.BytesIO(DATA))
    got = bytearray()
    while chunk := r.read(read_size):
        got += chunk
        if read_size == -1:
            break
    assert bytes(got) == DATA
    assert r.size == len(DATA)
    assert r.digest == _sha(DATA)


def test_reader_readinto_and_buffered() -> None:
    r = HashingReader(io.BytesIO(DATA))
    buffered = io.BufferedReader(r, buffer_size=3000)
    assert buffered.read(10) == DATA[:10]
    assert buffered.read() == DATA[10:]
    assert r.digest == _sha(DATA)
    assert r.size == len(DATA)


def test_reader_counts_only_bytes_read() -> None:
    r = HashingReader(io.BytesIO(DATA))
    buf = bytearray(100)
    assert r.readinto(buf) == 100
    assert r.size == 100
    assert r.digest == _sha(DATA[:100])


class _ReadOnly:
    """A stream with ``read`` but no ``readinto`` (like some HTTP bodies)."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(min(n, 333) if n > 0 else n)


def test_reader_over_read_only_stream() -> None:
    r = HashingReader(_ReadOnly(DATA))  # type: ignore[arg-type]
    assert r.read() == DATA
    assert r.digest == _sha(DATA)


def test_reader_close_leaves_inner_open_and_verify() -> None:
    inner = io.BytesIO(b"payload")
    r = HashingReader(inner)
    assert r.read() == b"payload"
    r.close()
    assert not inner.closed
    r.verify(_sha(b"payload"))
    with pytest.raises(DigestMismatch):
        r.verify(EMPTY_SHA256)


def test_overlapped_hashing_writer_same_digest_and_bytes() -> None:
    """Chunks hashed on the helper thread (big bytes) and inline (small ones, and buffers the
    caller may change after write returns) give hashlib's digest; the downstream sees every
    chunk unchanged and in order; close stops the thread."""
    import hashlib
    import os
    import threading

    from blobchain.layers.digest import OverlappedHashingWriter

    chunks: list[bytes | bytearray | memoryview] = [os.urandom(1 << 20), b"x" * 10, os.urandom(200_000)]
    mutable = bytearray(os.urandom(100_000))
    got: list[bytes] = []
    with OverlappedHashingWriter(lambda d: got.append(bytes(d))) as w:
        for c in chunks:
            assert w.write(c) == len(c)
        w.write(mutable)
        w.write(memoryview(os.urandom(70_000)).cast("B"))
        want_bytes = b"".join(got)
        mutable[:] = bytes(len(mutable))  # changed after write: must not change the digest
        digest = w.digest
    assert digest == "sha256:" + hashlib.sha256(want_bytes).hexdigest()
    assert w.size == len(want_bytes)
    assert not [t for t in threading.enumerate() if t.name.startswith("diffid-sha256")]
