"""Build snapshot trees with every kind of entry, for tests and benchmarks.

A tree is described declaratively as a :data:`Spec`: a mapping from a relative path (``bytes``,
no leading slash) to a node (:class:`File`, :class:`Dir`, :class:`Symlink`, :class:`Hardlink`,
:class:`Fifo`, :class:`Device`, :class:`Socket`, :class:`Whiteout`). :func:`build` creates it
under a directory with exact ownership, modes, xattrs and nanosecond mtimes (directory mtimes are
set last, after their children exist). Missing parent directories are created as ``Dir()``.

Ready-made states: :func:`kitchen_sink` (a lower/upper pair covering every change kind),
:func:`chain` (a list of states for multi-layer tests), :func:`big_sparse_pair`, and the small
focused pairs in :data:`PAIRS`. :func:`listing` describes a tree canonically (to check that a
copy is faithful). Devices, ownership and ``security.capability`` need root.

Example::

    spec = {b"etc/": Dir(mode=0o700), b"etc/passwd": File(b"root:x:0:0\\n"), b"sh": Symlink(b"bin/sh")}
    build(tmp_path / "rootfs", spec)
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_SETUID",
    "NS",
    "PAIRS",
    "T0",
    "T0_NS",
    "Device",
    "Dir",
    "Fifo",
    "File",
    "Hardlink",
    "Node",
    "Socket",
    "Spec",
    "Symlink",
    "Whiteout",
    "big_sparse_pair",
    "build",
    "build_pair",
    "chain",
    "kitchen_sink",
    "listing",
    "overlay_opaque",
    "t",
]

NS = 1_000_000_000
T0 = 1_700_000_000
T0_NS = T0 * NS

# security.capability values (VFS_CAP_REVISION_2, effective bit set).
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")
CAP_NET_ADMIN = bytes.fromhex("0100000200100000000000000000000000000000")
# Has a byte >= 0x80: not valid UTF-8 (Go never adds hdrcharset=BINARY, Python tarfile would).
CAP_SETUID = bytes.fromhex("0100000280000000000000000000000000000000")


def t(seconds: int | float = 0, ns: int = 0) -> int:
    """An mtime in nanoseconds: ``T0 + seconds`` plus ``ns`` (``t(0.5)`` = T0 and a half)."""
    return T0_NS + round(seconds * NS) + ns


Xattrs = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class File:
    """A regular file. ``size`` larger than ``data`` makes a sparse file (data then a hole)."""

    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0_NS
    size: int | None = None
    xattrs: Xattrs = ()


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0_NS
    xattrs: Xattrs = ()


@dataclass(frozen=True)
class Symlink:
    target: bytes
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0_NS
    xattrs: Xattrs = ()


@dataclass(frozen=True)
class Hardlink:
    """Another name for the node at ``target`` (a path of the same spec, not a directory)."""

    target: bytes


@dataclass(frozen=True)
class Fifo:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0_NS


@dataclass(frozen=True)
class Device:
    kind: str  # "c" or "b"
    major: int
    minor: int
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0_NS


@dataclass(frozen=True)
class Socket:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0_NS


@dataclass(frozen=True)
class Whiteout:
    """An overlay whiteout (character device 0/0), for building overlay upper directories."""

    mtime_ns: int = T0_NS


Node = File | Dir | Symlink | Hardlink | Fifo | Device | Socket | Whiteout
Spec = Mapping[bytes, Node]


def _key(p: bytes | str) -> bytes:
    p = os.fsencode(p)
    return p.strip(b"/")


def build(root: str | os.PathLike[str] | bytes, spec: Spec, *, root_dir: Dir | None = None) -> Path:
    """Create ``spec`` under ``root`` (created if missing; must be empty). Returns ``root``.

    ``root_dir`` sets the root directory's own metadata (default ``Dir()``).
    """
    rootb = os.fsencode(root)
    os.makedirs(rootb, exist_ok=True)
    nodes: dict[bytes, Node] = {}
    for raw, node in spec.items():
        k = _key(raw)
        if not k:
            raise ValueError("the root is set with root_dir=, not in the spec")
        nodes[k] = node
    for k in list(nodes):
        parent = k.rpartition(b"/")[0]
        while parent and parent not in nodes:
            nodes[parent] = Dir()
            parent = parent.rpartition(b"/")[0]
    order = sorted(nodes)
    full = {k: os.path.join(rootb, k) for k in order}

    for k in order:  # directories first, parents before children
        if isinstance(nodes[k], Dir):
            os.mkdir(full[k], 0o700)
    for k in order:
        node = nodes[k]
        p = full[k]
        if isinstance(node, File):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if node.data:
                    os.write(fd, node.data)
                if node.size is not None and node.size > len(node.data):
                    os.ftruncate(fd, node.size)
            finally:
                os.close(fd)
        elif isinstance(node, Symlink):
            os.symlink(node.target, p)
        elif isinstance(node, Fifo):
            os.mkfifo(p, 0o600)
        elif isinstance(node, Device):
            kind = stat.S_IFCHR if node.kind == "c" else stat.S_IFBLK
            os.mknod(p, kind | 0o600, os.makedev(node.major, node.minor))
        elif isinstance(node, Socket):
            os.mknod(p, stat.S_IFSOCK | 0o600)
        elif isinstance(node, Whiteout):
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    for k in order:
        node = nodes[k]
        if isinstance(node, Hardlink):
            os.link(full[_key(node.target)], full[k], follow_symlinks=False)

    # Metadata: owner first (chown clears setuid bits and file capabilities), then mode, then
    # xattrs, then times; directories last, once nothing more is created inside them.
    for k in order:
        node = nodes[k]
        if not isinstance(node, (Dir, Hardlink)):
            _apply_meta(full[k], node)
    for k in reversed(order):
        node = nodes[k]
        if isinstance(node, Dir):
            _apply_meta(full[k], node)
    _apply_meta(rootb, root_dir or Dir())
    return Path(os.fsdecode(rootb))


def _apply_meta(p: bytes, node: Node) -> None:
    if not isinstance(node, Whiteout):
        os.chown(p, node.uid, node.gid, follow_symlinks=False)  # type: ignore[union-attr]
    if not isinstance(node, (Symlink, Whiteout)):
        os.chmod(p, node.mode)  # type: ignore[union-attr]
    for name, value in getattr(node, "xattrs", ()):
        os.setxattr(p, name, value, follow_symlinks=False)
    os.utime(p, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)


def build_pair(base: str | os.PathLike[str], pair: tuple[Spec, Spec]) -> tuple[Path, Path]:
    """Build a (lower, upper) pair under ``base/lower`` and ``base/upper``."""
    lower, upper = pair
    return build(os.path.join(base, "lower"), lower), build(os.path.join(base, "upper"), upper)


# --- canonical listing ------------------------------------------------------------------------

_BIG = 64 << 20


def _content_digest(path: bytes, size: int) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if size <= _BIG:
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            return h.hexdigest()
        # Large (sparse) files: hash the data extents only, so checking a copy stays fast.
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(f"{start}:{end}:".encode())
            os.lseek(fd, start, os.SEEK_SET)
            left = end - start
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            off = end
        return "extents:" + h.hexdigest()
    finally:
        os.close(fd)


def listing(root: str | os.PathLike[str] | bytes) -> list[tuple[object, ...]]:
    """A canonical description of the tree under ``root``: for each path (sorted, root
    included as ``b""``) its type, mode, uid, gid, size, mtime_ns, rdev, symlink target,
    ``security.capability``, content digest and hardlink group (the first path of its inode).
    """
    rootb = os.fsencode(root)
    out: list[tuple[object, ...]] = []
    first_of: dict[tuple[int, int], bytes] = {}

    def visit(rel: bytes) -> None:
        p = os.path.join(rootb, rel) if rel else rootb
        st = os.lstat(p)
        fmt = stat.S_IFMT(st.st_mode)
        try:
            cap = os.getxattr(p, "security.capability", follow_symlinks=False)
        except OSError:
            cap = None
        target = os.readlink(p) if fmt == stat.S_IFLNK else None
        digest = _content_digest(p, st.st_size) if fmt == stat.S_IFREG else None
        group = None
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            group = first_of.setdefault((st.st_dev, st.st_ino), rel)
        size = st.st_size if fmt in (stat.S_IFREG, stat.S_IFLNK) else 0
        out.append(
            (rel, fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, st.st_mtime_ns,
             st.st_rdev, target, cap, digest, group)
        )  # fmt: skip
        if fmt == stat.S_IFDIR:
            for name in sorted(os.listdir(p)):
                visit(rel + b"/" + name if rel else name)

    visit(b"")
    return out


# --- ready-made states ------------------------------------------------------------------------

LONG_DIR = b"longdir/" + b"d" * 90  # with a 30-byte file: > 100 bytes, USTAR prefix split
LONG_NAME = b"longdir/" + b"g" * 110  # one component over 100 bytes: PAX path
DEEP = b"/".join([b"p" * 60] * 5)  # with a file name: a path over 255 bytes


def _common_lower() -> dict[bytes, Node]:
    return {
        b"bin/": Dir(),
        b"bin/tool": File(b"toolv1", mode=0o755, mtime_ns=t(0.5)),
        b"samefile": File(b"aaaa"),
        b"samecontent": File(b"same bytes"),
        b"nanotouch": File(b"x"),
        b"nsdiff": File(b"x", mtime_ns=t(0, 100)),
        b"nsequal": File(b"y", mtime_ns=t(0, 777)),
        b"sizechg": File(b"short", mtime_ns=t(0, 5)),
        b"modechg": File(b"m"),
        b"ownerchg": File(b"o"),
        b"capadd": File(b"c"),
        b"capchg": File(b"c", xattrs=((b"security.capability", CAP_NET_RAW),)),
        b"capdel": File(b"c", xattrs=((b"security.capability", CAP_NET_ADMIN),)),
        b"delfile": File(b"gone"),
        b"deldir/a": File(b"a"),
        b"deldir/sub/b": File(b"b"),
        b"deldir/sub/c": Symlink(b"../a"),
        b"etc/": Dir(mtime_ns=t(-50, 3)),
        b"etc/my-app-config": File(b"cfg"),
        b"etc/keep": File(b"keep"),
        b"d2f/x": File(b"x"),
        b"f2d": File(b"was a file"),
        b"f2l": File(b"was a file"),
        b"opq/": Dir(),
        b"opq/x/": Dir(),
        b"opq/x/y": File(b"y"),
        b"opq/x/z": File(b"z1"),
        b"hl1": File(b"hl", mtime_ns=t(1)),
        b"hl2": Hardlink(b"hl1"),
        b"hu1": File(b"unchanged pair", mtime_ns=t(2, 9)),
        b"hu2": Hardlink(b"hu1"),
        b"hm1": File(b"modified pair", mtime_ns=t(3)),
        b"hm2": Hardlink(b"hm1"),
        b"hd1": File(b"peer deleted", mtime_ns=t(4, 1)),
        b"hd2": Hardlink(b"hd1"),
        b"hp/a": File(b"cross-dir", mtime_ns=t(5, 5)),
        b"hq/b": Hardlink(b"hp/a"),
        b"lnkchg": Symlink(b"aaa"),
        b"lnksame": Symlink(b"same-target"),
        b"devchg": Device("c", 1, 3),
        b"oldsock": Socket(),
        b"d2s/x": File(b"x"),
        b"sockdir/": Dir(),
        b"sockdir/keep": File(b"k"),
        b"keep/": Dir(),
        b"keep/deep/": Dir(mode=0o750),
        b"keep/deep/old": File(b"old"),
        b"dirmtime/": Dir(mtime_ns=t(10)),
        b"dirmtime/child": File(b"c"),
        b"userx": File(b"u", xattrs=((b"user.foo", b"bar"),)),
        b"empty0": File(b""),
        b"emptyns": File(b"", mtime_ns=t(0, 1)),
        b"zzz": File(b"last"),
    }


def kitchen_sink() -> tuple[Spec, Spec]:
    """A (lower, upper) pair with every change kind the layer format distinguishes."""
    lower = _common_lower()
    up: dict[bytes, Node] = dict(lower)
    # not detected: same size, mtime restored to the same non-zero nanoseconds
    up[b"bin/tool"] = File(b"toolv2", mode=0o755, mtime_ns=t(0.5))
    # detected by content: whole-second mtimes on both sides
    up[b"samefile"] = File(b"bbbb")
    up[b"samecontent"] = File(b"same bytes")
    up[b"nanotouch"] = File(b"x", mtime_ns=t(0, 1))
    up[b"nsdiff"] = File(b"x", mtime_ns=t(0, 200))
    up[b"sizechg"] = File(b"longer now", mtime_ns=t(0, 5))
    up[b"modechg"] = File(b"m", mode=0o600)
    up[b"ownerchg"] = File(b"o", uid=1000, gid=1000)
    up[b"capadd"] = File(b"c", xattrs=((b"security.capability", CAP_NET_RAW),))
    up[b"capchg"] = File(b"c", xattrs=((b"security.capability", CAP_SETUID),))
    up[b"capdel"] = File(b"c")
    del up[b"delfile"], up[b"deldir/a"], up[b"deldir/sub/b"], up[b"deldir/sub/c"]
    del up[b"etc/my-app-config"]
    up[b"etc/my-app.d/default.cfg"] = File(b"default\n")
    del up[b"d2f/x"]
    up[b"d2f"] = File(b"now a file")
    up[b"f2d"] = Dir()
    up[b"f2d/in"] = File(b"inside")
    up[b"f2l"] = Symlink(b"f2d/in")
    # opaque replacement: opq/x deleted and recreated
    del up[b"opq/x/y"]
    up[b"opq/x/"] = Dir(mtime_ns=t(20))
    up[b"opq/x/new"] = File(b"new")
    up[b"opq/x/z"] = File(b"z2")
    up[b"hl3"] = Hardlink(b"hl1")  # a new link to a lower file
    up[b"hm1"] = File(b"modified PAIR", mtime_ns=t(30))
    del up[b"hd2"]
    up[b"hr/c"] = Hardlink(b"hp/a")  # new link in a new dir; earlier peers in other dirs
    up[b"newhl1"] = File(b"new pair", mtime_ns=t(6))
    up[b"newhl2"] = Hardlink(b"newhl1")
    up[b"newhl/sym"] = Symlink(b"linked symlink", mtime_ns=t(6, 6))
    up[b"newhl/sym2"] = Hardlink(b"newhl/sym")
    up[b"lnk"] = Symlink(b"../some/target")
    up[b"outside"] = Symlink(b"/etc/passwd")
    up[b"outside-rel"] = Symlink(b"../../../../etc/shadow")
    up[b"lnkchg"] = Symlink(b"bbb")
    up[b"lnksame"] = Symlink(b"same-target")
    up[b"fifo1"] = Fifo()
    up[b"chardev"] = Device("c", 1, 3)
    up[b"blockdev"] = Device("b", 7, 0, mode=0o660, gid=6)
    up[b"bigdev"] = Device("c", 4095, 1048575)
    up[b"devchg"] = Device("c", 1, 5)
    up[b"sock1"] = Socket()
    up[b"sockdir/s"] = Socket()  # skipped, and does not pull in sockdir/
    del up[b"oldsock"]  # a deleted socket still gets a whiteout
    del up[b"d2s/x"]
    up[b"d2s"] = Socket()  # a directory replaced by a socket: no entry, no whiteout at all
    up[b"suid"] = File(b"#!/bin/sh\n", mode=0o4755)
    up[b"sgid"] = File(b"g", mode=0o2755, gid=50)
    up[b"tmp/"] = Dir(mode=0o1777)
    up[b"sgdir/"] = Dir(mode=0o2775, gid=100)
    up[b"capdir/"] = Dir(xattrs=((b"security.capability", CAP_NET_RAW),))
    up[LONG_DIR + b"/" + b"f" * 30] = File(b"split")
    up[LONG_NAME] = File(b"pax path")
    up[DEEP + b"/" + b"q" * 40] = File(b"deep")
    up["ünï.txt".encode()] = File(b"utf8")
    up[b"bad\xff\xfe.bin"] = File(b"invalid utf-8")
    up[b"baddir\x80/child"] = File(b"under a non-utf8 dir")
    up[b"biguid"] = File(b"big", uid=3_000_000, gid=5)
    up[b"biggid/"] = Dir(gid=1 << 21)
    up[b"keep/"] = Dir(mode=0o700)
    up[b"keep/deep/newfile"] = File(b"new")
    up[b"dirmtime/"] = Dir(mtime_ns=t(99, 99))  # directory mtime alone: not a change
    up[b"userx"] = File(b"u", xattrs=((b"user.foo", b"baz"),))  # other xattrs: not a change
    up[b"usernew"] = File(b"u", xattrs=((b"user.foo", b"bar"),))  # ...and never serialised
    up[b"empty0"] = File(b"")
    up[b"emptyns"] = File(b"", mtime_ns=t(0, 2))
    up[b"emptynew"] = File(b"")
    up[b"old"] = File(b"before 1970", mtime_ns=-1_500_000_000)
    up[b"future"] = File(b"after 2242", mtime_ns=(8**11 + 5) * NS)
    up[b"a-b"] = File(b"sorts after a/")
    up[b"a/b"] = File(b"in a")
    up[b"a.b"] = File(b"sorts after a-b")
    return lower, up


def chain() -> list[Spec]:
    """Successive full states of one filesystem (state 0 is the base layer)."""
    base: dict[bytes, Node] = {
        b"etc/": Dir(),
        b"etc/hostname": File(b"base\n"),
        b"usr/bin/app": File(b"app v1", mode=0o755),
        b"usr/lib/libx.so": File(b"lib" * 100),
        b"var/tmp/": Dir(mode=0o1777),
    }
    s1, s2 = kitchen_sink()
    s1 = {**base, **s1}
    s2 = {**base, **s2}
    s3: dict[bytes, Node] = dict(s2)
    for k in [k for k in s3 if k.startswith(b"etc/")]:
        del s3[k]  # a whole tree with content added in the previous layer
    s3[b"delfile"] = File(b"back again")  # re-add a path deleted one layer before
    # break a hardlink group: hl1 gets its own inode, hl3 now links to hl2
    s3[b"hl1"] = File(b"hl broken out")
    s3[b"hl2"] = File(b"hl", mtime_ns=t(1))
    s3[b"hl3"] = Hardlink(b"hl2")
    s3[b"usr/bin/app"] = File(b"app v2", mode=0o755, mtime_ns=t(100))
    del s3[b"d2f"]
    s3[b"d2f/"] = Dir()  # and back to a directory
    s3[b"d2f/x"] = File(b"x again")
    del s3[b"sock1"]
    return [base, s1, s2, s3]


def big_sparse_pair(size: int = (8 << 30) + 4097) -> tuple[Spec, Spec]:
    """A pair whose upper adds a sparse file of ``size`` bytes (default just over 8 GiB: the tar
    size field then needs a PAX record)."""
    lower: dict[bytes, Node] = {b"small": File(b"s")}
    upper: dict[bytes, Node] = {**lower, b"big/sparse.img": File(b"head", size=size), b"zz": File(b"after")}
    return lower, upper


def overlay_opaque() -> tuple[list[Spec], Spec, Spec, Spec]:
    """An overlay scenario: (the parent layers' upper dirs bottom first, this layer's upper dir,
    the parents merged as a full rootfs, the result merged as a full rootfs), covering
    whiteouts (of lower entries, of entries only a middle layer added, of nothing), opaque
    directories (over a lower dir, over a whited-out dir, new), copy-ups and additions."""
    l0: dict[bytes, Node] = {
        b"a/": Dir(),
        b"a/keep": File(b"k"),
        b"a/gone": File(b"g"),
        b"o/": Dir(),
        b"o/x": File(b"x"),
        b"o/y/z": File(b"z"),
        b"f": File(b"f"),
        b"hidden/": Dir(),
        b"hidden/file": File(b"h"),
    }
    l1: dict[bytes, Node] = {
        b"a/": Dir(),
        b"a/new1": File(b"n1", mtime_ns=t(1, 1)),
        b"hidden": Whiteout(),
    }
    upper: dict[bytes, Node] = {
        b"a/": Dir(),
        b"a/gone": Whiteout(),
        b"a/new1": Whiteout(),
        b"a/never": Whiteout(),  # not in any lower: skipped
        b"a/added": File(b"added", mtime_ns=t(2, 2)),
        b"o/": Dir(xattrs=((b"trusted.overlay.opaque", b"y"),)),
        b"o/x": File(b"x2", mtime_ns=t(3, 3)),
        b"o/w": File(b"w", mtime_ns=t(3, 4)),
        b"f": File(b"f", mode=0o600),  # copied up with a new mode
        b"hidden/": Dir(xattrs=((b"trusted.overlay.opaque", b"y"),)),  # recreated after removal
        b"hidden/again": File(b"again", mtime_ns=t(4, 4)),
        b"new/": Dir(xattrs=((b"trusted.overlay.opaque", b"y"),)),  # opaque but new: plain add
        b"new/n": File(b"n", mtime_ns=t(5, 5)),
    }
    merged_lower: dict[bytes, Node] = {
        b"a/": Dir(),
        b"a/keep": File(b"k"),
        b"a/gone": File(b"g"),
        b"a/new1": File(b"n1", mtime_ns=t(1, 1)),
        b"o/": Dir(),
        b"o/x": File(b"x"),
        b"o/y/z": File(b"z"),
        b"f": File(b"f"),
    }
    merged: dict[bytes, Node] = {
        b"a/": Dir(),
        b"a/keep": File(b"k"),
        b"a/added": File(b"added", mtime_ns=t(2, 2)),
        b"o/": Dir(),
        b"o/x": File(b"x2", mtime_ns=t(3, 3)),
        b"o/w": File(b"w", mtime_ns=t(3, 4)),
        b"f": File(b"f", mode=0o600),
        b"hidden/": Dir(),
        b"hidden/again": File(b"again", mtime_ns=t(4, 4)),
        b"new/": Dir(),
        b"new/n": File(b"n", mtime_ns=t(5, 5)),
    }
    return [l0, l1], upper, merged_lower, merged


def _pairs() -> dict[str, tuple[Spec, Spec]]:
    p: dict[str, tuple[Spec, Spec]] = {}
    p["empty-diff"] = ({b"a": File(b"a"), b"d/": Dir()}, {b"a": File(b"a"), b"d/": Dir()})
    p["add"] = ({}, {b"d/f": File(b"new"), b"g": File(b"g")})
    p["delete-tree"] = ({b"t/a/b/c": File(b"c"), b"t/x": File(b"x"), b"u": File(b"u")}, {b"u": File(b"u")})
    p["dir-to-file"] = ({b"x/y": File(b"y")}, {b"x": File(b"file now")})
    p["file-to-dir"] = ({b"x": File(b"file")}, {b"x/y": File(b"y")})
    p["hardlinks"] = (
        {b"h1": File(b"h", mtime_ns=t(1)), b"h2": Hardlink(b"h1")},
        {b"h1": File(b"h", mtime_ns=t(1)), b"h2": Hardlink(b"h1"), b"h0": Hardlink(b"h1")},
    )
    p["sockets-only"] = ({b"d/": Dir()}, {b"d/": Dir(), b"d/s": Socket(), b"s": Socket()})
    return p


PAIRS: dict[str, tuple[Spec, Spec]] = _pairs()
