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
- Removal (whiteouts, opaque directories, :func:`remove_tree`) walks without recursion and with
  two descriptors, so a tree as deep as names allow (PATH_MAX, about 2048 levels) goes whole.

Only ``SCHILY.xattr.security.capability`` is restored as an xattr; it is the only one the
differ emits (spec rule 10), and trusting arbitrary ``trusted.*`` records from a layer is unsafe.

The tar is read with Go ``archive/tar``'s strictness (containerd and umoci read layers with it),
not ``tarfile``'s leniency, by :class:`_StrictInfo`: a bad header checksum, or a zero block
followed by data, is an error (tarfile silently ends the archive there); PAX records are parsed
here in one pass and strictly (malformed records, NUL in names, non-numeric ids and times are
errors; tarfile's PAX regexes are quadratic before 3.11.10, CVE-2024-6232); PAX and GNU
long-name records are capped at 1 MiB (tarfile reads them whole into memory); global PAX headers
are ignored, as containerd does (umoci refuses them); a GNU long name wins over a PAX ``path``,
as in Go; sparse entries, which the image spec says SHOULD NOT be used and tarfile parses
unsafely, are refused. So are names longer than PATH_MAX (``PathTooLong``), times outside what
``utimensat`` takes and ids that do not fit 32 bits (``InvalidLayer``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Self

from blobchain.layers.errors import InvalidArgument, PathEscapes, PathTooLong, register

__all__ = ["ApplyStats", "InvalidLayer", "apply_layer", "remove_tree"]

_WHITEOUT = b".wh."
_OPAQUE = b".wh..wh..opq"
_CAP_KEY = "SCHILY.xattr.security.capability"
_CAP_XATTR = "security.capability"
_CHUNK = 1 << 20

# Go archive/tar's maxSpecialFileSize: a PAX or GNU long-name record bigger than this is refused.
_META_MAX = 1 << 20
# Longer names cannot be looked up in one call (PATH_MAX, with its NUL); containerd and umoci fail
# on them too. The cap also bounds the depth of what a layer can build (about 2048 levels).
_NAME_MAX = 4095
_ID_MAX = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown
_NS_RANGE = range(-(2**63), 2**63)  # what os.utime(ns=...) takes
_PAX_TIME = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]*)?")

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
        with tarfile.open(
            fileobj=reader, mode="r|", tarinfo=_StrictInfo, encoding="utf-8", errors="surrogateescape"
        ) as tf:
            while (info := tf.next()) is not None:
                # TarFile keeps every header it has read; drop them so memory stays flat.
                tf.members.clear()  # type: ignore[attr-defined]  # undocumented list of read headers
                yield tf, info
    except tarfile.TarError as e:
        raise InvalidLayer(f"unreadable layer tar: {e}") from e


_BLOCK = tarfile.BLOCKSIZE
# A bad checksum or number field, a header block cut short (tarfile's classes, not in its stubs).
_MALFORMED: tuple[type[Exception], ...] = (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)  # type: ignore[attr-defined]
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX_NAMES = frozenset({b"path", b"linkpath", b"uname", b"gname"})
_PAX_NUMBERS = frozenset({b"uid", b"gid", b"size"})
_PAX_TIMES = frozenset({b"mtime", b"atime", b"ctime"})


def _bad(what: str) -> InvalidLayer:
    return InvalidLayer(f"unreadable layer tar: {what}")


class _StrictInfo(tarfile.TarInfo):
    """``tarfile``'s header reader held to Go ``archive/tar``'s rules (see the module docstring).

    It overrides ``_proc_member`` (tarfile's documented hook for subclasses) and the two
    classmethods that read a header block. Its errors are not ``tarfile.HeaderError``: from those,
    ``TarFile.next`` would silently end the archive.
    """

    # Set on the entry a GNU long-name/long-link record named: it wins over a PAX path (as in Go).
    _long_name = False
    _long_link = False
    _pax = False

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Self:
        buf = tf.fileobj.read(_BLOCK)  # type: ignore[union-attr]
        if not buf and tf.offset == 0:  # type: ignore[attr-defined]
            # A 0-byte layer: Go (containerd, umoci) reads an empty archive; tarfile refuses it.
            raise tarfile.EOFHeaderError("empty archive")  # type: ignore[attr-defined]
        # tarfile stops at one zero block; Go reads a second one and refuses data there.
        if len(buf) == _BLOCK and not buf.strip(b"\0") and tf.fileobj.read(_BLOCK).strip(b"\0"):  # type: ignore[union-attr]
            raise _bad("a zero block is followed by data (an archive ends with two)")
        obj = cls.frombuf(buf, tf.encoding, tf.errors)  # type: ignore[arg-type]
        obj.offset = tf.fileobj.tell() - _BLOCK  # type: ignore[union-attr]
        return obj._proc_member(tf)  # type: ignore[attr-defined,no-any-return,return-value]

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        try:
            obj = super().frombuf(buf, encoding, errors)
        except _MALFORMED as e:
            raise _bad(str(e)) from None  # after the first header tarfile takes these for the end
        if obj.size < 0:
            raise _bad(f"the header of {_raw(obj.name)!r} has a negative size")
        return obj

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise InvalidLayer(f"sparse tar entries are not supported ({_raw(self.name)!r})")
        if self.type in _PAX_TYPES or self.type in _LONG_TYPES:
            if self.size > _META_MAX:
                raise _bad(f"a {self.size}-byte PAX or GNU long-name record (the limit is {_META_MAX})")
            buf = tf.fileobj.read(self._block(self.size))  # type: ignore[union-attr,attr-defined]
            if len(buf) < self.size:
                raise _bad("unexpected end of data")
            if self.type in _PAX_TYPES:
                return self._pax_member(tf, _parse_pax(buf[: self.size]))
            return self._long_member(tf, buf[: self.size])
        return super()._proc_member(tf)  # type: ignore[misc,no-any-return]

    def _next(self, tf: tarfile.TarFile) -> _StrictInfo:
        try:
            return self.fromtarfile(tf)  # type: ignore[return-value]
        except tarfile.HeaderError:
            raise _bad("a PAX or GNU long-name record with no entry after it") from None

    def _long_member(self, tf: tarfile.TarFile, buf: bytes) -> tarfile.TarInfo:
        nxt = self._next(tf)
        name = buf.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")  # as tarfile's nts
        if self.type == tarfile.GNUTYPE_LONGNAME:
            if nxt._long_name:
                raise _bad("two GNU long-name records for one entry")
            nxt._long_name = True
            nxt.name = name.rstrip("/") if nxt.isdir() else name
        else:
            if nxt._long_link:
                raise _bad("two GNU long-link records for one entry")
            nxt._long_link = True
            nxt.linkname = name
        nxt.offset = self.offset
        return nxt

    def _pax_member(self, tf: tarfile.TarFile, records: dict[str, str]) -> tarfile.TarInfo:
        if self.type == tarfile.XGLTYPE:
            # Ignored, as containerd does (tarfile would apply it to some later entries only).
            # It may be the last header (Go returns it as an entry), so the archive may end here.
            return self.fromtarfile(tf)
        nxt = self._next(tf)
        if nxt._pax:
            raise _bad("two PAX headers for one entry")
        nxt._pax = True
        for key, value in records.items():
            if key == "path" and not nxt._long_name:
                nxt.name = value.rstrip("/")
            elif key == "linkpath" and not nxt._long_link:
                nxt.linkname = value
            elif key in ("uid", "gid", "size"):
                setattr(nxt, key, int(value))
            elif key in ("uname", "gname"):
                setattr(nxt, key, value)
            elif key == "mtime":
                nxt.mtime = float(value)
        nxt.pax_headers = records
        nxt.offset = self.offset
        if "size" in records and (nxt.isreg() or nxt.type not in tarfile.SUPPORTED_TYPES):
            # The body's length changed, and so does where the next header starts (as tarfile).
            tf.offset = nxt.offset_data + nxt._block(nxt.size)  # type: ignore[attr-defined]
        return nxt


def _parse_pax(data: bytes) -> dict[str, str]:
    """PAX records (``"%d %s=%s\\n"``) in one linear pass, checked as Go's ``parsePAX`` does."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos, pos + 21)
        if sp <= pos or not data[pos:sp].isdigit():
            raise _bad("a malformed PAX record")
        end = pos + int(data[pos:sp])
        if end <= sp + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise _bad("a malformed PAX record")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq or not key or b"\0" in key or (key in _PAX_NAMES and b"\0" in value):
            raise _bad(f"a malformed PAX record {key[:64]!r}")
        if key.startswith(b"GNU.sparse."):
            raise InvalidLayer("sparse tar entries are not supported")
        if key in _PAX_NUMBERS and not (value.isdigit() and len(value) <= 20):
            raise _bad(f"PAX {key.decode()} {value[:64]!r} is not a number")
        if key in _PAX_TIMES and not _PAX_TIME.fullmatch(value.decode("latin-1")):
            raise _bad(f"PAX {key.decode()} {value[:64]!r} is not a time")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return out


def _raw(name: str) -> bytes:
    # tarfile decoded with utf-8/surrogateescape; this gives back the exact header bytes.
    return name.encode("utf-8", "surrogateescape")


def _split(raw: bytes, what: str) -> tuple[bytes, ...]:
    """Relative path components of a tar name; ``.`` and empty components dropped."""
    if len(raw) > _NAME_MAX:
        raise PathTooLong(f"{what} {raw[:64]!r}... is {len(raw)} bytes (the limit is {_NAME_MAX})", path=raw)
    if b"\0" in raw:
        raise InvalidLayer(f"{what} {raw!r} contains a NUL byte", path=raw)
    if raw.startswith(b"/"):
        raise PathEscapes(f"{what} {raw!r} is absolute", path=raw)
    parts = tuple(p for p in raw.split(b"/") if p not in (b"", b"."))
    if b".." in parts:
        raise PathEscapes(f"{what} {raw!r} contains '..'", path=raw)
    return parts


def _mtime_ns(info: tarfile.TarInfo) -> int:
    # A PAX mtime may carry a fraction; tarfile turns it into a float, which loses nanoseconds.
    # _parse_pax checked its form; digits past the ninth are cut and a "-" applies to the
    # fraction too, as Go's parsePAXTime does.
    text = info.pax_headers.get("mtime")
    if text is not None and _PAX_TIME.fullmatch(text):
        sec, _, frac = text.partition(".")
        nsec = int((frac + "000000000")[:9])
        ns = int(sec) * 1_000_000_000 + (-nsec if sec.startswith("-") else nsec)
    else:
        ns = int(info.mtime) * 1_000_000_000
    if ns not in _NS_RANGE:
        name = _raw(info.name)
        raise InvalidLayer(f"the mtime of {name!r} is out of range ({text or info.mtime})", path=name)
    return ns


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
                    _chmod_nofollow(cur, comp, 0o755)  # the umask must not narrow it
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
        # Checked before anything is touched: chown/mknod would raise OverflowError on these.
        if not (0 <= info.uid <= _ID_MAX and 0 <= info.gid <= _ID_MAX):
            raise InvalidLayer(f"{name!r} has an owner out of range ({info.uid}:{info.gid})", path=name)
        if info.isdev() and not (0 <= info.devmajor < 2**32 and 0 <= info.devminor < 2**32):
            raise InvalidLayer(f"device {name!r} has a number out of range", path=name)
        if info.issym() and not info.linkname:
            raise InvalidLayer(f"symlink {name!r} has an empty target", path=name)
        if info.issym() and "\0" in info.linkname:
            raise InvalidLayer(f"symlink {name!r} has a NUL byte in its target", path=name)
        _mtime_ns(info)

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
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOVERFLOW):
                raise
            raise InvalidLayer(f"cannot create device {base!r}: {e.strerror}", path=base) from None
        self._attrs_at(info, pfd, base, clear_cap=False)

    def _attrs_at(
        self, info: tarfile.TarInfo, pfd: int, base: bytes, *, clear_cap: bool, times: bool = True
    ) -> None:
        """Owner, mode, capability and (unless ``times`` is false) mtime of the non-symlink ``base``."""
        if self._same_owner:
            os.chown(base, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
        _chmod_nofollow(pfd, base, info.mode & 0o7777)
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

        def visit(fd: int, below: tuple[bytes, ...]) -> list[bytes]:
            keep = []
            for child, st in _children(fd):
                if b"/".join((*rel, *below, child)) not in self._unpacked:
                    _remove(fd, child, st)
                elif stat.S_ISDIR(st.st_mode):
                    keep.append(child)
            return keep

        _walk(dir_fd, visit)

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


def _chmod_nofollow(dir_fd: int, name: bytes, mode: int) -> None:
    """chmod the non-symlink ``name``. It was created or lstat-checked by us, but whoever can
    write its parent (an owner a layer gave it) could have swapped in a symlink since: fchmodat
    would follow it. The inode is pinned by an O_PATH descriptor and changed through /proc (what
    glibc does for AT_SYMLINK_NOFOLLOW, which CPython 3.11 turns into a ValueError on a symlink)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise PathEscapes(f"{name!r} was replaced by a symlink during the unpack", path=name)
        os.chmod(f"/proc/self/fd/{fd}", mode)
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

    def visit(fd: int, below: tuple[bytes, ...]) -> list[bytes]:
        _open_up(fd)
        subdirs = []
        for child, cst in _children(fd):
            if stat.S_ISDIR(cst.st_mode):
                subdirs.append(child)
            else:
                os.unlink(child, dir_fd=fd)
        return subdirs

    fd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
    try:
        _walk(fd, visit, leave=lambda parent, child: os.rmdir(child, dir_fd=parent))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _open_up(fd: int) -> None:
    """Give the directory ``fd`` (being emptied) mode 0700 if it lacks owner rwx: unprivileged (or
    without CAP_DAC_OVERRIDE), a layer's read-only directory (0555 /usr/bin) cannot be emptied,
    and a failed unpack would leave its scratch tree behind. Refused (not ours): left as is."""
    if os.fstat(fd).st_mode & 0o700 != 0o700:
        with contextlib.suppress(PermissionError):
            os.chmod(f"/proc/self/fd/{fd}", 0o700)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """``rm -rf path`` that follows no symlink and works at any depth (``shutil.rmtree`` recurses
    and keeps a descriptor per level: a deep tree a layer built would break it)."""
    parent, name = os.path.split(os.path.abspath(path))
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = _lstat(pfd, os.fsencode(name))
        if st is not None:
            _remove(pfd, os.fsencode(name), st)
    finally:
        os.close(pfd)


def _children(fd: int) -> Iterator[tuple[bytes, os.stat_result]]:
    """The entries of the directory ``fd`` (O_PATH is fine) with their lstat."""
    rfd = os.open(".", _READ_DIR_FLAGS, dir_fd=fd)
    try:
        names = [os.fsencode(n) for n in os.listdir(rfd)]
    finally:
        os.close(rfd)
    for child in names:
        st = _lstat(fd, child)
        if st is not None:
            yield child, st


def _walk(
    top: int,
    visit: Callable[[int, tuple[bytes, ...]], list[bytes]],
    leave: Callable[[int, bytes], None] | None = None,
) -> None:
    """Depth-first below the directory ``top`` without recursion and with two descriptors at most.

    ``visit(fd, rel)`` handles a directory and returns the subdirectories to enter; ``leave(fd,
    name)`` runs once ``name``'s subtree is done (``fd`` is its parent). Down goes by name with
    O_NOFOLLOW, up by ``..``, checked against the directory it came from: a layer can nest
    thousands of levels, past Python's recursion limit and the descriptor limit.
    """
    cur = os.open(".", _PATH_FLAGS, dir_fd=top)
    # One frame per level: (name in its parent, (st_dev, st_ino), subdirectories still to enter).
    stack: list[tuple[bytes, tuple[int, int], list[bytes]]] = [(b"", _ident(cur), visit(cur, ()))]
    try:
        while True:
            pending = stack[-1][2]
            if pending:
                child = pending.pop()
                nxt = os.open(child, _PATH_FLAGS, dir_fd=cur)
                os.close(cur)
                cur = nxt
                rel = (*(frame[0] for frame in stack[1:]), child)
                stack.append((child, _ident(cur), visit(cur, rel)))
                continue
            done = stack.pop()[0]
            if not stack:
                return
            up = os.open(b"..", _PATH_FLAGS, dir_fd=cur)
            os.close(cur)
            cur = up
            if _ident(cur) != stack[-1][1]:
                raise OSError(errno.ESTALE, "a directory moved during the walk", done)
            if leave is not None:
                leave(cur, done)
    finally:
        os.close(cur)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
