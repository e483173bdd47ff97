"""The composition point: one layer, in one streaming pass.

    walk -> tar entries -> tar bytes -> sha256 (diffID) -> compressor -> sink

The sink is any ``write(bytes)`` callable (a content-store ingest, which hashes what it receives
and so yields the blob digest). Nothing is held whole in memory or read twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from blobchain.layers.baselayer import native_base_layer, write_base_tar
from blobchain.layers.changes import Change, diff
from blobchain.layers.compress import compressor_id, open_compressor, open_decompressor
from blobchain.layers.digest import HashingWriter, OverlappedHashingWriter
from blobchain.layers.entries import tar_entries
from blobchain.layers.errors import DigestMismatch, UnsupportedCompression
from blobchain.layers.lane import Lane
from blobchain.layers.overlay import LowerView, upper_changes
from blobchain.layers.records import Compression, LayerOptions
from blobchain.layers.snapshot import Snapshot
from blobchain.layers.tarentry import TarEntry
from blobchain.layers.tarwriter import write_tar
from blobchain.layers.windows import windows_entries

__all__ = ["LayerSource", "LayerStats", "convert_blob", "write_layer"]

Progress = Callable[[int, int], None]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LayerSource:
    """What to diff. ``kind`` is "rootfs" (``upper`` is a full filesystem state, ``lower`` the
    parent's full state or None) or "upper" (``upper`` is an overlay upper dir holding only the
    changes, ``lower`` the merged view of the ancestors' upper dirs, or None for a base)."""

    upper: Snapshot
    lower: Snapshot | LowerView | None = None
    kind: str = "rootfs"
    windows: bool = False


@dataclass(frozen=True)
class LayerStats:
    diff_id: str
    tar_size: int
    compressor: str


def _changes(src: LayerSource) -> Iterator[Change]:
    if src.kind == "upper":
        return upper_changes(src.lower, src.upper)  # type: ignore[arg-type]
    return diff(src.lower, src.upper)  # type: ignore[arg-type]


def check_windows(opts: LayerOptions) -> None:
    """BuildKit's winlayers differ accepts only tar and tar+gzip."""
    if opts.compression not in (Compression.UNCOMPRESSED, Compression.GZIP):
        raise UnsupportedCompression(
            f"windows layers support only uncompressed and gzip, not {opts.compression}",
            compression=str(opts.compression),
        )


def entries_for(src: LayerSource, opts: LayerOptions) -> Iterator[TarEntry]:
    entries = tar_entries(
        _changes(src),
        src.upper,
        whiteout_epoch=opts.whiteout_epoch,
        source_date_epoch=opts.source_date_epoch,
    )
    if src.windows:
        # Deterministic where BuildKit uses time.Now(): the epoch, else 0.
        entries = windows_entries(entries, epoch=opts.source_date_epoch or 0)
    return entries


class _OverlappedSink:
    """``sink`` called on one helper thread (a :class:`~blobchain.layers.lane.Lane`), in order,
    a few chunks in flight: the store's own hashing and file writes (both release the GIL)
    overlap the walk and the compressor.

    Only immutable ``bytes`` are handed over (anything else is written inline, once the chunks
    in flight are done). An error of the sink surfaces on the next call or at :meth:`close`."""

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        self._sink = sink
        self._lane: Lane[bytes] = Lane(sink, name="blob-sink")

    def __call__(self, data: bytes) -> None:
        if type(data) is bytes and len(data) >= _OVERLAP_MIN:
            self._lane.put(data)
        else:
            self._lane.drain()
            self._sink(data)

    def close(self) -> None:
        """Wait for the chunks in flight (raising the first error) and stop the thread."""
        self._lane.close()


_OVERLAP_MIN = 64 << 10


def write_layer(
    src: LayerSource,
    opts: LayerOptions,
    sink: Callable[[bytes], object],
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> LayerStats:
    """Write ``src``'s layer blob to ``sink`` and return its diffID. Raises before anything is
    committed if the walk fails (the caller aborts its ingest)."""
    if src.windows:
        check_windows(opts)
    out = _OverlappedSink(sink)
    try:
        with open_compressor(opts, out, threads=threads) as comp, OverlappedHashingWriter(comp.write) as tee:
            if (
                src.lower is None
                and src.kind == "rootfs"
                and not src.windows
                and native_base_layer(src.upper)
            ):
                # A base layer: the same bytes from the fused, native-assisted walk.
                write_base_tar(src.upper, tee.write, progress, source_date_epoch=opts.source_date_epoch)
            else:
                write_tar(entries_for(src, opts), src.upper, tee.write, progress)
    except BaseException:
        with contextlib.suppress(Exception):
            out.close()  # the first error is the one to report; the sink sees nothing more
        raise
    out.close()  # every byte is in the sink when this returns
    return LayerStats(diff_id=tee.digest, tar_size=tee.size, compressor=compressor_id(opts))


def convert_blob(
    reader: BinaryIO,
    source: Compression,
    expected_diff_id: str,
    opts: LayerOptions,
    sink: Callable[[bytes], object],
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> LayerStats:
    """Recompress an existing blob into ``opts``' compression (BuildKit ``ensureCompression``):
    the diffID is unchanged and verified, the snapshot is not walked again."""
    plain = open_decompressor(reader, source)
    with open_compressor(opts, sink, threads=threads) as comp:
        tee = HashingWriter(comp.write)
        while chunk := plain.read(_CHUNK):
            tee.write(chunk)
            if progress:
                progress(0, tee.size)
        if tee.digest != expected_diff_id:
            raise DigestMismatch(
                "blob does not decompress to its recorded diffID",
                expected=expected_diff_id,
                got=tee.digest,
            )
    return LayerStats(diff_id=tee.digest, tar_size=tee.size, compressor=compressor_id(opts))
