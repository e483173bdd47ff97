"""Write a file front to back, bypassing the page cache (``O_DIRECT``) where the filesystem allows.

Why: a blob is written once, fsynced before it is published, and rarely read back at once. On
the 2-core machines blobchain is measured on, the page cache costs more CPU than any compressor
on incompressible data: a buffered 1 GiB write plus fsync took 2.6-2.8 s of system time, the
same bytes written with ``O_DIRECT`` 0.3-0.4 s, and the wall time fell from 4.6 s to 2.6-3.3 s
(bench/README.md, "2026-12-01 late: blob writes"). That CPU goes back to the walk, the hashes and
the compressor.

How: bytes are copied into one of two page-aligned buffers of ``STEP`` bytes; each full buffer
is written at its offset by one helper thread (a :class:`~blobchain.layers.lane.Lane`), while the
caller fills the other. What is left at :meth:`finish` (less than a step, so not aligned) is
written after ``O_DIRECT`` is switched off, then the file is fsynced. Where ``O_DIRECT`` cannot
be set (a filesystem or system without it) or a direct write is refused with ``EINVAL``
(alignment rules of a device), the writer falls back to plain writes for the rest of the file:
the bytes on disk are the same either way. Plain steps get an early writeback hint
(``sync_file_range``), so the fsync waits for the last step only. A file shorter than one step
never sees a direct write, so small blobs (manifests, configs) cost no more than before.

Memory: two steps (16 MiB) per writer, allocated on the first write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import sys
from typing import Any

from blobchain.layers.lane import Lane

__all__ = ["STEP", "DirectFileWriter", "set_direct", "start_writeback"]

STEP = 8 << 20  # one direct write: large enough to keep the device busy, a multiple of any block size
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, no wait
_sync_file_range: Any = None  # the libc function once looked up; False where there is none


def start_writeback(fd: int, offset: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages from ``offset`` to its end, without
    waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``). A hint only: durability is
    still the fsync. False where the call is unavailable or refused (then the caller stops
    asking)."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                fn.restype = ctypes.c_int
                _sync_file_range = fn  # a CDLL call releases the GIL while the kernel queues I/O
            except (OSError, AttributeError):
                pass
    if not _sync_file_range:
        return False
    return bool(_sync_file_range(fd, offset, 0, _SYNC_FILE_RANGE_WRITE) == 0)


def set_direct(fd: int, on: bool) -> bool:
    """Switch ``O_DIRECT`` on or off for ``fd``; False where the system or filesystem refuses."""
    if not _O_DIRECT:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
    except OSError:
        return False
    return True


class DirectFileWriter:
    """Sequential writes to ``fd`` (opened for writing, empty, owned by the caller).

    :meth:`write` copies and returns; :meth:`finish` writes the rest and fsyncs; :meth:`abandon`
    stops without either. Errors of the helper thread (``ENOSPC``, ``EIO``) are raised as the
    original :class:`OSError` by the next :meth:`write` or by :meth:`finish`."""

    def __init__(self, fd: int, *, direct: bool = True) -> None:
        self._fd = fd
        self.direct = bool(direct) and set_direct(fd, True)
        self._bufs: list[mmap.mmap] = []
        self._current = 0  # which buffer is being filled
        self._fill = 0  # bytes in it
        self._offset = 0  # file offset of the buffer being filled
        self._step = STEP
        self._writeback = True  # plain steps: ask for early writeback until refused once
        self._lane: Lane[tuple[mmap.mmap, int]] = Lane(self._write_step, name="blob-write", depth=1)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        if not self._bufs:
            # Two buffers and at most one write in flight: the one being filled is never the one
            # the thread is writing (the lane's put waits for the earlier write first).
            self._bufs = [mmap.mmap(-1, self._step), mmap.mmap(-1, self._step)]
        while mv:
            buf = self._bufs[self._current]
            n = min(len(mv), self._step - self._fill)
            buf[self._fill : self._fill + n] = mv[:n]
            self._fill += n
            mv = mv[n:]
            if self._fill == self._step:
                self._lane.put((buf, self._offset))
                self._offset += self._step
                self._current ^= 1
                self._fill = 0

    def _write_step(self, job: tuple[mmap.mmap, int]) -> None:
        buf, offset = job
        view = memoryview(buf)
        try:
            done = 0
            while done < len(view):
                try:
                    done += os.pwrite(self._fd, view[done:], offset + done)
                except OSError as e:
                    # A device with stricter alignment than a page, or a filesystem that took the
                    # flag but not the write: the rest of the file goes through the page cache.
                    if e.errno != errno.EINVAL or not self.direct:
                        raise
                    set_direct(self._fd, False)
                    self.direct = False
        finally:
            view.release()
        if not self.direct and self._writeback:
            self._writeback = start_writeback(self._fd, offset)

    def finish(self) -> None:
        """Write what is buffered, wait for every write, fsync. The file is then complete and durable."""
        try:
            self._lane.close()
            if self._fill:
                if self.direct:
                    set_direct(self._fd, False)  # the tail is not a whole aligned step
                view = memoryview(self._bufs[self._current])[: self._fill]
                try:
                    done = 0
                    while done < self._fill:
                        done += os.pwrite(self._fd, view[done:], self._offset + done)
                finally:
                    view.release()
            os.fsync(self._fd)
        finally:
            self._free()

    def abandon(self) -> None:
        """Stop: wait for the write in flight (its error is dropped), write nothing more."""
        with contextlib.suppress(Exception):
            self._lane.close()
        self._free()

    def _free(self) -> None:
        bufs, self._bufs = self._bufs, []
        for b in bufs:
            b.close()
