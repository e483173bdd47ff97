"""The double walk: which paths change, how, and in which order (continuity v0.3.0 rules)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import fsgen
import pytest
from conftest import needs_root
from fsgen import CAP_NET_ADMIN, CAP_NET_RAW, Device, Dir, Fifo, File, Hardlink, Socket, Symlink, t

from blobchain.layers.changes import Change, ChangeKind, diff
from blobchain.layers.snapshot import Snapshot, open_snapshot

A, M, D, U = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE, ChangeKind.UNMODIFIED
Pair = Callable[[tuple[fsgen.Spec, fsgen.Spec]], tuple[Snapshot, Snapshot]]


def kinds(changes: list[Change]) -> list[tuple[ChangeKind, bytes]]:
    return [(c.kind, c.path) for c in changes]


def changes(pair: Pair, lower: fsgen.Spec, upper: fsgen.Spec) -> list[tuple[ChangeKind, bytes]]:
    lo, up = pair((lower, upper))
    return kinds(list(diff(lo, up)))


def test_add(pair: Pair) -> None:
    assert changes(
        pair, {b"keep": File(b"k")}, {b"keep": File(b"k"), b"d/f": File(b"new"), b"g": File()}
    ) == [
        (A, b"d"),
        (A, b"d/f"),
        (A, b"g"),
    ]


def test_no_lower_adds_everything(snapshots: Callable[..., Snapshot]) -> None:
    up = snapshots({b"a/b": File(b"x"), b"c": Symlink(b"a")})
    assert kinds(list(diff(None, up))) == [(A, b"a"), (A, b"a/b"), (A, b"c")]


def test_empty_diff(pair: Pair) -> None:
    lower, upper = fsgen.PAIRS["empty-diff"]
    assert changes(pair, lower, upper) == []


def test_same_tree_is_no_change_but_hardlinks_are_unmodified(snapshots: Callable[..., Snapshot]) -> None:
    s = snapshots({b"f": File(b"x"), b"h1": File(b"h"), b"h2": Hardlink(b"h1"), b"d/": Dir()})
    # os.SameFile (same device and inode) short-circuits the comparison.
    assert kinds(list(diff(s, s))) == [(U, b"h1"), (U, b"h2")]


def test_order_is_pre_order_by_raw_bytes(pair: Pair) -> None:
    names = [b"a/b", b"a-b", b"a.b", b"a0", b"b\xff", "bü".encode(), b"b/x", b"B"]
    got = changes(pair, {}, {n: File() for n in names})
    # '/' sorts before every other byte (directoryCompare): a, a/b, a-b, a.b, a0
    assert [p for _, p in got] == [
        b"B",
        b"a",
        b"a/b",
        b"a-b",
        b"a.b",
        b"a0",
        b"b",
        b"b/x",
        "bü".encode(),
        b"b\xff",
    ]


def test_modify_same_size_different_nanoseconds(pair: Pair) -> None:
    assert changes(pair, {b"f": File(b"x", mtime_ns=t(0, 100))}, {b"f": File(b"x", mtime_ns=t(0, 200))}) == [
        (M, b"f")
    ]


def test_nanosecond_touch_from_whole_second(pair: Pair) -> None:
    assert changes(pair, {b"f": File(b"x")}, {b"f": File(b"x", mtime_ns=t(0, 1))}) == [(M, b"f")]


def test_whole_second_mtimes_compare_content(pair: Pair) -> None:
    lower = {b"diff": File(b"aaaa"), b"same": File(b"bbbb"), b"empty": File()}
    upper = {b"diff": File(b"abab"), b"same": File(b"bbbb"), b"empty": File()}
    assert changes(pair, lower, upper) == [(M, b"diff")]


def test_whole_second_big_content_compare(pair: Pair) -> None:
    data = os.urandom(3 << 20)
    flipped = data[:-1] + bytes([data[-1] ^ 1])
    assert changes(pair, {b"f": File(data), b"g": File(data)}, {b"f": File(flipped), b"g": File(data)}) == [
        (M, b"f")
    ]


def test_equal_nonzero_nanoseconds_skip_content(pair: Pair) -> None:
    """continuity trusts equal non-zero nanoseconds: a same-size rewrite is not seen."""
    lower = {b"f": File(b"old!", mtime_ns=t(0.5))}
    upper = {b"f": File(b"new!", mtime_ns=t(0.5))}
    assert changes(pair, lower, upper) == []


def test_size_and_seconds(pair: Pair) -> None:
    lower = {b"size": File(b"a", mtime_ns=t(0, 5)), b"sec": File(b"a", mtime_ns=t(0, 5))}
    upper = {b"size": File(b"ab", mtime_ns=t(0, 5)), b"sec": File(b"a", mtime_ns=t(1, 5))}
    assert changes(pair, lower, upper) == [(M, b"sec"), (M, b"size")]


@needs_root
def test_mode_owner_capability(pair: Pair) -> None:
    cap = (b"security.capability", CAP_NET_RAW)
    lower = {
        b"mode": File(b"m"),
        b"uid": File(b"u"),
        b"gid": File(b"g"),
        b"capadd": File(b"c"),
        b"capchg": File(b"c", xattrs=(cap,)),
        b"capdel": File(b"c", xattrs=(cap,)),
        b"capsame": File(b"c", xattrs=(cap,)),
        b"dircap/": Dir(),
        b"suid": File(b"s", mode=0o755),
    }
    upper = {
        b"mode": File(b"m", mode=0o600),
        b"uid": File(b"u", uid=1000),
        b"gid": File(b"g", gid=1000),
        b"capadd": File(b"c", xattrs=(cap,)),
        b"capchg": File(b"c", xattrs=((b"security.capability", CAP_NET_ADMIN),)),
        b"capdel": File(b"c"),
        b"capsame": File(b"c", xattrs=(cap,)),
        b"dircap/": Dir(xattrs=(cap,)),
        b"suid": File(b"s", mode=0o4755),
    }
    assert changes(pair, lower, upper) == [
        (M, b"capadd"),
        (M, b"capchg"),
        (M, b"capdel"),
        (M, b"dircap"),
        (M, b"gid"),
        (M, b"mode"),
        (M, b"suid"),
        (M, b"uid"),
    ]


@needs_root
def test_directories_compare_metadata_only(pair: Pair) -> None:
    lower = {b"mtime/": Dir(mtime_ns=t(1)), b"mode/": Dir(), b"x/": Dir(xattrs=((b"user.a", b"1"),))}
    upper = {
        b"mtime/": Dir(mtime_ns=t(2, 3)),
        b"mode/": Dir(mode=0o1777),
        b"x/": Dir(xattrs=((b"user.a", b"2"),)),
        b"mtime/new": File(),  # also changes the directory's size and nlink: still not a change
    }
    assert changes(pair, lower, upper) == [(M, b"mode"), (A, b"mtime/new")]


def test_other_xattrs_and_nlink_are_ignored(pair: Pair) -> None:
    lower = {b"f": File(b"x", xattrs=((b"user.a", b"1"),)), b"g": File(b"g")}
    upper = {b"f": File(b"x", xattrs=((b"user.a", b"2"),)), b"g": File(b"g")}
    assert changes(pair, lower, upper) == []


def test_delete_file_and_whole_tree(pair: Pair) -> None:
    lower, upper = fsgen.PAIRS["delete-tree"]
    got = changes(pair, lower, upper)
    assert got == [(D, b"t")]


def test_delete_keeps_lower_stat(pair: Pair) -> None:
    lo, up = pair(({b"gone": File(b"12345")}, {}))
    (ch,) = list(diff(lo, up))
    assert ch.kind == D and ch.st is not None and ch.st.st_size == 5


def test_dir_to_file_and_file_to_dir(pair: Pair) -> None:
    lower = {b"d2f/x": File(b"x"), b"d2f/y/z": File(), b"f2d": File(b"f"), b"after": File()}
    upper = {b"d2f": File(b"now a file"), b"f2d/in": File(b"in"), b"after": File()}
    # No whiteout for the replaced directory nor anything under it.
    assert changes(pair, lower, upper) == [(M, b"d2f"), (M, b"f2d"), (A, b"f2d/in")]


def test_type_changes(pair: Pair) -> None:
    lower = {b"a": File(b"x"), b"b": Symlink(b"x"), b"c": Fifo()}
    upper = {b"a": Symlink(b"x"), b"b": File(b"x"), b"c": File()}
    assert changes(pair, lower, upper) == [(M, b"a"), (M, b"b"), (M, b"c")]


def test_opaque_replacement(pair: Pair) -> None:
    """A directory deleted and recreated: per-entry changes, whiteouts where the name sorts."""
    lower = {b"o/x/y": File(b"y"), b"o/x/z": File(b"z1"), b"o/x/keep": File(b"k")}
    upper = {
        b"o/x/": Dir(mtime_ns=t(9)),
        b"o/x/new": File(b"n"),
        b"o/x/z": File(b"z2"),
        b"o/x/keep": File(b"k"),
    }
    assert changes(pair, lower, upper) == [(A, b"o/x/new"), (D, b"o/x/y"), (M, b"o/x/z")]


def test_hardlinks(pair: Pair) -> None:
    lower = {
        b"h1": File(b"h", mtime_ns=t(1, 1)),
        b"h2": Hardlink(b"h1"),
        b"u1": File(b"u", mtime_ns=t(1, 1)),
        b"u2": Hardlink(b"u1"),
    }
    upper = {**lower, b"h3": Hardlink(b"h1"), b"n1": File(b"n"), b"n2": Hardlink(b"n1")}
    # Unchanged but hardlinked peers are reported as Unmodified (the tar needs them).
    assert changes(pair, lower, upper) == [
        (U, b"h1"),
        (U, b"h2"),
        (A, b"h3"),
        (A, b"n1"),
        (A, b"n2"),
        (U, b"u1"),
        (U, b"u2"),
    ]


def test_symlinks_compare_targets(pair: Pair) -> None:
    lower = {b"chg": Symlink(b"aaa"), b"same": Symlink(b"same"), b"ns": Symlink(b"x", mtime_ns=t(0, 1))}
    upper = {
        b"chg": Symlink(b"bbb"),
        b"same": Symlink(b"same"),
        b"ns": Symlink(b"y", mtime_ns=t(0, 1)),  # same length, equal nanoseconds: not read
        b"out": Symlink(b"/etc/shadow"),
    }
    assert changes(pair, lower, upper) == [(M, b"chg"), (A, b"out")]


@needs_root
def test_special_files(pair: Pair) -> None:
    lower = {b"c": Device("c", 1, 3), b"b": Device("b", 7, 0), b"p": Fifo(), b"s": Socket()}
    upper = {
        b"c": Device("c", 1, 5),
        b"b": Device("b", 7, 0),
        b"p": Fifo(),
        b"s": Socket(),
        b"s2": Socket(),
        b"newc": Device("c", 10, 200),
    }
    # Sockets are walked like anything else (the tar writer drops them).
    assert changes(pair, lower, upper) == [(M, b"c"), (A, b"newc"), (A, b"s2")]


def test_long_names_and_deep_paths(pair: Pair) -> None:
    long = b"n" * 255
    deep = b"/".join([b"d" * 200] * 6)
    got = changes(pair, {}, {long: File(), deep + b"/f": File()})
    assert got[-1] == (A, long)
    assert (A, deep + b"/f") in got
    assert len(deep) > 255


def test_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    depth = 1100  # more levels than Python's default recursion limit
    root = tmp_path / "deep"
    root.mkdir()
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):  # os.makedirs and shutil.rmtree recurse: build with fds
            os.mkdir("d", dir_fd=fds[-1])
            fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fds[-1]))
        with open_snapshot(root) as up:
            got = list(diff(None, up))
        assert len(got) == depth + 1
        assert got[-1].path == b"d/" * depth + b"leaf"
    finally:
        os.unlink("leaf", dir_fd=fds[-1])
        for i in range(len(fds) - 1, 0, -1):
            os.close(fds[i])
            os.rmdir("d", dir_fd=fds[i - 1])
        os.close(fds[0])


def test_change_carries_upper_stat(pair: Pair) -> None:
    lo, up = pair(({b"f": File(b"a")}, {b"f": File(b"abc", mode=0o600)}))
    (ch,) = list(diff(lo, up))
    assert ch.st is not None and stat.S_IMODE(ch.st.st_mode) == 0o600 and ch.st.st_size == 3


@pytest.mark.parametrize("swap", [False, True])
def test_kitchen_sink_is_deterministic(pair: Pair, swap: bool) -> None:
    lower, upper = fsgen.kitchen_sink()
    lo, up = pair((upper, lower) if swap else (lower, upper))
    first = kinds(list(diff(lo, up)))
    assert first == kinds(list(diff(lo, up)))
    assert first  # a real change set
    paths = [p for _, p in first]
    assert len(paths) == len(set(paths))
