"""BuildKit's Windows layer rewrite (``util/winlayers`` ``makeWindowsLayer``), with fixed times.

BuildKit reads containerd's diff back with Go's ``tar.Reader`` and rewrites every header
(spec §1.7):

- two synthetic directories first, ``Hives`` then ``Files`` (no trailing slash);
- every entry renamed ``Files/<name>``, and a non-empty linkname (hardlink source or symlink
  target alike) prefixed the same way;
- directories: ``Mode |= 0o40000``, ``MSWINDOWS.fileattr=16``; regular files, whiteouts
  included: ``Mode |= 0o100000``, ``MSWINDOWS.fileattr=32``; each of those (not ``Hives`` and
  ``Files``) gets the fixed ``MSWINDOWS.rawsd`` security descriptor of its kind; symlinks,
  hardlinks and devices get neither;
- ``LIBARCHIVE.creationtime = "<sec>.<ns>"`` on every header: BuildKit skips it only for Go's
  zero ``time.Time``, and a time read back from a tar (``time.Unix(sec, 0)``, even sec 0) is
  never that;
- records the reader extracted (the capability xattr) carried over; Format forced to PAX.

Unlike BuildKit, ``Hives`` and ``Files`` carry ``epoch`` (whole seconds) instead of
``time.Now()``, so the layer is reproducible and gets no fractional PAX ``mtime``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from blobchain.layers.tarentry import TYPE_DIR, TYPE_REG, TarEntry

__all__ = ["SD_DIR", "SD_FILE", "windows_entries"]

KEY_FILEATTR = "MSWINDOWS.fileattr"
KEY_RAWSD = "MSWINDOWS.rawsd"
KEY_CREATIONTIME = "LIBARCHIVE.creationtime"

# Base64 self-relative security descriptors, the constants of BuildKit util/winlayers/differ.go
# (addSecurityDescriptor; moby/buildkit commit 01e935cff5041a32d496db42d46da95409128909).
# Directories: O:BAG:SYD:(A;OICI;FA;;;BA)(A;OICI;FA;;;SY)(A;;FA;;;BA)(A;OICIIO;GA;;;CO)
#              (A;OICI;0x1200a9;;;BU)(A;CI;LC;;;BU)(A;CI;DC;;;BU)
SD_DIR = (
    b"AQAEgBQAAAAkAAAAAAAAADAAAAABAgAAAAAABSAAAAAgAgAAAQEAAAAAAAUSAAAAAgCoAAcAAAAAAxgA/wEfAAECAAAAAAAF"
    b"IAAAACACAAAAAxQA/wEfAAEBAAAAAAAFEgAAAAAAGAD/AR8AAQIAAAAAAAUgAAAAIAIAAAALFAAAAAAQAQEAAAAAAAMAAAAA"
    b"AAMYAKkAEgABAgAAAAAABSAAAAAhAgAAAAIYAAQAAAABAgAAAAAABSAAAAAhAgAAAAIYAAIAAAABAgAAAAAABSAAAAAhAgAA"
)
# Regular files: O:BAG:SYD:(A;;FA;;;BA)(A;;FA;;;SY)(A;;0x1200a9;;;BU)
SD_FILE = (
    b"AQAEgBQAAAAkAAAAAAAAADAAAAABAgAAAAAABSAAAAAgAgAAAQEAAAAAAAUSAAAAAgBMAAMAAAAAABgA/wEfAAECAAAAAAAF"
    b"IAAAACACAAAAABQA/wEfAAEBAAAAAAAFEgAAAAAAGACpABIAAQIAAAAAAAUgAAAAIQIAAA=="
)

_S_IFDIR = 0o40000
_S_IFREG = 0o100000
_PREFIX = b"Files/"


def _creation_time(mtime: int) -> bytes:
    # Go fmt "%d.%d" of (Unix(), Nanosecond()); our times are whole seconds.
    return b"%d.0" % mtime


def _synthetic(name: bytes, epoch: int) -> TarEntry:
    return TarEntry(
        name=name,
        typeflag=TYPE_DIR,
        mode=_S_IFDIR,
        mtime=epoch,
        pax={KEY_CREATIONTIME: _creation_time(epoch), KEY_FILEATTR: b"16"},
    )


def windows_entries(entries: Iterable[TarEntry], *, epoch: int = 0) -> Iterator[TarEntry]:
    """Yield the Windows-layer form of ``entries``: ``Hives``, ``Files``, then each entry rewritten.

    ``epoch`` (whole seconds) is the time of the two synthetic directories. Input entries are
    not modified; bodies still come from each entry's ``source``.
    """
    yield _synthetic(b"Hives", epoch)
    yield _synthetic(b"Files", epoch)
    for e in entries:
        pax = dict(e.pax)
        mode = e.mode
        if e.typeflag == TYPE_DIR:
            mode |= _S_IFDIR
            pax[KEY_FILEATTR] = b"16"
            pax[KEY_RAWSD] = SD_DIR
        elif e.typeflag == TYPE_REG:
            mode |= _S_IFREG
            pax[KEY_FILEATTR] = b"32"
            pax[KEY_RAWSD] = SD_FILE
        pax[KEY_CREATIONTIME] = _creation_time(e.mtime)
        yield TarEntry(
            name=_PREFIX + e.name,
            typeflag=e.typeflag,
            mode=mode,
            uid=e.uid,
            gid=e.gid,
            size=e.size,
            mtime=e.mtime,
            linkname=_PREFIX + e.linkname if e.linkname else b"",
            devmajor=e.devmajor,
            devminor=e.devminor,
            pax=pax,
            source=e.source,
            ino=e.ino,
            dev=e.dev,
            mtime_ns=e.mtime_ns,
        )
