"""Changes -> tar entries: containerd 1.6.20 ``archive.ChangeWriter.HandleChange``.

What this decides (and the encoder does not): which changes become entries (sockets and
unhardlinked Unmodified changes do not), the header fields, parent directories pulled in before
their first changed descendant, hardlink placement, whiteout entries and the capability record.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from stat import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK
from typing import Protocol

from blobchain.layers.changes import Change, ChangeKind
from blobchain.layers.errors import FileChanged, InvalidArgument
from blobchain.layers.tarentry import (
    TYPE_BLOCK,
    TYPE_CHAR,
    TYPE_DIR,
    TYPE_FIFO,
    TYPE_LINK,
    TYPE_REG,
    TYPE_SYMLINK,
    TarEntry,
)

__all__ = ["CAPABILITY_PAX_KEY", "EntrySource", "EntryWriter", "tar_entries"]

CAPABILITY_PAX_KEY = "SCHILY.xattr.security.capability"
_NS = 1_000_000_000
_TYPEFLAGS = {
    S_IFREG: TYPE_REG,
    S_IFDIR: TYPE_DIR,
    S_IFLNK: TYPE_SYMLINK,
    S_IFCHR: TYPE_CHAR,
    S_IFBLK: TYPE_BLOCK,
    S_IFIFO: TYPE_FIFO,
}
_DEV_BITS = S_IFBLK | S_IFCHR  # containerd's loose `mode&S_IFBLK != 0 || mode&S_IFCHR != 0`
_DELETE = ChangeKind.DELETE
_UNMODIFIED = ChangeKind.UNMODIFIED
_MODIFY = ChangeKind.MODIFY


class EntrySource(Protocol):
    """What the entries need of the upper tree (a Snapshot, or any view with these methods)."""

    def lstat(self, rel: bytes) -> os.stat_result: ...
    def readlink(self, rel: bytes) -> bytes: ...
    def capability(self, rel: bytes) -> bytes | None: ...


def tar_entries(
    changes: Iterable[Change],
    upper: EntrySource,
    *,
    whiteout_epoch: int = 0,
    source_date_epoch: int | None = None,
) -> Iterator[TarEntry]:
    """The tar entries for ``changes`` read from ``upper``, in containerd's order.

    ``whiteout_epoch`` replaces containerd 1.6's wall-clock whiteout time; ``source_date_epoch``
    clamps every entry's mtime (whiteouts included) when later, as containerd 1.7 does.
    """
    w = EntryWriter(upper, whiteout_epoch, source_date_epoch)
    out = w.out
    handle = w.handle
    for ch in changes:
        handle(*ch)  # (kind, path, st)
        if out:
            yield from out
            out.clear()


class EntryWriter:
    """The state of one layer's entries: :meth:`handle` turns one change into ``out``'s entries
    (its parents first, hardlink peers after), remembering directories emitted and hardlink
    sources. :func:`tar_entries` drives it; so does the fused base-layer writer."""

    __slots__ = ("added_dirs", "inode_refs", "inode_src", "out", "sde", "upper", "whiteout_mtime")

    def __init__(self, upper: EntrySource, whiteout_epoch: int, sde: int | None) -> None:
        self.upper = upper
        self.sde = sde
        self.whiteout_mtime = whiteout_epoch if sde is None else min(whiteout_epoch, sde)
        self.out: list[TarEntry] = []
        self.added_dirs: set[bytes] = set()
        self.inode_src: dict[int, bytes] = {}
        self.inode_refs: dict[int, list[bytes]] = {}

    def handle(self, kind: ChangeKind, path: bytes, st: os.stat_result | None) -> None:
        if kind == _DELETE:
            parent, _, base = path.rpartition(b"/")
            name = parent + b"/.wh." + base if parent else b".wh." + base
            entry = TarEntry(name, TYPE_REG, mtime=self.whiteout_mtime)
            self.include_parents(name)
            self.out.append(entry)
            return
        if st is None:
            raise InvalidArgument("a change other than Delete needs its stat", path=path)
        mode = st.st_mode
        fmt = S_IFMT(mode)
        if fmt == S_IFSOCK:
            return  # containerd skips sockets, without their parents
        typeflag = _TYPEFLAGS.get(fmt)
        if typeflag is None:
            raise InvalidArgument(f"unknown file mode {mode:o}", path=path)
        upper = self.upper
        name = path + b"/" if fmt == S_IFDIR else path
        mtime_ns = st.st_mtime_ns
        sde = self.sde
        # Go Time.Truncate(1s) is a floor (also before 1970); containerd 1.7 clamps first.
        mtime = sde if sde is not None and mtime_ns > sde * _NS else mtime_ns // _NS
        size = st.st_size if fmt == S_IFREG else 0
        linkname = upper.readlink(path) if fmt == S_IFLNK else b""
        devmajor = devminor = 0
        if mode & _DEV_BITS:
            rdev = st.st_rdev
            if rdev:
                devmajor = os.major(rdev)
                devminor = os.minor(rdev)

        extra: list[bytes] | None = None
        if fmt != S_IFDIR and st.st_nlink > 1:
            ino = st.st_ino
            src = self.inode_src.get(ino)
            if src is not None:
                typeflag = TYPE_LINK
                linkname = src
                size = 0
            elif kind == _UNMODIFIED:
                # Not in the diff itself: linked to the first changed peer once one shows up.
                self.inode_refs.setdefault(ino, []).append(name)
                return
            else:
                self.inode_src[ino] = name
                extra = self.inode_refs.pop(ino, None)
        elif kind == _UNMODIFIED:
            return

        cap = upper.capability(path)
        # One constructor call per entry (this runs for every emitted entry); a body's entry
        # also records where it comes from and what the walk saw, for the writer's checks.
        if typeflag == TYPE_REG and size > 0:
            entry = TarEntry(
                name, typeflag, mode & 0o7777, st.st_uid, st.st_gid, size, mtime, linkname, devmajor, devminor,
                {}, path, st.st_ino, st.st_dev, mtime_ns,
            )  # fmt: skip
        else:
            entry = TarEntry(
                name, typeflag, mode & 0o7777, st.st_uid, st.st_gid, size, mtime, linkname, devmajor, devminor
            )  # fmt: skip
        if cap:
            entry.pax[CAPABILITY_PAX_KEY] = cap

        self.include_parents(path)
        if fmt == S_IFDIR:
            self.added_dirs.add(path)
        self.out.append(entry)

        if extra:
            for peer in extra:
                link = TarEntry(
                    peer,
                    TYPE_LINK,
                    entry.mode,
                    entry.uid,
                    entry.gid,
                    0,
                    entry.mtime,
                    name,
                    entry.devmajor,
                    entry.devminor,
                    dict(entry.pax),
                )
                self.include_parents(peer)
                self.out.append(link)

    def include_parents(self, name: bytes) -> None:
        """containerd ``includeParents``: the parent directory (and, recursively, its parents)
        with the upper's metadata, once, right before the first changed descendant."""
        parent = name.rpartition(b"/")[0]
        if not parent or parent in self.added_dirs:
            return
        self.added_dirs.add(parent)
        try:
            st = self.upper.lstat(parent)
        except (FileNotFoundError, NotADirectoryError):
            raise FileChanged("a parent directory vanished during the walk", path=parent) from None
        if S_IFMT(st.st_mode) != S_IFDIR:
            # containerd stats (follows) here; in a walked tree a parent is always a real
            # directory, so anything else means the tree changed under us.
            raise FileChanged("a parent directory changed during the walk", path=parent)
        self.handle(_MODIFY, parent, st)
