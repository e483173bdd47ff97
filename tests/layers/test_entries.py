"""Changes -> tar entries (containerd 1.6.20 ``ChangeWriter`` semantics)."""

from __future__ import annotations

import os
from collections.abc import Callable

import fsgen
import pytest
from conftest import needs_root
from fsgen import CAP_NET_RAW, CAP_SETUID, Device, Dir, Fifo, File, Hardlink, Socket, Symlink, t

from blobchain.layers.changes import diff
from blobchain.layers.entries import CAPABILITY_PAX_KEY, tar_entries
from blobchain.layers.snapshot import Snapshot
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

Pair = Callable[[tuple[fsgen.Spec, fsgen.Spec]], tuple[Snapshot, Snapshot]]


def entries(pair: Pair, lower: fsgen.Spec, upper: fsgen.Spec, **kw: int | None) -> list[TarEntry]:
    lo, up = pair((lower, upper))
    return list(tar_entries(diff(lo, up), up, **kw))  # type: ignore[arg-type]


def layout(es: list[TarEntry]) -> list[tuple[bytes, bytes, bytes]]:
    return [(e.name, e.typeflag, e.linkname) for e in es]


def by_name(es: list[TarEntry]) -> dict[bytes, TarEntry]:
    return {e.name: e for e in es}


def test_add_regular_file_fields(pair: Pair) -> None:
    (e,) = entries(pair, {}, {b"f": File(b"hello", mode=0o640, mtime_ns=t(3, 999_999_999))})
    assert (e.name, e.typeflag, e.mode, e.size, e.mtime, e.linkname) == (
        b"f",
        TYPE_REG,
        0o640,
        5,
        fsgen.T0 + 3,
        b"",
    )
    assert (e.devmajor, e.devminor, e.pax) == (0, 0, {})
    # The writer checks the body against the walk.
    assert e.source == b"f" and e.ino and e.dev and e.mtime_ns == t(3, 999_999_999)


def test_empty_diff_has_no_entries(pair: Pair) -> None:
    assert entries(pair, *fsgen.PAIRS["empty-diff"]) == []


def test_only_bodies_get_a_source(pair: Pair) -> None:
    es = by_name(entries(pair, {}, {b"empty": File(), b"d/": Dir(), b"l": Symlink(b"x"), b"p": Fifo()}))
    assert all(e.source is None and e.ino == 0 for e in es.values())


def test_directories_and_parents(pair: Pair) -> None:
    lower = {b"keep/deep/old": File(b"o"), b"keep/": Dir(), b"keep/deep/": Dir(mode=0o750, mtime_ns=t(7))}
    upper = {**lower, b"keep/": Dir(mode=0o700), b"keep/deep/newfile": File(b"n"), b"a/b/c/d": File()}
    es = entries(pair, lower, upper)
    assert layout(es) == [
        (b"a/", TYPE_DIR, b""),
        (b"a/b/", TYPE_DIR, b""),
        (b"a/b/c/", TYPE_DIR, b""),
        (b"a/b/c/d", TYPE_REG, b""),
        (b"keep/", TYPE_DIR, b""),  # a change itself
        (b"keep/deep/", TYPE_DIR, b""),  # pulled in as a parent, with the upper's metadata
        (b"keep/deep/newfile", TYPE_REG, b""),
    ]
    d = by_name(es)
    assert d[b"keep/"].mode == 0o700
    assert (d[b"keep/deep/"].mode, d[b"keep/deep/"].mtime, d[b"keep/deep/"].size) == (0o750, fsgen.T0 + 7, 0)


def test_parents_emitted_once_and_never_the_root(pair: Pair) -> None:
    es = entries(pair, {b"d/x": File(b"1"), b"d/y": File(b"2")}, {b"d/x": File(b"3"), b"d/y": File(b"4")})
    assert [e.name for e in es] == [b"d/", b"d/x", b"d/y"]


def test_whiteouts(pair: Pair) -> None:
    lower = {
        b"gone": File(b"x", uid=5),
        b"etc/cfg": File(b"c"),
        b"tree/a/b": File(),
        b"etc/": Dir(mode=0o711),
    }
    upper = {b"etc/": Dir(mode=0o711)}
    es = entries(pair, lower, upper, whiteout_epoch=42)
    assert layout(es) == [
        (b"etc/", TYPE_DIR, b""),  # the parent comes first
        (b"etc/.wh.cfg", TYPE_REG, b""),
        (b".wh.gone", TYPE_REG, b""),
        (b".wh.tree", TYPE_REG, b""),  # one whiteout for a whole tree
    ]
    for w in es[1:]:
        assert (w.mode, w.uid, w.gid, w.size, w.mtime, w.pax, w.source) == (0, 0, 0, 0, 42, {}, None)
    assert es[0].mode == 0o711


def test_whiteout_sits_where_the_deleted_name_sorts(pair: Pair) -> None:
    lower = {b"x/a": File(), b"x/y": File()}
    upper = {b"x/": Dir(mtime_ns=t(1)), b"x/new": File(b"n")}
    assert [e.name for e in entries(pair, lower, upper)] == [b"x/", b"x/.wh.a", b"x/new", b"x/.wh.y"]


def test_type_changes_have_no_whiteout(pair: Pair) -> None:
    lower = {b"d2f/x": File(b"x"), b"f2d": File(b"f")}
    upper = {b"d2f": File(b"file"), b"f2d/in": File(b"in")}
    assert layout(entries(pair, lower, upper)) == [
        (b"d2f", TYPE_REG, b""),
        (b"f2d/", TYPE_DIR, b""),
        (b"f2d/in", TYPE_REG, b""),
    ]


def test_symlinks_are_stored_raw(pair: Pair) -> None:
    es = by_name(
        entries(pair, {}, {b"out": Symlink(b"/etc/passwd"), b"rel": Symlink(b"../../x\xff"), b"d/": Dir()})
    )
    assert (es[b"out"].typeflag, es[b"out"].linkname, es[b"out"].mode, es[b"out"].size) == (
        TYPE_SYMLINK,
        b"/etc/passwd",
        0o777,
        0,
    )
    assert es[b"rel"].linkname == b"../../x\xff"


@needs_root
def test_special_files_and_sockets(pair: Pair) -> None:
    upper = {
        b"c": Device("c", 1, 3),
        b"b": Device("b", 259, 70000, mode=0o660, gid=6),
        b"p": Fifo(mode=0o600),
        b"s": Socket(),
        b"sockdir/s": Socket(),  # skipped without pulling in its parent
        b"sockdir/": Dir(),
    }
    es = entries(pair, {b"sockdir/": Dir()}, upper)
    assert layout(es) == [(b"b", TYPE_BLOCK, b""), (b"c", TYPE_CHAR, b""), (b"p", TYPE_FIFO, b"")]
    d = by_name(es)
    assert (d[b"c"].devmajor, d[b"c"].devminor) == (1, 3)
    assert (d[b"b"].devmajor, d[b"b"].devminor, d[b"b"].mode, d[b"b"].gid) == (259, 70000, 0o660, 6)
    assert (d[b"p"].devmajor, d[b"p"].devminor, d[b"p"].size) == (0, 0, 0)


def test_deleted_socket_gets_a_whiteout(pair: Pair) -> None:
    assert [e.name for e in entries(pair, {b"s": Socket()}, {})] == [b".wh.s"]


@needs_root
def test_mode_bits_and_big_ids(pair: Pair) -> None:
    upper = {
        b"suid": File(b"s", mode=0o4755),
        b"sgid": File(b"g", mode=0o2711, gid=50),
        b"tmp/": Dir(mode=0o1777),
        b"biguid": File(b"u", uid=3_000_000, gid=1 << 21),
    }
    d = by_name(entries(pair, {}, upper))
    assert d[b"suid"].mode == 0o4755
    assert (d[b"sgid"].mode, d[b"sgid"].gid) == (0o2711, 50)
    assert d[b"tmp/"].mode == 0o1777
    assert (d[b"biguid"].uid, d[b"biguid"].gid) == (3_000_000, 1 << 21)


@needs_root
def test_capability_pax_record(pair: Pair) -> None:
    upper = {
        b"cap": File(b"c", xattrs=((b"security.capability", CAP_SETUID),)),
        b"capdir/": Dir(xattrs=((b"security.capability", CAP_NET_RAW),)),
        b"user": File(b"u", xattrs=((b"user.foo", b"bar"), (b"trusted.x", b"y"))),
    }
    d = by_name(entries(pair, {}, upper))
    assert d[b"cap"].pax == {CAPABILITY_PAX_KEY: CAP_SETUID}
    assert d[b"capdir/"].pax == {CAPABILITY_PAX_KEY: CAP_NET_RAW}
    assert d[b"user"].pax == {}  # no other xattr is ever serialised


def test_hardlinks_to_lower_files(pair: Pair) -> None:
    lower = {b"hl1": File(b"hl", mtime_ns=t(1, 1)), b"hl2": Hardlink(b"hl1")}
    upper = {**lower, b"hl3": Hardlink(b"hl1")}
    es = entries(pair, lower, upper)
    assert layout(es) == [(b"hl3", TYPE_REG, b""), (b"hl1", TYPE_LINK, b"hl3"), (b"hl2", TYPE_LINK, b"hl3")]
    assert es[0].size == 2 and es[0].source == b"hl3"
    for link in es[1:]:
        assert (link.size, link.mode, link.mtime, link.source) == (0, 0o644, fsgen.T0 + 1, None)


def test_hardlinks_within_a_layer(pair: Pair) -> None:
    upper = {
        b"b": File(b"x"),
        b"a": Hardlink(b"b"),
        b"c": Hardlink(b"b"),
        b"sym": Symlink(b"t"),
        b"sym2": Hardlink(b"sym"),
    }
    assert layout(entries(pair, {}, upper)) == [
        (b"a", TYPE_REG, b""),
        (b"b", TYPE_LINK, b"a"),
        (b"c", TYPE_LINK, b"a"),
        (b"sym", TYPE_SYMLINK, b"t"),
        (b"sym2", TYPE_LINK, b"sym"),
    ]


def test_unchanged_hardlinks_are_not_written(pair: Pair) -> None:
    lower = {b"u1": File(b"u", mtime_ns=t(0, 3)), b"u2": Hardlink(b"u1")}
    assert entries(pair, lower, dict(lower)) == []


def test_deferred_peers_pull_in_their_parents(pair: Pair) -> None:
    lower = {b"hp/a": File(b"x", mtime_ns=t(5, 5)), b"hq/b": Hardlink(b"hp/a")}
    upper = {**lower, b"hr/c": Hardlink(b"hp/a")}
    assert layout(entries(pair, lower, upper)) == [
        (b"hr/", TYPE_DIR, b""),
        (b"hr/c", TYPE_REG, b""),
        (b"hp/", TYPE_DIR, b""),
        (b"hp/a", TYPE_LINK, b"hr/c"),
        (b"hq/", TYPE_DIR, b""),
        (b"hq/b", TYPE_LINK, b"hr/c"),
    ]


@needs_root
def test_link_header_carries_capability(pair: Pair) -> None:
    cap = ((b"security.capability", CAP_NET_RAW),)
    lower = {b"a": File(b"x", mtime_ns=t(0, 9), xattrs=cap), b"b": Hardlink(b"a")}
    upper = {**lower, b"c": Hardlink(b"a")}
    es = entries(pair, lower, upper)
    assert [e.pax for e in es] == [{CAPABILITY_PAX_KEY: CAP_NET_RAW}] * 3


def test_mtime_truncation_and_epoch_clamp(pair: Pair) -> None:
    upper = {
        b"late": File(b"l", mtime_ns=t(100, 999_999_999)),
        b"early": File(b"e", mtime_ns=t(-100, 5)),
        b"old": File(b"o", mtime_ns=-1_500_000_000),
        b"exact": File(b"x", mtime_ns=t(0)),
    }
    lower = {b"w": File()}
    plain = by_name(entries(pair, lower, upper, whiteout_epoch=fsgen.T0 + 50))
    assert plain[b"late"].mtime == fsgen.T0 + 100
    assert plain[b"early"].mtime == fsgen.T0 - 100
    assert plain[b"old"].mtime == -2  # floor, as Go's Truncate
    assert plain[b".wh.w"].mtime == fsgen.T0 + 50
    assert plain[b"exact"].mtime == fsgen.T0


def test_source_date_epoch_clamps_everything(snapshots: Callable[..., Snapshot]) -> None:
    lo = snapshots({b"w": File()})
    up = snapshots({b"late": File(b"l", mtime_ns=t(100, 1)), b"early": File(b"e", mtime_ns=t(-100, 5))})
    d = by_name(list(tar_entries(diff(lo, up), up, whiteout_epoch=fsgen.T0 + 50, source_date_epoch=fsgen.T0)))
    assert d[b"late"].mtime == fsgen.T0
    assert d[b"early"].mtime == fsgen.T0 - 100
    assert d[b".wh.w"].mtime == fsgen.T0  # whiteouts are clamped too
    d = by_name(list(tar_entries(diff(lo, up), up, whiteout_epoch=0, source_date_epoch=fsgen.T0)))
    assert d[b".wh.w"].mtime == 0


def test_long_and_odd_names_pass_through(pair: Pair) -> None:
    long_name = b"longdir/" + b"g" * 110
    deep = b"/".join([b"p" * 60] * 5) + b"/" + b"q" * 40
    upper = {long_name: File(b"1"), deep: File(b"2"), "ünï.txt".encode(): File(), b"bad\xff\xfe": File()}
    names = [e.name for e in entries(pair, {}, upper)]
    assert long_name in names and deep in names and len(deep) > 255
    assert "ünï.txt".encode() in names and b"bad\xff\xfe" in names


def test_big_sparse_file_size(pair: Pair) -> None:
    size = (8 << 30) + 4097
    d = by_name(entries(pair, {}, {b"big": File(b"head", size=size)}))
    assert d[b"big"].size == size and d[b"big"].source == b"big"


def test_kitchen_sink_entries_are_unique_and_clean(pair: Pair) -> None:
    es = entries(pair, *fsgen.kitchen_sink())
    names = [e.name for e in es]
    assert len(names) == len(set(names))
    assert not any(n.startswith((b"/", b"./")) for n in names)
    assert all(n.endswith(b"/") == (e.typeflag == TYPE_DIR) for n, e in zip(names, es, strict=True))
    assert all(os.path.basename(n.rstrip(b"/")) != b"sock1" for n in names)


@pytest.mark.parametrize("epoch", [0, 1_234_567_890])
def test_entries_are_deterministic(pair: Pair, epoch: int) -> None:
    lo, up = pair(fsgen.kitchen_sink())
    first = list(tar_entries(diff(lo, up), up, whiteout_epoch=epoch))
    again = list(tar_entries(diff(lo, up), up, whiteout_epoch=epoch))
    assert first == again
    assert any(e.mtime == epoch and e.name.rpartition(b"/")[2].startswith(b".wh.") for e in first)
