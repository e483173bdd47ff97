"""Apply one OCI layer tar onto a directory (image-spec ``layer.md`` applier semantics).

The model is containerd ``archive/tar.go`` ``applyNaive`` with a stricter path policy:

- ``<dir>/.wh.<name>`` deletes ``<dir>/<name>`` (a file or a whole tree) and is never created;
  ``<dir>/.wh..wh..opq`` deletes every child of ``<dir>`` that this layer did not unpack, so it
  acts as if it came before the directory's other entries wherever it sits in the stream.
- Directory onto directory: the entry's attributes replace the existing ones (children stay).
  Any other existing path is removed (a directory with its tree) and recreated.
- Ownership, then mode (chown clears setuid/setgid and ``security.capability``), then the
  capability xattr, then times. Directory mtimes are set in a final pass, after their contents.
- Paths never leave ``dest``: names and hardlink targets that are absolute or hold ``..`` raise
  :class:`~blobchain.layers.errors.PathEscapes`, and so does any parent component that is a
  symlink. Unlike containerd (which resolves symlinks scoped to the root), parents are never
  followed: every step is an ``O_NOFOLLOW`` ``openat`` relative to the previous directory.

Only ``SCHILY.xattr.security.capability`` is restored as an xattr; it is the only one the
differ emits (spec rule 10), and trusting arbitrary ``trusted.*`` records from a layer is unsafe.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import BinaryIO

from blobchain.layers.errors import InvalidArgument, PathEscapes, register

__all__ = ["ApplyStats", "InvalidLayer", "apply_layer"]

_WHITEOUT = b".wh."
_OPAQUE = b".wh..wh..opq"
_CAP_KEY = "SCHILY.xattr.security.capability"
_CAP_XATTR = "security.capability"
_CHUNK = 1 << 20

_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@register
class InvalidLayer(InvalidArgument):
    """The layer tar is malformed or does not fit the destination (e.g. a parent is a file)."""

    code = "invalid_layer"


@dataclass(frozen=True)
class ApplyStats:
    """What one :func:`apply_layer` call did.

    entries:        tar entries read (whiteouts included, PAX/GNU meta headers not).
    whiteouts:      ``.wh.<name>`` entries applied (the path may not have existed).
    opaques:        ``.wh..wh..opq`` markers applied.
    bytes:          regular-file content bytes written.
    skipped:        entries not created (the root entry itself; devices without privilege).
    xattrs_skipped: capability records the filesystem or our privileges refused.
    """

    entries: int = 0
    whiteouts: int = 0
    opaques: int = 0
    bytes: int = 0
    skipped: int = 0
    xattrs_skipped: int = 0


def apply_layer(reader: BinaryIO, dest: str | os.PathLike[str], *, same_owner: bool = True) -> ApplyStats:
    """Stream an uncompressed layer tar from ``reader`` onto ``dest`` (created if missing).

    ``same_owner=False`` skips chown (files stay owned by the caller), as for rootless unpacking.
    Raises :class:`PathEscapes` for entries that would leave ``dest`` and :class:`InvalidLayer`
    for unreadable tars or entries that cannot be applied. On error, ``dest`` is left partially
    applied; callers unpack into a scratch directory.
    """
    os.makedirs(dest, exist_ok=True)
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        applier = _Applier(root_fd, same_owner)
        for tf, info in _read_tar(reader):
            applier.entry(tf, info)
        applier.finish()
        return applier.stats()
    finally:
        os.close(root_fd)


def _read_tar(reader: BinaryIO) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Headers in stream order; each body must be read before the next header is asked for."""
    try:
        with tarfile.open(fileobj=reader, mode="r|", encoding="utf-8", errors="surrogateescape") as tf:
            while (info := tf.next()) is not None:
                # TarFile keeps every header it has read; drop them so memory stays flat.
                tf.members.clear()  # type: ignore[attr-defined]  # undocumented list of read headers
                yield tf, info
    except tarfile.TarError as e:
        raise InvalidLayer(f"unreadable layer tar: {e}") from e


def _raw(name: str) -> bytes:
    # tarfile decoded with utf-8/surrogateescape; this gives back the exact header bytes.
    return name.encode("utf-8", "surrogateescape")


def _split(raw: bytes, what: str) -> tuple[bytes, ...]:
    """Relative path components of a tar name; ``.`` and empty components dropped."""
    if raw.startswith(b"/"):
        raise PathEscapes(f"{what} {raw!r} is absolute", path=raw)
    parts = tuple(p for p in raw.split(b"/") if p not in (b"", b"."))
    if b".." in parts:
        raise PathEscapes(f"{what} {raw!r} contains '..'", path=raw)
    return parts


def _mtime_ns(info: tarfile.TarInfo) -> int:
    # A PAX mtime may carry a fraction; tarfile turns it into a float, which loses nanoseconds.
    text = info.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text).scaleb(9).to_integral_value(rounding="ROUND_FLOOR"))
        except InvalidOperation:
            pass
    return int(info.mtime) * 1_000_000_000


def _capability(info: tarfile.TarInfo) -> bytes | None:
    value = info.pax_headers.get(_CAP_KEY)
    return None if value is None else _raw(value)


class _Applier:
    def __init__(self, root_fd: int, same_owner: bool) -> None:
        self._root = root_fd
        self._same_owner = same_owner
        # Paths (joined components) created or replaced by this layer: an opaque marker keeps them.
        self._unpacked: set[bytes] = set()
        # Directory entries whose mtime is set once the whole layer is on disk.
        self._dir_times: list[tuple[tuple[bytes, ...], int]] = []
        self._n = {k: 0 for k in ("entries", "whiteouts", "opaques", "bytes", "skipped", "xattrs_skipped")}

    def stats(self) -> ApplyStats:
        return ApplyStats(**self._n)

    # --- path resolution ----------------------------------------------------------------------

    def _open_dir(self, parts: tuple[bytes, ...], *, create: bool, strict: bool = True) -> int | None:
        """An O_PATH fd of directory ``parts`` under the root, never following a symlink.

        Missing components are created (mode 0755, as containerd's ``mkparent``) when ``create``,
        otherwise the result is None. A symlink component raises PathEscapes and a non-directory
        component raises InvalidLayer, unless ``strict`` is false (then None).
        """
        cur = self._root
        try:
            for i, comp in enumerate(parts):
                try:
                    nxt = os.open(comp, _PATH_FLAGS, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        return None
                    os.mkdir(comp, 0o755, dir_fd=cur)
                    os.chmod(comp, 0o755, dir_fd=cur)  # the umask must not narrow it
                    self._unpacked.add(b"/".join(parts[: i + 1]))
                    nxt = os.open(comp, _PATH_FLAGS, dir_fd=cur)
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    if not strict:
                        return None
                    st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
                    where = b"/".join(parts[: i + 1])
                    if stat.S_ISLNK(st.st_mode):
                        raise PathEscapes(f"path goes through the symlink {where!r}", path=where) from None
                    if not create:
                        return None
                    raise InvalidLayer(f"parent {where!r} is not a directory", path=where) from None
                if cur != self._root:
                    os.close(cur)
                cur = nxt
            result, cur = cur, -1
            return result if result != self._root else os.dup(self._root)
        finally:
            if cur not in (-1, self._root):
                os.close(cur)

    # --- entries ------------------------------------------------------------------------------

    def entry(self, tf: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        self._n["entries"] += 1
        name = _raw(info.name)
        parts = _split(name, "entry name")
        if not parts:
            # The root itself: containerd ignores entries that resolve to the root.
            self._n["skipped"] += 1
            return
        base = parts[-1]
        if base.startswith(_WHITEOUT):
            self._whiteout(parts[:-1], base)
            return
        if not (info.isreg() or info.isdir() or info.issym() or info.islnk() or info.isdev()):
            raise InvalidLayer(f"unsupported tar entry type {info.type!r} for {name!r}", path=name)

        link_fd, link_base = -1, b""
        if info.islnk():
            # Resolve the target before touching anything, so a bad link deletes nothing.
            link_parts = _split(_raw(info.linkname), "hardlink target")
            if not link_parts:
                raise InvalidLayer(f"hardlink {name!r} points at the root", path=name)
            fd = self._open_dir(link_parts[:-1], create=False)
            if fd is None:
                raise InvalidLayer(f"hardlink target {_raw(info.linkname)!r} does not exist", path=name)
            link_fd, link_base = fd, link_parts[-1]
        try:
            pfd = self._open_dir(parts[:-1], create=True)
            assert pfd is not None
            try:
                existing = _lstat(pfd, base)
                merge = existing is not None and stat.S_ISDIR(existing.st_mode) and info.isdir()
                if existing is not None and not merge:
                    _remove(pfd, base, existing)
                if info.isreg():
                    self._regular(tf, info, pfd, base)
                elif info.isdir():
                    self._directory(info, pfd, base, parts, merged=merge)
                elif info.issym():
                    self._symlink(info, pfd, base)
                elif info.islnk():
                    self._hardlink(info, pfd, base, link_fd, link_base, name)
                else:
                    self._node(info, pfd, base)
            finally:
                os.close(pfd)
        finally:
            if link_fd != -1:
                os.close(link_fd)
        self._unpacked.add(b"/".join(parts))

    def _regular(self, tf: tarfile.TarFile, info: tarfile.TarInfo, pfd: int, base: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(base, flags, 0o600, dir_fd=pfd)
        try:
            src = tf.extractfile(info)
            if src is not None:
                while chunk := src.read(_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    self._n["bytes"] += len(chunk)
            if self._same_owner:
                os.fchown(fd, info.uid, info.gid)
            os.fchmod(fd, info.mode & 0o7777)
            cap = _capability(info)
            if cap is not None:
                self._set_cap(lambda: os.setxattr(fd, _CAP_XATTR, cap), base)
            t = _mtime_ns(info)
            os.utime(fd, ns=(t, t))
        except tarfile.TarError as e:
            raise InvalidLayer(f"unreadable layer tar: {e}") from e
        finally:
            os.close(fd)

    def _directory(
        self, info: tarfile.TarInfo, pfd: int, base: bytes, parts: tuple[bytes, ...], *, merged: bool
    ) -> None:
        if not merged:
            os.mkdir(base, 0o700, dir_fd=pfd)
        self._attrs_at(info, pfd, base, clear_cap=merged, times=False)
        self._dir_times.append((parts, _mtime_ns(info)))

    def _symlink(self, info: tarfile.TarInfo, pfd: int, base: bytes) -> None:
        os.symlink(_raw(info.linkname), base, dir_fd=pfd)
        if self._same_owner:
            os.chown(base, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
        # Linux has no lchmod and symlinks cannot carry security.capability.
        t = _mtime_ns(info)
        os.utime(base, ns=(t, t), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(
        self, info: tarfile.TarInfo, pfd: int, base: bytes, link_fd: int, link_base: bytes, name: bytes
    ) -> None:
        try:
            os.link(link_base, base, src_dir_fd=link_fd, dst_dir_fd=pfd, follow_symlinks=False)
        except OSError as e:
            raise InvalidLayer(f"cannot hardlink {name!r} to {_raw(info.linkname)!r}: {e}", path=name) from e
        target = _lstat(pfd, base)
        if target is not None and stat.S_ISLNK(target.st_mode):
            # A hardlink to a symlink: only owner and times apply, as for the symlink itself.
            self._symlink_attrs(info, pfd, base)
            return
        # The header carries the shared inode's attributes (the differ writes them that way), so
        # they are applied as for any entry, capability included.
        self._attrs_at(info, pfd, base, clear_cap=True)

    def _symlink_attrs(self, info: tarfile.TarInfo, pfd: int, base: bytes) -> None:
        if self._same_owner:
            os.chown(base, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
        t = _mtime_ns(info)
        os.utime(base, ns=(t, t), dir_fd=pfd, follow_symlinks=False)

    def _node(self, info: tarfile.TarInfo, pfd: int, base: bytes) -> None:
        try:
            if info.isfifo():
                os.mkfifo(base, 0o600, dir_fd=pfd)
            else:
                kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
                os.mknod(base, kind | 0o600, os.makedev(info.devmajor, info.devminor), dir_fd=pfd)
        except PermissionError:
            if os.geteuid() == 0:
                raise
            # Unprivileged: containerd skips device nodes the same way.
            self._n["skipped"] += 1
            return
        self._attrs_at(info, pfd, base, clear_cap=False)

    def _attrs_at(
        self, info: tarfile.TarInfo, pfd: int, base: bytes, *, clear_cap: bool, times: bool = True
    ) -> None:
        """Owner, mode, capability and (unless ``times`` is false) mtime of the non-symlink ``base``."""
        if self._same_owner:
            os.chown(base, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
        # fchmodat without AT_SYMLINK_NOFOLLOW: base was just created or lstat-checked by us.
        os.chmod(base, info.mode & 0o7777, dir_fd=pfd)
        # setxattr has no *at form; the /proc fd link pins the parent, the last step is lsetxattr.
        path = b"/proc/self/fd/%d/%s" % (pfd, base)
        cap = _capability(info)
        if cap is not None:
            self._set_cap(lambda: os.setxattr(path, _CAP_XATTR, cap, follow_symlinks=False), base)
        elif clear_cap:
            try:
                os.removexattr(path, _CAP_XATTR, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                    raise
        if times:
            t = _mtime_ns(info)
            os.utime(base, ns=(t, t), dir_fd=pfd, follow_symlinks=False)

    def _set_cap(self, setter: Callable[[], None], base: bytes) -> None:
        try:
            setter()
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                # containerd ignores xattrs the filesystem or our privileges refuse; count them.
                self._n["xattrs_skipped"] += 1
                return
            raise InvalidLayer(f"cannot set {_CAP_XATTR} on {base!r}: {e}", path=base) from e

    # --- whiteouts ----------------------------------------------------------------------------

    def _whiteout(self, parent: tuple[bytes, ...], base: bytes) -> None:
        if base == _OPAQUE:
            self._n["opaques"] += 1
            fd = self._open_dir(parent, create=False)
            if fd is not None:
                try:
                    self._clear_opaque(fd, parent)
                finally:
                    os.close(fd)
            return
        target = base[len(_WHITEOUT) :]
        if target in (b"", b".", b".."):
            where = b"/".join((*parent, base))
            raise PathEscapes(f"invalid whiteout name {where!r}", path=where)
        self._n["whiteouts"] += 1
        # A whiteout never creates anything: with no parent there is nothing to hide.
        fd = self._open_dir(parent, create=False)
        if fd is None:
            return
        try:
            st = _lstat(fd, target)
            if st is not None:
                _remove(fd, target, st)
        finally:
            os.close(fd)

    def _clear_opaque(self, dir_fd: int, rel: tuple[bytes, ...]) -> None:
        """Remove what lower layers left under ``rel``: every path this layer did not unpack."""
        rfd = os.open(".", _READ_DIR_FLAGS, dir_fd=dir_fd)
        try:
            names = [_raw(n) for n in os.listdir(rfd)]
        finally:
            os.close(rfd)
        for child in names:
            st = _lstat(dir_fd, child)
            if st is None:
                continue
            key = b"/".join((*rel, child))
            if key not in self._unpacked:
                _remove(dir_fd, child, st)
            elif stat.S_ISDIR(st.st_mode):
                sub = os.open(child, _PATH_FLAGS, dir_fd=dir_fd)
                try:
                    self._clear_opaque(sub, (*rel, child))
                finally:
                    os.close(sub)

    # --- final pass ---------------------------------------------------------------------------

    def finish(self) -> None:
        """Set directory mtimes now that nothing more is created inside them."""
        for parts, t in self._dir_times:
            fd = self._open_dir(parts[:-1], create=False, strict=False)
            if fd is None:
                continue  # removed or replaced later in this layer
            try:
                st = _lstat(fd, parts[-1])
                if st is not None and stat.S_ISDIR(st.st_mode):
                    os.utime(parts[-1], ns=(t, t), dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)


def _lstat(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(dir_fd: int, name: bytes, st: os.stat_result) -> None:
    """Remove ``name`` (a whole tree for a directory) without following any symlink."""
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _READ_DIR_FLAGS, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            raw = _raw(child)
            cst = _lstat(fd, raw)
            if cst is not None:
                _remove(fd, raw, cst)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
