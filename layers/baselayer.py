"""A base layer (a snapshot against nothing) in one pass: walk, entries and tar bytes fused.

Every entry of a base layer is an Add, so the double walk, the change records, the tar entries
and the writer loop reduce to: list each directory (sorted), and for each entry write its header
and body, descending into a directory right after its own header (pre-order). The native
``encode_batch`` does that for the common entries of a listing (directories, single-link
regular files under 512 KiB, no capability, a plain USTAR header) in C; every other entry goes
through the reference code, :class:`~blobchain.layers.entries` ``EntryWriter.handle`` and
:func:`~blobchain.layers.tarwriter.write_entry`, with the same state (added directories,
hardlink sources). The bytes are those of ``write_tar(tar_entries(diff(None, upper), upper))``;
``tests/layers/test_native.py`` compares the two.
"""

from __future__ import annotations

from collections.abc import Callable
from stat import S_IFDIR, S_IFMT

from blobchain.layers import native as _native
from blobchain.layers import snapshot as _snapshot
from blobchain.layers.changes import ADD
from blobchain.layers.entries import EntryWriter
from blobchain.layers.tarwriter import CHUNK_SIZE, Sink, finish, native_root, write_entry

__all__ = ["native_base_layer", "write_base_tar"]

_DESCEND, _PYTHON = 1, 2  # encode_batch's reasons for stopping (0: end of listing, 3: size limit)


def native_base_layer(upper: object) -> bool:
    """Whether :func:`write_base_tar` can take this snapshot (else use the general path)."""
    lib = _native.lib
    return lib is not None and hasattr(lib, "encode_batch") and native_root(upper) >= 0


def write_base_tar(
    upper: _snapshot.Snapshot,
    write: Callable[[bytes], object],
    progress: Callable[[int, int], None] | None = None,
    *,
    source_date_epoch: int | None = None,
) -> int:
    """The tar stream of ``upper`` against an empty lower, through ``write``; the byte count.

    Same bytes, errors and progress contract as ``write_tar(tar_entries(diff(None, upper),
    upper, source_date_epoch=...), upper, write, progress)``. Requires :func:`native_base_layer`.
    """
    lib = _native.lib
    assert lib is not None
    sink = Sink(write, progress)
    rootfd = native_root(upper)
    root_prefix = upper.path(b"x")[:-1]  # the root with one trailing "/": what paths append to
    # Whiteouts never occur in a base layer, so their epoch does not matter here.
    w = EntryWriter(upper, 0, source_date_epoch)
    added, out, handle = w.added_dirs, w.out, w.handle
    encode = lib.encode_batch
    stack: list[list] = [[b"", upper.listing(b""), 0]]
    while stack:
        frame = stack[-1]
        prefix, listing, i = frame
        n = len(listing)
        child = None
        while i < n:
            data, i, count, reason = encode(
                rootfd, root_prefix, prefix, listing, i, source_date_epoch, added, CHUNK_SIZE
            )
            if count:
                sink.add(data)
                sink.count += count
                if progress is not None:
                    sink.report()
            if reason == _DESCEND:
                child = prefix + listing[i - 1][0]
                break
            if reason == _PYTHON:
                name, st = listing[i]
                i += 1
                path = prefix + name
                handle(ADD, path, st)
                for e in out:
                    write_entry(e, upper, sink, rootfd)
                out.clear()
                if S_IFMT(st.st_mode) == S_IFDIR:
                    child = path
                    break
        if child is None:
            stack.pop()
        else:
            frame[2] = i
            stack.append([child + b"/", upper.listing(child), 0])
    return finish(sink)
