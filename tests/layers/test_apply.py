"""The OCI layer applier on hand-built tars: whiteouts, replacement rules, attributes, escapes."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import services

from blobchain.layers.apply import ApplyStats, InvalidLayer, apply_layer
from blobchain.layers.errors import InvalidArgument, PathEscapes

needs_root = services.needs_root("chown, mknod and security.* xattrs")

# A valid VFS_CAP_REVISION_2 blob (20 bytes): cap_net_bind_service permitted+effective.
CAP = b"\x01\x00\x00\x02" + b"\x00\x04\x00\x00" + b"\x00" * 12


def _s(name: bytes | str) -> str:
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name


def _info(name: bytes | str, typ: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 1000):
    ti = tarfile.TarInfo(_s(name))
    ti.type = typ
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    return ti


def reg(name, data: bytes = b"", *, cap: bytes | None = None, pax_mtime: str | None = None, **kw):
    ti = _info(name, tarfile.REGTYPE, **kw)
    ti.size = len(data)
    pax = {}
    if cap is not None:
        pax["SCHILY.xattr.security.capability"] = _s(cap)
    if pax_mtime is not None:
        pax["mtime"] = pax_mtime
    ti.pax_headers = pax
    return ti, data


def dr(name, **kw):
    kw.setdefault("mode", 0o755)
    return _info(name, tarfile.DIRTYPE, **kw), None


def sym(name, target, **kw):
    ti = _info(name, tarfile.SYMTYPE, mode=0o777, **kw)
    ti.linkname = _s(target)
    return ti, None


def hl(name, target, *, cap: bytes | None = None, **kw):
    ti = _info(name, tarfile.LNKTYPE, **kw)
    ti.linkname = _s(target)
    if cap is not None:
        ti.pax_headers = {"SCHILY.xattr.security.capability": _s(cap)}
    return ti, None


def dev(name, typ: bytes, major: int = 0, minor: int = 0, **kw):
    ti = _info(name, typ, **kw)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def wh(name):
    # Whiteouts as containerd writes them: empty regular file, mode 0, mtime fixed.
    return _info(name, tarfile.REGTYPE, mode=0, mtime=0), b""


def tar(*members, fmt: int = tarfile.PAX_FORMAT) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def apply(dest: Path, *members, fmt: int = tarfile.PAX_FORMAT, **kw) -> ApplyStats:
    # Unprivileged runs cannot chown; the tests that check owners are root-only.
    kw.setdefault("same_owner", os.geteuid() == 0)
    return apply_layer(tar(*members, fmt=fmt), dest, **kw)


def listing(root: Path) -> list[bytes]:
    out = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), os.fsencode(root)))
    return sorted(out)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


# --- basic entries ----------------------------------------------------------------------------


@needs_root
def test_regular_file_attributes_and_content(dest: Path) -> None:
    stats = apply(
        dest,
        dr("bin", mode=0o750, uid=3, gid=4, mtime=5000),
        reg("bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=2**21 + 5, gid=2**22, mtime=1700000000),
        reg("sgid", b"x", mode=0o2710, uid=1, gid=2),
        dr("tmp", mode=0o1777),
    )
    st = os.lstat(dest / "bin/tool")
    assert (dest / "bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(st.st_mode) == 0o4755  # setuid survives: chmod comes after chown
    assert (st.st_uid, st.st_gid) == (2**21 + 5, 2**22)
    assert st.st_mtime_ns == 1700000000 * 10**9
    assert stat.S_IMODE(os.lstat(dest / "sgid").st_mode) == 0o2710
    assert stat.S_IMODE(os.lstat(dest / "tmp").st_mode) == 0o1777
    d = os.lstat(dest / "bin")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid) == (0o750, 3, 4)
    # Set in the final pass, so creating bin/tool afterwards did not disturb it.
    assert d.st_mtime_ns == 5000 * 10**9
    assert stats == ApplyStats(entries=4, bytes=11)


def test_pax_mtime_keeps_nanoseconds(dest: Path) -> None:
    apply(dest, reg("f", b"a", pax_mtime="1700000000.123456789"), reg("neg", b"", mtime=-5))
    assert os.lstat(dest / "f").st_mtime_ns == 1700000000123456789
    assert os.lstat(dest / "neg").st_mtime_ns == -5 * 10**9


def test_symlinks_are_created_raw_and_never_followed(dest: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep")
    (dest / "esc").symlink_to(outside / "victim")
    apply(
        dest,
        sym("up", "../../../etc/passwd", mtime=1234),
        sym("abs", "/etc/shadow"),
        reg("esc", b"replaced"),  # replaces the symlink, does not write through it
    )
    assert os.readlink(dest / "up") == "../../../etc/passwd"
    assert os.readlink(dest / "abs") == "/etc/shadow"
    assert os.lstat(dest / "up").st_mtime_ns == 1234 * 10**9
    assert not (dest / "esc").is_symlink()
    assert (dest / "esc").read_bytes() == b"replaced"
    assert (outside / "victim").read_bytes() == b"keep"


def test_raw_and_long_names_round_trip_byte_exactly(dest: Path) -> None:
    bad = b"caf\xe9-\xff\xfe"  # not UTF-8
    uni = "ünï.txt".encode()
    long_dir = b"d" * 120
    long_name = b"n" * 200
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        out = dest / str(fmt)
        apply(
            out,
            reg(bad, b"1"),
            reg(uni, b"2"),
            dr(long_dir),
            reg(long_dir + b"/" + long_name, b"3"),
            sym(b"lnk", b"\xff" * 150),
            fmt=fmt,
        )
        root = os.fsencode(out)
        assert sorted(os.listdir(root)) == sorted([bad, uni, long_dir, b"lnk"])
        with open(os.path.join(root, bad), "rb") as f:
            assert f.read() == b"1"
        assert os.listdir(os.path.join(root, long_dir)) == [long_name]
        assert os.readlink(os.path.join(root, b"lnk")) == b"\xff" * 150


def test_dot_slash_names_and_root_entry(dest: Path) -> None:
    stats = apply(dest, dr("./", mode=0o700, mtime=1), dr("./a/", mode=0o711), reg("./a/./f", b"x"))
    assert stat.S_IMODE(os.lstat(dest / "a").st_mode) == 0o711
    assert (dest / "a/f").read_bytes() == b"x"
    # containerd ignores the root entry; the destination keeps its own attributes.
    assert stat.S_IMODE(os.lstat(dest).st_mode) != 0o700
    assert stats.skipped == 1


def test_missing_parents_are_created_0755(dest: Path) -> None:
    old = os.umask(0o077)  # a narrow umask must not narrow the created parents
    try:
        apply(dest, reg("x/y/z", b"data"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(dest / "x").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(dest / "x/y").st_mode) == 0o755
    assert (dest / "x/y/z").read_bytes() == b"data"


def test_parent_that_is_a_file_is_an_invalid_layer(dest: Path) -> None:
    (dest / "f").write_bytes(b"")
    with pytest.raises(InvalidLayer):
        apply(dest, reg("f/child", b"x"))
    assert (dest / "f").is_file()


# --- replacement rules ------------------------------------------------------------------------


@needs_root
def test_dir_onto_dir_replaces_attributes_and_keeps_children(dest: Path) -> None:
    (dest / "d").mkdir(mode=0o755)
    (dest / "d/child").write_bytes(b"lower")
    os.setxattr(dest / "d", "security.capability", CAP)
    apply(dest, dr("d", mode=0o2700, uid=7, gid=8, mtime=42))
    st = os.lstat(dest / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o2700, 7, 8, 42 * 10**9)
    assert (dest / "d/child").read_bytes() == b"lower"
    # The entry had no capability record, so the existing one is gone ("attributes replace").
    with pytest.raises(OSError):
        os.getxattr(dest / "d", "security.capability")


def test_file_replaced_by_dir_and_dir_by_file(dest: Path) -> None:
    (dest / "was_file").write_bytes(b"x")
    (dest / "was_dir/deep").mkdir(parents=True)
    (dest / "was_dir/deep/f").write_bytes(b"y")
    (dest / "was_link").symlink_to("was_dir")
    apply(
        dest,
        dr("was_dir", mode=0o700),  # dir onto dir: merged
        dr("was_file", mode=0o700),
        reg("was_link", b"now a file"),
    )
    assert (dest / "was_file").is_dir() and not (dest / "was_file").is_symlink()
    assert (dest / "was_dir/deep/f").read_bytes() == b"y"
    assert (dest / "was_link").read_bytes() == b"now a file"
    apply(dest, reg("was_dir", b"flat"))
    assert (dest / "was_dir").read_bytes() == b"flat"


# --- whiteouts --------------------------------------------------------------------------------


def test_whiteouts_delete_files_and_trees_and_are_not_created(dest: Path) -> None:
    (dest / "etc/app.d").mkdir(parents=True)
    (dest / "etc/app.d/a.cfg").write_bytes(b"a")
    (dest / "etc/conf").write_bytes(b"c")
    (dest / "etc/keep").write_bytes(b"k")
    (dest / "lnk").symlink_to("etc")
    stats = apply(
        dest,
        dr("etc"),
        wh("etc/.wh.conf"),
        wh("etc/.wh.app.d"),
        wh(".wh.lnk"),  # removes the symlink itself, not etc/
        wh(".wh.never-existed"),
        wh("nodir/.wh.x"),  # no parent: nothing to hide, nothing created
    )
    assert listing(dest) == [b"etc", b"etc/keep"]
    assert stats.whiteouts == 5


def test_opaque_clears_lower_children_wherever_it_sits(dest: Path) -> None:
    (dest / "d/sub").mkdir(parents=True)
    (dest / "d/a").write_bytes(b"a")
    (dest / "d/sub/c").write_bytes(b"c")
    (dest / "d/sub2").mkdir()
    (dest / "other").write_bytes(b"o")
    stats = apply(
        dest,
        dr("d"),
        reg("d/new", b"n"),
        dr("d/sub"),
        reg("d/sub/x", b"x"),
        wh("d/.wh..wh..opq"),  # after the layer's own entries: they stay, lower ones go
    )
    assert listing(dest) == [b"d", b"d/new", b"d/sub", b"d/sub/x", b"other"]
    assert stats.opaques == 1 and stats.whiteouts == 0

    stats = apply(dest, wh("d/.wh..wh..opq"), reg("d/later", b"l"))
    assert listing(dest) == [b"d", b"d/later", b"other"]


def test_opaque_at_the_root(dest: Path) -> None:
    (dest / "old").mkdir()
    (dest / "old/f").write_bytes(b"f")
    (dest / "top").write_bytes(b"t")
    apply(dest, reg("new", b"n"), wh(".wh..wh..opq"))
    assert listing(dest) == [b"new"]


def test_opaque_on_missing_dir_is_a_no_op(dest: Path) -> None:
    apply(dest, wh("ghost/.wh..wh..opq"))
    assert listing(dest) == []


# --- hardlinks, devices, capabilities ---------------------------------------------------------


@needs_root
def test_hardlinks_within_layer_and_to_lower(dest: Path) -> None:
    (dest / "lower").write_bytes(b"L")
    apply(
        dest,
        reg("a", b"shared", mode=0o4750, uid=5, gid=6, cap=CAP, mtime=77),
        hl("b", "a", mode=0o4750, uid=5, gid=6, cap=CAP, mtime=77),
        dr("sub"),
        hl("sub/c", "a", mode=0o4750, uid=5, gid=6, cap=CAP, mtime=77),
        hl("l2", "lower", mode=0o600, mtime=88),
    )
    a, b, c = (os.lstat(dest / n) for n in ("a", "b", "sub/c"))
    assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3
    # The link headers carry the inode's attributes; chown on link must not strip suid or caps.
    assert stat.S_IMODE(a.st_mode) == 0o4750 and (a.st_uid, a.st_gid) == (5, 6)
    assert os.getxattr(dest / "a", "security.capability") == CAP
    assert a.st_mtime_ns == 77 * 10**9
    low, l2 = os.lstat(dest / "lower"), os.lstat(dest / "l2")
    assert low.st_ino == l2.st_ino and stat.S_IMODE(low.st_mode) == 0o600


def test_hardlink_to_missing_target_is_invalid(dest: Path) -> None:
    with pytest.raises(InvalidLayer):
        apply(dest, hl("x", "nope"))


@needs_root
def test_devices_and_fifos(dest: Path) -> None:
    apply(
        dest,
        dev("null", tarfile.CHRTYPE, 1, 3, mode=0o666, uid=9, mtime=11),
        dev("loop0", tarfile.BLKTYPE, 7, 0, mode=0o660, gid=6),
        dev("fifo", tarfile.FIFOTYPE, mode=0o620, mtime=12),
    )
    null = os.lstat(dest / "null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_IMODE(null.st_mode) == 0o666 and null.st_uid == 9 and null.st_mtime_ns == 11 * 10**9
    loop = os.lstat(dest / "loop0")
    assert stat.S_ISBLK(loop.st_mode) and os.major(loop.st_rdev) == 7 and loop.st_gid == 6
    fifo = os.lstat(dest / "fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620


@needs_root
def test_capability_xattr_with_suid_and_owner(dest: Path) -> None:
    apply(dest, reg("ping", b"\x7fELF", mode=0o4755, uid=1000, gid=1000, cap=CAP))
    assert os.getxattr(dest / "ping", "security.capability") == CAP
    st = os.lstat(dest / "ping")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 1000
    # No other xattr records are restored.
    apply(dest, reg("plain", b""))
    assert "security.capability" not in os.listxattr(dest / "plain")


@needs_root
def test_invalid_capability_blob_is_rejected(dest: Path) -> None:
    with pytest.raises(InvalidLayer):
        apply(dest, reg("f", b"", cap=b"\x01\x02"))


@needs_root
def test_same_owner_false_skips_chown(dest: Path) -> None:
    apply(dest, reg("f", b"x", uid=1234, gid=4321), same_owner=False)
    st = os.lstat(dest / "f")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


# --- escapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "members",
    [
        [reg("../x", b"evil")],
        [reg("a/../../x", b"evil")],
        [reg("/etc/blobchain-apply-test", b"evil")],
        [reg("ok", b""), hl("y", "../x")],
        [hl("y", "/etc/passwd")],
        [wh(".wh..")],
        [wh("sub/.wh..")],
        [wh(".wh.")],
    ],
    ids=[
        "dotdot",
        "inner-dotdot",
        "absolute",
        "hardlink-dotdot",
        "hardlink-absolute",
        "wh-dotdot",
        "wh-sub-dotdot",
        "wh-bare",
    ],
)
def test_escaping_names_are_rejected(tmp_path: Path, members) -> None:
    dest = tmp_path / "a" / "dest"
    dest.mkdir(parents=True)
    (tmp_path / "a" / "x").write_bytes(b"outside")
    with pytest.raises(PathEscapes) as exc:
        apply(dest, *members)
    assert isinstance(exc.value, InvalidArgument) and exc.value.code == "path_escapes"
    assert (tmp_path / "a" / "x").read_bytes() == b"outside"
    assert sorted(os.listdir(tmp_path / "a")) == ["dest", "x"]
    assert not os.path.exists("/etc/blobchain-apply-test")


@pytest.mark.parametrize("kind", ["file", "dir", "whiteout", "opaque", "hardlink-target", "hardlink-into"])
def test_paths_through_a_symlinked_directory_are_rejected(tmp_path: Path, kind: str) -> None:
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (dest / "link").symlink_to(outside)
    (dest / "inner").mkdir()
    (dest / "inlink").symlink_to("inner")  # even a symlink that stays inside is not followed
    (dest / "inner/f").write_bytes(b"f")
    members = {
        "file": [reg("link/new", b"evil")],
        "dir": [dr("inlink/sub")],
        "whiteout": [wh("link/.wh.secret")],
        "opaque": [wh("link/.wh..wh..opq")],
        "hardlink-target": [hl("stolen", "link/secret")],
        "hardlink-into": [hl("inlink/g", "inner/f")],
    }[kind]
    with pytest.raises(PathEscapes):
        apply(dest, *members)
    assert sorted(os.listdir(outside)) == ["secret"]
    assert sorted(os.listdir(dest / "inner")) == ["f"]
    assert not (dest / "stolen").exists()


def test_malformed_tar_is_invalid_layer(dest: Path) -> None:
    with pytest.raises(InvalidLayer):
        apply_layer(io.BytesIO(b"\x01" * 700), dest)
    good = tar(reg("f", b"0123456789" * 100)).getvalue()
    with pytest.raises(InvalidLayer):
        apply_layer(io.BytesIO(good[:1000]), dest)  # body cut short


def test_empty_layer(dest: Path) -> None:
    assert apply_layer(io.BytesIO(b"\0" * 1024), dest) == ApplyStats()
    assert listing(dest) == []


# --- streaming --------------------------------------------------------------------------------


class _Synthetic(io.RawIOBase):
    """A tar stream produced on the fly: header, ``size`` bytes of 'z', padding, trailer."""

    def __init__(self, size: int) -> None:
        ti = tarfile.TarInfo("big")
        ti.size = size
        self._parts = [ti.tobuf(tarfile.PAX_FORMAT)]
        self._left = size
        self._tail = b"\0" * ((-size) % 512 + 1024)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = len(b)
        if self._parts:
            chunk = self._parts[0][:n]
            self._parts[0] = self._parts[0][n:]
            if not self._parts[0]:
                self._parts.pop()
        elif self._left:
            chunk = b"z" * min(n, self._left)
            self._left -= len(chunk)
        else:
            chunk, self._tail = self._tail[:n], self._tail[n:]
        b[: len(chunk)] = chunk
        return len(chunk)


def test_memory_does_not_grow_with_file_size(dest: Path) -> None:
    size = 32 << 20
    tracemalloc.start()
    try:
        apply_layer(io.BufferedReader(_Synthetic(size), 1 << 16), dest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert os.path.getsize(dest / "big") == size
    assert peak < 8 << 20, peak
