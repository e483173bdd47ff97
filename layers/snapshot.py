"""A confined, read-only view of one snapshot root.

Every path is raw ``bytes`` relative to the root (no leading ``/``; ``b""`` is the root itself).
Nothing here resolves a symlink: entries are ``lstat``-ed, directories are opened beneath a root
descriptor with ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)`` (or, on
kernels without it, a component-by-component ``O_NOFOLLOW`` walk), so a symlink pointing outside
the snapshot is only ever read as a link, never followed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
from collections.abc import Sequence
from typing import Any

from blobchain.layers import native as _native
from blobchain.layers.errors import (
    FileChanged,
    InvalidArgument,
    PathEscapes,
    PathTooLong,
    SnapshotNotFound,
    SnapshotOutsideRoots,
    UnreadableFile,
)

__all__ = ["Snapshot", "open_snapshot"]

_CAPABILITY = b"security.capability"
_NO_XATTR = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})
# xattrs are read through /proc/self/fd/<parent>/<name> (see Snapshot.xattr).
_PROC_FD = os.path.isdir("/proc/self/fd")

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: a file swapped for a FIFO mid-walk must not hang the open; no effect on regular files.
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

# --- openat2 ----------------------------------------------------------------------------------

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (asm-generic table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_syscall() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    # No argtypes: every argument is passed pre-built at full register width (c_long,
    # pointers), which halves the per-call cost of ctypes' conversions on this hot path.
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()
_NR_OPENAT2 = ctypes.c_long(_SYS_OPENAT2)
_HOW_SIZE = ctypes.c_size_t(ctypes.sizeof(_OpenHow))
_hows: dict[int, tuple[_OpenHow, Any]] = {}


def _openat2(dirfd: int, path: bytes, flags: int) -> int:
    cached = _hows.get(flags)
    if cached is None:
        how = _OpenHow(flags, 0, _RESOLVE)
        cached = _hows[flags] = (how, ctypes.byref(how))
    ref = cached[1]
    cfd = ctypes.c_long(dirfd)
    for _ in range(16):
        fd = _syscall(_NR_OPENAT2, cfd, path, ref, _HOW_SIZE)
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):  # EAGAIN: a concurrent rename; retry
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def _probe_openat2() -> bool:
    if _syscall is None or not hasattr(os, "O_PATH"):
        return False
    try:
        os.close(_openat2(-100, b".", os.O_PATH | os.O_CLOEXEC))  # AT_FDCWD
    except OSError:
        # ENOSYS (old kernel) or EPERM (seccomp): use the portable walk instead.
        return False
    return True


# Module switch, read on every open: tests flip it to exercise the fallback walk.
use_openat2: bool = _probe_openat2()


def _walk_open(rootfd: int, path: bytes, flags: int) -> int:
    """The openat2 fallback: one ``openat`` per component, never following a symlink.

    Raises OSError with ELOOP when a component is a symlink (as openat2 would)."""
    parts = path.split(b"/")
    fd = rootfd
    try:
        for part in parts[:-1]:
            nfd = _open_component(fd, part, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, path)
            if fd != rootfd:
                os.close(fd)
            fd = nfd
        return _open_component(fd, parts[-1], flags, path)
    finally:
        if fd != rootfd:
            os.close(fd)


def _open_component(dirfd: int, name: bytes, flags: int, path: bytes) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dirfd)
    except NotADirectoryError:
        # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR: report it as openat2 does.
        if stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
        raise


# --- path checks ------------------------------------------------------------------------------


def _show(path: bytes) -> str:
    """A path for messages: raw bytes shown as text, undecodable bytes escaped."""
    return path.decode("utf-8", "backslashreplace")


def _check_rel(rel: bytes) -> bytes:
    if not isinstance(rel, bytes):
        if isinstance(rel, str):
            rel = os.fsencode(rel)
        else:
            raise InvalidArgument(f"snapshot paths are bytes, got {type(rel).__name__}")
    if not rel:
        return rel
    if rel[:1] == b"/":
        raise PathEscapes("absolute path inside a snapshot", path=rel)
    if b"\0" in rel:
        raise InvalidArgument("NUL byte in path", path=rel)
    if b".." in rel or b"//" in rel or rel[-1:] == b"/" or b"./" in rel or rel == b".":
        for part in rel.split(b"/"):
            if part == b"..":
                raise PathEscapes("'..' in a snapshot path", path=rel)
            if part in (b"", b"."):
                raise InvalidArgument("path is not clean (empty or '.' component)", path=rel)
    return rel


def _raise_open_error(e: OSError, rel: bytes, *, what: str) -> None:
    if e.errno in (errno.ELOOP, errno.EXDEV):
        raise PathEscapes(f"{what} {_show(rel)}: a symlink or '..' is in the way", path=rel) from None
    if e.errno in (errno.EACCES, errno.EPERM):
        raise UnreadableFile(f"{what} {_show(rel)}: permission denied", path=rel) from None
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        raise FileChanged(f"{what} {_show(rel)}: it vanished during the walk", path=rel) from None
    if e.errno == errno.ENAMETOOLONG:
        raise _too_long(rel) from None
    raise e


def _too_long(rel: bytes) -> PathTooLong:
    return PathTooLong(
        f"a path of {len(rel)} bytes in the snapshot is longer than the kernel accepts "
        f"(PATH_MAX {os.pathconf('/', 'PC_PATH_MAX')}): {_show(rel[:96])}...",
        path=rel[:4096],
    )


# --- the snapshot -----------------------------------------------------------------------------


class Snapshot:
    """A read-only view of one directory tree, confined to ``root``.

    Holds a directory descriptor on the root; close it with :meth:`close` (or a ``with`` block).
    Pickles by path, so it can cross process boundaries (the receiver re-opens the root).
    """

    __slots__ = ("__weakref__", "_closed", "_fd", "_lock", "_prefix", "_xdir", "root")

    def __init__(self, root: bytes, fd: int) -> None:
        self.root = root
        self._fd = fd
        self._prefix = root.rstrip(b"/") + b"/"
        self._closed = False
        self._lock = threading.Lock()
        # (directory, descriptor) of the last parent an xattr value was re-read under (values
        # are rare; one cached descriptor serves a directory full of capability-bearing files).
        self._xdir: tuple[bytes, int] | None = None

    # lifecycle

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
                if self._xdir is not None:
                    os.close(self._xdir[1])
                    self._xdir = None

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __reduce__(self) -> tuple[object, ...]:
        return (_reopen, (self.root,))

    def __repr__(self) -> str:
        return f"Snapshot({self.root!r})"

    @property
    def fd(self) -> int:
        """The root directory descriptor (owned by the snapshot; do not close it)."""
        return self._fd

    # lookups

    @property
    def prefix(self) -> bytes:
        """The root with a trailing slash: ``prefix + rel`` is ``rel``'s absolute path."""
        return self._prefix

    def path(self, rel: bytes) -> bytes:
        """The absolute path of ``rel`` (for messages and path-based syscalls)."""
        return self._prefix + rel if rel else self.root

    def open_dir(self, rel: bytes) -> int:
        """A read-only descriptor on directory ``rel``, opened without following any symlink.

        The caller closes it. Raises PathEscapes, FileNotFoundError or NotADirectoryError."""
        rel = _check_rel(rel)
        if not rel:
            return os.dup(self._fd)
        try:
            if use_openat2:
                return _openat2(self._fd, rel, _O_DIR)
            return _walk_open(self._fd, rel, _O_DIR)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EXDEV):
                raise PathEscapes(f"{_show(rel)}: a symlink or '..' is in the way", path=rel) from None
            if e.errno == errno.ENAMETOOLONG:
                raise _too_long(rel) from None
            raise

    def lstat(self, rel: bytes) -> os.stat_result:
        """``lstat`` of ``rel``; raises FileNotFoundError/NotADirectoryError if absent and
        PathEscapes if a parent component is a symlink."""
        rel = _check_rel(rel)
        if not rel:
            return os.fstat(self._fd)
        parent, _, name = rel.rpartition(b"/")
        if not parent:
            return os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        fd = self.open_dir(parent)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)

    def scandir(self, rel: bytes = b"") -> list[tuple[bytes, os.stat_result]]:
        """The entries of directory ``rel`` as (name, lstat), sorted by raw name bytes."""
        fd = self.open_dir(rel) if rel else self._fd
        try:
            lib = _native.lib
            if lib is not None:
                listed = lib.scandir(fd)  # None on any error: listed again below, which raises
                if listed is not None:
                    return listed
            fsencode = os.fsencode
            try:
                with os.scandir(fd) as it:
                    out = [(fsencode(e.name), e.stat(follow_symlinks=False)) for e in it]
            except FileNotFoundError:
                raise FileChanged(f"{_show(rel)} vanished during the walk", path=rel) from None
        finally:
            if fd != self._fd:
                os.close(fd)
        out.sort(key=_first)
        return out

    def listing(self, rel: bytes = b"") -> Sequence[tuple[bytes, os.stat_result]]:
        """:meth:`scandir`'s pairs, kept in C when the extension is on (a ``_speedups.Listing``:
        the native walkers read its stats without building ``stat_result`` objects; indexing
        builds the pair as :meth:`scandir` would). Otherwise (or on any native error, which
        :meth:`scandir` then raises as the named error) the :meth:`scandir` list."""
        lib = _native.lib
        if lib is not None:
            if use_openat2:
                # Opened and listed in one call (openat2 beneath the root, as open_dir does).
                listed = lib.listing_at(self._fd, rel)
            else:
                fd = self.open_dir(rel) if rel else self._fd
                try:
                    listed = lib.listing(fd)
                finally:
                    if fd != self._fd:
                        os.close(fd)
            if listed is not None:
                return listed  # type: ignore[no-any-return]
        return self.scandir(rel)

    def readlink(self, rel: bytes) -> bytes:
        """The raw target of symlink ``rel`` (never resolved)."""
        rel = _check_rel(rel)
        parent, _, name = rel.rpartition(b"/")
        if not parent:
            return os.readlink(name, dir_fd=self._fd)
        fd = self.open_dir(parent)
        try:
            return os.readlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    def xattr(self, rel: bytes, name: bytes | str) -> bytes | None:
        """The raw value of extended attribute ``name`` on ``rel`` itself (lgetxattr), or None.

        Python has no ``getxattrat``. The lookup goes by path (fast; most entries have no such
        xattr), and a value found that way is read again through ``/proc/self/fd/<parent>/<name>``
        with the parent opened beneath the root: a parent swapped for a symlink during the walk
        can hide a value but never bring one in from outside (it raises PathEscapes)."""
        return self._getxattr(_check_rel(rel), name)

    def capability(self, rel: bytes) -> bytes | None:
        """The raw ``security.capability`` xattr of ``rel`` (None when absent or unsupported)."""
        # Runs once per emitted entry: the full check only for a suspicious path (walked paths
        # are clean; open_dir checks the parent anyway).
        if rel[:1] == b"/" or rel.find(b"..") != -1:  # find: `in` costs a caught TypeError per call
            _check_rel(rel)
        lib = _native.lib
        if lib is not None and rel:
            try:
                if lib.lgetxattr(self._prefix + rel, _CAPABILITY) is None:
                    return None  # absent, the common case: straight back
            except OSError:
                pass  # _getxattr looks again and turns the error into the named one
        return self._getxattr(rel, _CAPABILITY)

    def _getxattr(self, rel: bytes, name: bytes | str) -> bytes | None:
        try:
            if not rel:
                return os.getxattr(self._fd, name)
            try:
                lib = _native.lib
                if lib is not None and type(name) is bytes:
                    # Absent (the common case) is None here, not a raised and caught OSError.
                    value = lib.lgetxattr(self._prefix + rel, name)
                    if value is None:
                        return None
                else:
                    value = os.getxattr(self._prefix + rel, name, follow_symlinks=False)
            except OSError as e:
                # Absolute path over PATH_MAX: read through the parent's descriptor below.
                if e.errno != errno.ENAMETOOLONG or not _PROC_FD:
                    raise
                value = b""
            if not _PROC_FD:  # pragma: no cover - no procfs: the path lookup is all there is
                return value
            parent, _, base = rel.rpartition(b"/")
            with self._lock:  # the cached descriptor must not be closed while in use
                cached = self._xdir
                if parent and (cached is None or cached[0] != parent):
                    fd = self.open_dir(parent)
                    if cached is not None:
                        os.close(cached[1])
                    cached = self._xdir = (parent, fd)
                dirfd = cached[1] if parent else self._fd  # type: ignore[index]
                return os.getxattr(b"/proc/self/fd/%d/%s" % (dirfd, base), name, follow_symlinks=False)
        except OSError as e:
            if e.errno in _NO_XATTR:
                return None
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FileChanged(f"{_show(rel)} vanished during the walk", path=rel) from None
            raise

    def open_file(self, rel: bytes) -> int:
        """A read-only descriptor on ``rel``; never follows a symlink in any component.

        A symlink in the way raises PathEscapes, EACCES UnreadableFile, a vanished file
        FileChanged. The caller closes the descriptor."""
        rel = _check_rel(rel)
        if not rel:
            raise InvalidArgument("cannot open the snapshot root as a file")
        try:
            if use_openat2:
                return _openat2(self._fd, rel, _O_FILE)
            return _walk_open(self._fd, rel, _O_FILE)
        except OSError as e:
            _raise_open_error(e, rel, what=f"cannot open {self._prefix + rel!r}")
            raise  # unreachable: keeps type checkers happy


def _first(item: tuple[bytes, os.stat_result]) -> bytes:
    return item[0]


def _reopen(root: bytes) -> Snapshot:
    return open_snapshot(root)


def open_snapshot(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes], roots: Sequence[str] | None = None
) -> Snapshot:
    """Open the snapshot directory ``path`` (symlinks in ``path`` itself are resolved once).

    Missing or not a directory -> SnapshotNotFound. With ``roots``, a path whose realpath is not
    inside one of the roots' realpaths -> SnapshotOutsideRoots.
    """
    raw = os.fsencode(path)
    real = os.path.realpath(raw)
    try:
        st = os.stat(real)
    except OSError:
        raise SnapshotNotFound(f"snapshot {_show(raw)} does not exist", snapshot=raw) from None
    if not stat.S_ISDIR(st.st_mode):
        raise SnapshotNotFound(f"snapshot {_show(raw)} is not a directory", snapshot=raw)
    if roots is not None and not _inside(real, roots):
        raise SnapshotOutsideRoots(
            f"snapshot {_show(raw)} is outside the allowed roots", snapshot=raw, roots=list(roots)
        )
    try:
        fd = os.open(real, _O_DIR | os.O_NOFOLLOW)
    except OSError:
        raise SnapshotNotFound(f"snapshot {_show(raw)} cannot be opened", snapshot=raw) from None
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise SnapshotNotFound(f"snapshot {_show(raw)} changed while being opened", snapshot=raw)
    if roots is not None and _PROC_FD:
        # The roots were checked on a path string: check where the descriptor really is, in case
        # a component was swapped for a symlink between realpath() and open().
        try:
            opened = os.readlink(b"/proc/self/fd/%d" % fd)
        except OSError:  # pragma: no cover - procfs without fd links
            opened = real
        if not _inside(opened, roots):
            os.close(fd)
            raise SnapshotOutsideRoots(
                f"snapshot {_show(raw)} resolved outside the allowed roots while being opened",
                snapshot=raw,
                roots=list(roots),
            )
    return Snapshot(real, fd)


def _inside(real: bytes, roots: Sequence[str]) -> bool:
    for r in roots:
        rr = os.path.realpath(os.fsencode(r)).rstrip(b"/") + b"/"
        if real == rr.rstrip(b"/") or real.startswith(rr):
            return True
    return False
