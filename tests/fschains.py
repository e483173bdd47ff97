"""A hypothesis generator of filesystem chains: 2-4 full states, each derived from the previous
by random operations (files, dirs, symlinks, hardlinks, FIFOs, devices, capabilities, owners,
modes, mtimes; non-UTF-8, non-ASCII and long names, link targets over 100 bytes), as a model
that ``Model.spec()`` turns into an fsgen spec.

Shared by the engine's round-trip property (``tests/layers/test_roundtrip.py``, which explains
the generator's rules) and containerd parity (``tests/compat``). Every new inode and every
content change gets an mtime no other inode has, so each change is one containerd detects.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import fsgen
from hypothesis import strategies as st

NS = 1_000_000_000
CAP_XATTR = b"security.capability"

Path_ = tuple[bytes, ...]

# A small pool so paths collide (replacements, type changes) and sort-order traps appear.
NAMES = sorted(
    [
        b"a",
        b"b",
        b"a-b",
        b"a.b",
        b" sp ace",
        "ünï".encode(),
        b"caf\xe9",  # Latin-1, not UTF-8
        b"\xff\xfe",
        b"m" * 60,  # two levels: over 100 bytes, split into USTAR prefix and name
        b"n" * 101,  # a component over 100 bytes: PAX path
        b"L" * 200,
    ]
)
TARGETS = sorted(
    [
        b"a",
        b"../a-b",
        b"../../../../etc/passwd",
        b"/etc/shadow",
        b"\xff\xfe/x",
        "ü/ä".encode(),
        b"t" * 150,  # linkname over 100 bytes: PAX linkpath
        b".",
    ]
)
CAPS = sorted(
    [
        fsgen.CAP_NET_RAW,
        fsgen.CAP_NET_ADMIN,
        fsgen.CAP_SETUID,
        struct.pack("<5I", 0x02000000, 0x3000, 0, 0, 0),  # v2 without the effective bit
        struct.pack("<5I", 0x02000001, 0xFFFFFFFF, 0x1, 0x1FF, 0),
    ]
)
IDS = [0, 1, 1000, 65534, 2**21 - 1, 2**21, 3_000_000, 2**32 - 2]
MODES = st.one_of(
    st.sampled_from([0o644, 0o755, 0o600, 0o000, 0o4755, 0o2755, 0o1777, 0o6750, 0o7777]),
    st.integers(0, 0o7777),
)
DEVICES = [("c", 1, 3), ("c", 5, 1), ("c", 4095, 1048575), ("b", 7, 0), ("b", 259, 3)]
DATA = st.one_of(st.binary(max_size=40), st.binary(min_size=500, max_size=1600))


# --- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inode:
    data: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    cap: bytes | None


@dataclass(frozen=True)
class FileRef:
    """A regular file path: a name for an inode (several names = hardlinks)."""

    ino: int


Node = fsgen.Dir | fsgen.Symlink | fsgen.Fifo | fsgen.Device | FileRef


@dataclass
class Model:
    paths: dict[Path_, Node]
    inodes: dict[int, Inode]

    def copy(self) -> Model:
        return Model(dict(self.paths), dict(self.inodes))

    def dirs(self) -> list[Path_]:
        return [(), *sorted(p for p, n in self.paths.items() if isinstance(n, fsgen.Dir))]

    def spec(self) -> dict[bytes, fsgen.Node]:
        """The fsgen spec: the first path (sorted) of each inode is the file, the rest link to it."""
        out: dict[bytes, fsgen.Node] = {}
        first: dict[int, bytes] = {}
        for p in sorted(self.paths, key=_join):
            n = self.paths[p]
            key = _join(p)
            if isinstance(n, FileRef):
                if n.ino in first:
                    out[key] = fsgen.Hardlink(first[n.ino])
                    continue
                first[n.ino] = key
                i = self.inodes[n.ino]
                xattrs = ((CAP_XATTR, i.cap),) if i.cap is not None else ()
                out[key] = fsgen.File(i.data, i.mode, i.uid, i.gid, i.mtime_ns, xattrs=xattrs)
            else:
                out[key + b"/" if isinstance(n, fsgen.Dir) else key] = n
        return out


def _join(p: Path_) -> bytes:
    return b"/".join(p)


class Gen:
    """Draws operations on a model; every new inode gets an mtime no other inode has."""

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw
        self.clock = 0
        self.next_ino = 0

    def draw(self, strategy: st.SearchStrategy, label: str | None = None):  # type: ignore[no-untyped-def]
        return self._draw(strategy, label=label)

    def mtime(self) -> int:
        self.clock += 1
        offset = self.clock * 1000 + self.draw(st.integers(0, 999))
        era = self.draw(st.sampled_from(["now", "now", "now", "before-1970", "after-2242"]))
        sec = {"now": 1_700_000_000 + offset, "before-1970": -offset, "after-2242": 8**11 + offset}[era]
        ns = self.draw(st.one_of(st.just(0), st.integers(1, NS - 1)))
        return sec * NS + ns

    def owner(self) -> tuple[int, int]:
        return self.draw(st.sampled_from(IDS)), self.draw(st.sampled_from(IDS))

    def cap(self) -> bytes | None:
        return self.draw(st.one_of(st.none(), st.sampled_from(CAPS)))

    def new_path(self, m: Model) -> Path_:
        parent = self.draw(st.sampled_from(m.dirs()))
        return (*parent, self.draw(st.sampled_from(NAMES)))

    def inode(self) -> Inode:
        uid, gid = self.owner()
        return Inode(self.draw(DATA), self.draw(MODES), uid, gid, self.mtime(), self.cap())

    def pick(self, m: Model, kinds: tuple[type, ...]) -> Path_ | None:
        choices = sorted(p for p, n in m.paths.items() if isinstance(n, kinds))
        return self.draw(st.sampled_from(choices)) if choices else None


def _remove(m: Model, path: Path_) -> None:
    for p in [p for p in m.paths if p[: len(path)] == path]:
        del m.paths[p]


def _touch_parent(m: Model, g: Gen, path: Path_) -> None:
    # Adding or removing a child updates the directory's mtime, as on a real filesystem.
    parent = path[:-1]
    if parent:
        m.paths[parent] = replace(m.paths[parent], mtime_ns=g.mtime())  # type: ignore[type-var]


def _place(m: Model, g: Gen, path: Path_, node: Node) -> None:
    _remove(m, path)
    m.paths[path] = node
    _touch_parent(m, g, path)


OPS = [
    "file",
    "file",
    "write",
    "attr",
    "touch",
    "touchdir",
    "cap",
    "delete",
    "mkdir",
    "mkdir",
    "symlink",
    "link",
    "link",
    "fifo",
    "device",
]


def mutate(m: Model, g: Gen) -> None:
    op = g.draw(st.sampled_from(OPS), label="op")
    files = (FileRef,)
    if op == "write" and (p := g.pick(m, files)):
        ino = m.paths[p].ino  # type: ignore[union-attr]
        old = m.inodes[ino]
        keep = old.mtime_ns % NS == 0 and g.draw(st.booleans(), label="keep mtime")
        # Keeping a whole-second mtime is detected by content; a non-zero fraction would not be.
        m.inodes[ino] = replace(old, data=g.draw(DATA), mtime_ns=old.mtime_ns if keep else g.mtime())
    elif op == "attr" and (p := g.pick(m, (FileRef, fsgen.Dir, fsgen.Symlink, fsgen.Fifo, fsgen.Device))):
        n = m.paths[p]
        uid, gid = g.owner()
        if isinstance(n, FileRef):
            m.inodes[n.ino] = replace(m.inodes[n.ino], mode=g.draw(MODES), uid=uid, gid=gid)
        elif isinstance(n, fsgen.Symlink):
            m.paths[p] = replace(n, uid=uid, gid=gid)
        else:
            m.paths[p] = replace(n, mode=g.draw(MODES), uid=uid, gid=gid)
    elif op == "touch" and (p := g.pick(m, (FileRef, fsgen.Symlink, fsgen.Fifo, fsgen.Device))):
        n = m.paths[p]
        old_t = m.inodes[n.ino].mtime_ns if isinstance(n, FileRef) else n.mtime_ns
        if g.draw(st.booleans(), label="nanoseconds only"):
            ns = g.draw(st.integers(0, NS - 1).filter(lambda x: x != old_t % NS))
            new_t = old_t - old_t % NS + ns
        else:
            new_t = g.mtime()
        if isinstance(n, FileRef):
            m.inodes[n.ino] = replace(m.inodes[n.ino], mtime_ns=new_t)
        else:
            m.paths[p] = replace(n, mtime_ns=new_t)
    elif op == "touchdir" and (p := g.pick(m, (fsgen.Dir,))):
        m.paths[p] = replace(m.paths[p], mtime_ns=g.mtime())  # type: ignore[type-var]
    elif op == "cap" and (p := g.pick(m, (FileRef, fsgen.Dir))):
        n = m.paths[p]
        cap = g.cap()
        if isinstance(n, FileRef):
            m.inodes[n.ino] = replace(m.inodes[n.ino], cap=cap)
        else:
            m.paths[p] = replace(n, xattrs=((CAP_XATTR, cap),) if cap else ())  # type: ignore[call-arg]
    elif op == "delete" and (p := g.pick(m, (FileRef, fsgen.Dir, fsgen.Symlink, fsgen.Fifo, fsgen.Device))):
        _remove(m, p)
        _touch_parent(m, g, p)
    elif op == "mkdir":
        # On an existing directory this deletes and recreates it (possibly with the same attributes).
        uid, gid = g.owner()
        cap = g.draw(st.one_of(st.none(), st.sampled_from(CAPS)))
        _place(
            m,
            g,
            g.new_path(m),
            fsgen.Dir(g.draw(MODES), uid, gid, g.mtime(), ((CAP_XATTR, cap),) if cap else ()),
        )
    elif op == "symlink":
        uid, gid = g.owner()
        _place(m, g, g.new_path(m), fsgen.Symlink(g.draw(st.sampled_from(TARGETS)), uid, gid, g.mtime()))
    elif op == "link" and (src := g.pick(m, files)):
        # A new name for a file of this state or any earlier one (the model carries them over).
        ino = m.paths[src].ino  # type: ignore[union-attr]
        dst = g.new_path(m)
        if dst[: len(src)] != src and src[: len(dst)] != dst:
            _place(m, g, dst, FileRef(ino))
    elif op == "fifo":
        uid, gid = g.owner()
        _place(m, g, g.new_path(m), fsgen.Fifo(g.draw(MODES), uid, gid, g.mtime()))
    elif op == "device":
        kind, major, minor = g.draw(st.sampled_from(DEVICES))
        uid, gid = g.owner()
        _place(m, g, g.new_path(m), fsgen.Device(kind, major, minor, g.draw(MODES), uid, gid, g.mtime()))
    else:  # "file", or an op that found nothing to work on
        path = g.new_path(m)
        g.next_ino += 1
        m.inodes[g.next_ino] = g.inode()
        _place(m, g, path, FileRef(g.next_ino))


def chains() -> st.SearchStrategy[list[Model]]:
    @st.composite
    def build(draw: st.DrawFn) -> list[Model]:
        g = Gen(draw)
        states: list[Model] = []
        m = Model({}, {})
        for _ in range(draw(st.integers(2, 4), label="states")):
            m = m.copy()
            for _ in range(draw(st.integers(1 if states else 3, 10), label="ops")):
                mutate(m, g)
            states.append(m)
        return states

    return build()
