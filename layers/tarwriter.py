"""Tar entries -> one tar stream: headers, bodies read from the snapshot, padding, trailer.

The bytes are what Go 1.19 ``archive/tar.Writer`` produces for the same headers and bodies:
headers from :func:`encode_header`, each body padded with NULs to 512 bytes, and ``Close``'s
exactly two zero blocks with no record padding (spec §3.4, §7 rule 23).

Bodies stream in 1 MiB reads and small pieces are batched into ~1 MiB writes, so memory stays
flat whatever the file or layer size. A body is checked against the walk (inode, device, mtime,
size) before and after it is read, and must end exactly at ``size``: any mismatch raises
:class:`FileChanged`, never a torn or silently wrong tar. Errors propagate; the caller discards
whatever was written.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import Any

from blobchain.layers import native as _native
from blobchain.layers import snapshot as _snapshot
from blobchain.layers.errors import BlobchainError, FileChanged, InvalidArgument, UnreadableFile
from blobchain.layers.tarentry import (
    TYPE_BLOCK,
    TYPE_CHAR,
    TYPE_DIR,
    TYPE_FIFO,
    TYPE_LINK,
    TYPE_SYMLINK,
    TarEntry,
)
from blobchain.layers.tarheader import BLOCK_SIZE, encode_header

__all__ = ["CHUNK_SIZE", "Sink", "finish", "native_root", "write_entry", "write_tar"]

CHUNK_SIZE = 1 << 20  # body read size and write batch size
_NATIVE_MAX = CHUNK_SIZE // 2  # bodies below this are read by the native helper in one piece
_PROGRESS_ENTRIES = 64
_PROGRESS_BYTES = 4 << 20
_ZEROS = bytes(BLOCK_SIZE)
_TRAILER = bytes(2 * BLOCK_SIZE)
# Go isHeaderOnlyType: these never carry a body, whatever Size says.
_HEADER_ONLY = frozenset((TYPE_LINK, TYPE_SYMLINK, TYPE_CHAR, TYPE_BLOCK, TYPE_DIR, TYPE_FIFO))


class Sink:
    """Batches small pieces into ~1 MiB writes (large chunks pass through without a copy) and
    rate-limits progress reports."""

    __slots__ = ("count", "next_bytes", "next_count", "parts", "pending", "progress", "write", "written")

    def __init__(self, write: Callable[[bytes], object], progress: Callable[[int, int], None] | None) -> None:
        self.write = write
        self.progress = progress
        self.parts: list[bytes] = []
        self.pending = 0
        self.written = 0
        self.count = 0  # entries finished
        self.next_count = _PROGRESS_ENTRIES
        self.next_bytes = _PROGRESS_BYTES

    def add(self, data: bytes) -> None:
        self.parts.append(data)
        self.pending += len(data)
        if self.pending >= CHUNK_SIZE:
            self.flush()

    def add_large(self, data: bytes) -> None:
        self.flush()
        self.write(data)
        self.written += len(data)

    def flush(self) -> None:
        if self.parts:
            data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
            self.parts = []
            self.pending = 0
            self.write(data)
            self.written += len(data)

    def report(self) -> None:
        """Call ``progress`` if 64 entries or 4 MiB have passed since the last call."""
        total = self.written + self.pending
        if self.progress is not None and (self.count >= self.next_count or total >= self.next_bytes):
            self.progress(self.count, total)
            self.next_count = self.count + _PROGRESS_ENTRIES
            self.next_bytes = total + _PROGRESS_BYTES


def write_tar(
    entries: Iterable[TarEntry],
    snapshot: Any,
    write: Callable[[bytes], object],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write the tar stream for ``entries`` through ``write``; return the number of bytes.

    ``snapshot`` provides ``open_file(rel: bytes) -> int`` (a read-only fd, symlinks never
    followed); it is used for regular entries with ``size > 0``. ``write`` receives immutable
    ``bytes`` it may keep. ``progress(entries_written, bytes_written)`` is called at most every
    64 entries or 4 MiB, and once at the end.

    Raises :class:`FileChanged` when a body does not match its entry (replaced, resized,
    modified while read, vanished), :class:`UnreadableFile` on read errors, and whatever
    :func:`encode_header` or ``snapshot.open_file`` raise.
    """
    sink = Sink(write, progress)
    rootfd = native_root(snapshot)
    for e in entries:
        write_entry(e, snapshot, sink, rootfd)
    return finish(sink)


def native_root(snapshot: Any) -> int:
    """The root descriptor the native body reader may open beneath, or -1 for the Python path.

    The native read opens with openat2 exactly as :meth:`Snapshot.open_file` does; any other
    snapshot type (or the openat2-less fallback walk) is read by the Python code."""
    if _native.lib is not None and type(snapshot) is _snapshot.Snapshot and _snapshot.use_openat2:
        return int(snapshot.fd)
    return -1


def write_entry(e: TarEntry, snapshot: Any, sink: Sink, rootfd: int) -> None:
    """One entry: its header, then its body padded to 512 bytes (see :func:`write_tar`)."""
    header = encode_header(e)
    size = e.size
    if size > 0 and e.typeflag not in _HEADER_ONLY:
        if rootfd >= 0 and size < _NATIVE_MAX and e.source is not None:
            # header + body + padding in one piece, or None on any anomaly (then the Python
            # path below reads the file again and raises the precise error).
            piece = _native.lib.read_body(rootfd, e.source, size, e.ino, e.dev, e.mtime_ns, header)  # type: ignore[union-attr]
            if piece is not None:
                sink.add(piece)
                sink.count += 1
                if sink.progress is not None:
                    sink.report()
                return
        sink.add(header)
        _copy_body(e, snapshot, sink)
        sink.add(_ZEROS[: -size % BLOCK_SIZE])
    else:
        sink.add(header)
    sink.count += 1
    if sink.progress is not None:
        sink.report()


def finish(sink: Sink) -> int:
    """Close's two zero blocks, the last write and progress report; the stream's byte count."""
    sink.add(_TRAILER)
    sink.flush()
    if sink.progress is not None:
        sink.progress(sink.count, sink.written)
    return sink.written


def _open(e: TarEntry, snapshot: Any) -> int:
    if e.source is None:
        raise InvalidArgument(f"regular entry {e.name!r} has a body but no source", name=e.name)
    try:
        return int(snapshot.open_file(e.source))
    except BlobchainError:
        raise
    except FileNotFoundError as err:  # a stand-in snapshot's raw error: the file vanished
        raise FileChanged(f"{e.source!r} vanished", path=e.source) from err
    except OSError as err:
        raise UnreadableFile(f"cannot open {e.source!r}: {err}", path=e.source) from err


def _changed(e: TarEntry, what: str) -> FileChanged:
    return FileChanged(f"{e.source!r} changed while writing the layer: {what}", path=e.source, name=e.name)


def _check_walked(e: TarEntry, st: os.stat_result) -> None:
    # Zero means "not recorded by the walk", so only set fields are compared.
    if not stat.S_ISREG(st.st_mode):
        raise _changed(e, "no longer a regular file")
    if st.st_size != e.size:
        raise _changed(e, f"size {st.st_size} != {e.size}")
    if e.ino and st.st_ino != e.ino:
        raise _changed(e, "replaced (inode differs)")
    if e.dev and st.st_dev != e.dev:
        raise _changed(e, "replaced (device differs)")
    if e.mtime_ns and st.st_mtime_ns != e.mtime_ns:
        raise _changed(e, "mtime differs")


def _copy_body(e: TarEntry, snapshot: Any, sink: Sink) -> None:
    fd = _open(e, snapshot)
    try:
        before = os.fstat(fd)
        _check_walked(e, before)
        remaining = e.size
        # Reads end on CHUNK_SIZE boundaries of the stream (the first one is short), so a big
        # body reaches the compressor as whole 1 MiB blocks it can keep without a copy.
        pos = sink.written + sink.pending
        # Exactly ``size`` bytes are read; growth, shrinkage or rewrites during the read show in
        # the fstat after it (size, mtime, ctime), which saves an EOF read per file.
        while remaining:
            want = CHUNK_SIZE - pos % CHUNK_SIZE
            try:
                chunk = os.read(fd, remaining if remaining < want else want)
            except OSError as err:
                raise UnreadableFile(f"cannot read {e.source!r}: {err}", path=e.source) from err
            n = len(chunk)
            if not n:
                raise _changed(e, f"ended {remaining} bytes early")
            remaining -= n
            pos += n
            if n >= CHUNK_SIZE // 2:
                sink.add_large(chunk)
            else:
                sink.add(chunk)
            if sink.progress is not None:
                sink.report()
        after = os.fstat(fd)
        if after.st_size > e.size:
            raise _changed(e, f"grew past {e.size} bytes while being read")
        # ctime moves on any write or metadata change, even one that restores mtime.
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
            before.st_size,
            before.st_mtime_ns,
            before.st_ctime_ns,
        ):
            raise _changed(e, "modified while being read")
    finally:
        os.close(fd)
