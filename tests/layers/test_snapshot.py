"""Snapshot confinement: opening, listing, reading, never following a symlink or leaving the root."""

from __future__ import annotations

import os
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path

import fsgen
import pytest
import services
from conftest import needs_root
from fsgen import Dir, Fifo, File, Symlink

from blobchain.layers import snapshot as snapmod
from blobchain.layers.errors import (
    FileChanged,
    InvalidArgument,
    PathEscapes,
    SnapshotNotFound,
    SnapshotOutsideRoots,
    UnreadableFile,
)
from blobchain.layers.snapshot import Snapshot, open_snapshot


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with openat2 and again with the component-by-component fallback."""
    if request.param == "openat2":
        if not snapmod.use_openat2:
            services.missing("openat2 is not available on this kernel")
    else:
        monkeypatch.setattr(snapmod, "use_openat2", False)
    return str(request.param)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Snapshot]]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = fsgen.build(
        tmp_path / "root",
        {
            b"d/": Dir(),
            b"d/f": File(b"inside"),
            b"d/sub/g": File(b"deeper"),
            b"esc": Symlink(str(outside).encode()),  # a directory symlink pointing outside
            b"esc-file": Symlink(str(outside / "secret").encode()),
            b"inner": Symlink(b"d"),  # a directory symlink pointing inside
            b"dotdot": Symlink(b"../outside/secret"),
            b"fifo": Fifo(),
        },
    )
    with open_snapshot(root) as snap:
        yield root, snap


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


# --- open_snapshot ------------------------------------------------------------------------------


def test_missing_snapshot(tmp_path: Path) -> None:
    with pytest.raises(SnapshotNotFound):
        open_snapshot(tmp_path / "nope")


def test_file_is_not_a_snapshot(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(SnapshotNotFound):
        open_snapshot(tmp_path / "f")


def test_roots_confine_snapshots(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "snap").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "allowedness").mkdir()  # shares a string prefix with "allowed"
    with open_snapshot(allowed / "snap", roots=[str(allowed)]) as s:
        assert s.root == os.fsencode(os.path.realpath(allowed / "snap"))
    with open_snapshot(allowed, roots=[str(allowed)]):
        pass
    for bad in (tmp_path / "other", tmp_path / "allowedness"):
        with pytest.raises(SnapshotOutsideRoots):
            open_snapshot(bad, roots=[str(allowed)])


def test_roots_use_realpath(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "other").mkdir()
    # A symlink inside the allowed root that points elsewhere does not make its target allowed.
    (allowed / "link").symlink_to(tmp_path / "other")
    with pytest.raises(SnapshotOutsideRoots):
        open_snapshot(allowed / "link", roots=[str(allowed)])
    # ...and a symlinked root is compared by where it really is.
    (tmp_path / "alias").symlink_to(allowed)
    (allowed / "snap").mkdir()
    with open_snapshot(tmp_path / "alias" / "snap", roots=[str(allowed)]) as s:
        assert s.root == os.fsencode(os.path.realpath(allowed / "snap"))


def test_snapshot_accepts_str_bytes_and_pathlike(tmp_path: Path) -> None:
    for p in (str(tmp_path), os.fsencode(tmp_path), tmp_path):
        with open_snapshot(p) as s:
            assert s.lstat(b"").st_ino == os.stat(tmp_path).st_ino


def test_pickles_by_path(tree: tuple[Path, Snapshot]) -> None:
    _, snap = tree
    clone = pickle.loads(pickle.dumps(snap))
    try:
        assert clone.root == snap.root
        assert clone.fd != snap.fd
        assert _read(clone.open_file(b"d/f")) == b"inside"
    finally:
        clone.close()


# --- listing and reading ------------------------------------------------------------------------


def test_scandir_sorted_by_raw_bytes_and_lstat(tmp_path: Path) -> None:
    names = [b"b", b"a-b", b"a", b"a.b", "ü".encode(), b"\xff\xfe", b"Z", b"a\x80"]
    for n in names:
        (tmp_path / os.fsdecode(n)).write_bytes(b"x")
    (tmp_path / "lnk").symlink_to("/etc")
    with open_snapshot(tmp_path) as s:
        listing = s.scandir(b"")
    got = [n for n, _ in listing]
    assert got == sorted([*names, b"lnk"])
    assert all(isinstance(n, bytes) for n in got)
    st = dict(listing)[b"lnk"]
    assert stat.S_ISLNK(st.st_mode)  # lstat: never followed


def test_readlink_outside_target_is_raw(tree: tuple[Path, Snapshot], resolver: str) -> None:
    root, snap = tree
    assert snap.readlink(b"dotdot") == b"../outside/secret"
    assert snap.readlink(b"esc-file") == os.fsencode(root.parent / "outside" / "secret")
    assert stat.S_ISLNK(snap.lstat(b"esc").st_mode)


def test_open_file_reads_inside(tree: tuple[Path, Snapshot], resolver: str) -> None:
    _, snap = tree
    assert _read(snap.open_file(b"d/f")) == b"inside"
    assert _read(snap.open_file(b"d/sub/g")) == b"deeper"


@pytest.mark.parametrize(
    "rel",
    [b"esc/secret", b"esc-file", b"dotdot", b"inner/f", b"esc", b"inner/sub/g"],
)
def test_open_file_never_follows_symlinks(tree: tuple[Path, Snapshot], resolver: str, rel: bytes) -> None:
    _, snap = tree
    with pytest.raises(PathEscapes):
        snap.open_file(rel)


@pytest.mark.parametrize("rel", [b"../outside/secret", b"d/../../outside/secret", b"/etc/passwd", b"d/.."])
def test_dotdot_and_absolute_paths_escape(tree: tuple[Path, Snapshot], rel: bytes) -> None:
    _, snap = tree
    with pytest.raises(PathEscapes):
        snap.open_file(rel)
    with pytest.raises(PathEscapes):
        snap.lstat(rel)


@pytest.mark.parametrize("rel", [b"d//f", b"d/./f", b"d/f/", b"."])
def test_unclean_paths_are_rejected(tree: tuple[Path, Snapshot], rel: bytes) -> None:
    _, snap = tree
    with pytest.raises(InvalidArgument):
        snap.open_file(rel)


def test_scandir_and_lstat_refuse_symlinked_dirs(tree: tuple[Path, Snapshot], resolver: str) -> None:
    _, snap = tree
    with pytest.raises(PathEscapes):
        snap.scandir(b"esc")
    with pytest.raises(PathEscapes):
        snap.lstat(b"esc/secret")
    with pytest.raises(PathEscapes):
        snap.lstat(b"inner/f")  # even when the link stays inside


def test_vanished_file_is_file_changed(tree: tuple[Path, Snapshot], resolver: str) -> None:
    root, snap = tree
    (root / "d" / "f").unlink()
    with pytest.raises(FileChanged):
        snap.open_file(b"d/f")
    with pytest.raises(FileChanged):
        snap.open_file(b"gone/f")


def test_open_fifo_does_not_block(tree: tuple[Path, Snapshot], resolver: str) -> None:
    _, snap = tree
    fd = snap.open_file(b"fifo")
    try:
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


@needs_root
def test_capability_and_xattrs(tmp_path: Path) -> None:
    root = fsgen.build(
        tmp_path / "r",
        {
            b"cap": File(b"x", xattrs=((b"security.capability", fsgen.CAP_NET_RAW),)),
            b"plain": File(b"x"),
            b"lnk": Symlink(b"cap"),
            b"d/": Dir(xattrs=((b"trusted.overlay.opaque", b"y"),)),
        },
    )
    with open_snapshot(root) as s:
        assert s.capability(b"cap") == fsgen.CAP_NET_RAW
        assert s.capability(b"plain") is None
        assert s.capability(b"lnk") is None  # the link itself, not its target
        assert s.xattr(b"d", b"trusted.overlay.opaque") == b"y"
        assert s.xattr(b"d", "user.nothing") is None
        with pytest.raises(FileChanged):
            s.capability(b"missing")


def _user_xattr(path: Path, value: bytes) -> None:
    try:
        os.setxattr(path, "user.blobchain", value)
    except OSError as e:  # e.g. a tmpfs without user xattrs
        services.missing(f"no user xattrs here: {e}")


def test_xattrs_read_under_a_pinned_parent(tmp_path: Path) -> None:
    root = fsgen.build(
        tmp_path / "r", {b"d/a": File(b"a"), b"d/b": File(b"b"), b"e/c": File(b"c"), b"top": File(b"t")}
    )
    for rel, value in ((b"d/a", b"1"), (b"d/b", b"2"), (b"e/c", b"3"), (b"top", b"4")):
        _user_xattr(root / os.fsdecode(rel), value)
    fds = len(os.listdir("/proc/self/fd"))
    with open_snapshot(root) as s:
        got = [s.xattr(rel, "user.blobchain") for rel in (b"d/a", b"d/b", b"e/c", b"d/a", b"top")]
        assert got == [b"1", b"2", b"3", b"1", b"4"]
        assert s.xattr(b"d", "user.blobchain") is None
    assert len(os.listdir("/proc/self/fd")) == fds  # the cached parent descriptor is closed too


def test_a_parent_swapped_for_a_symlink_never_brings_in_an_outside_xattr(tmp_path: Path) -> None:
    """A parent replaced by a symlink to outside the root after the walk saw it: a path lookup
    would read the outside file's xattr; the pinned re-read refuses it."""
    root = fsgen.build(tmp_path / "r", {b"d/f": File(b"inside")})
    outside = fsgen.build(tmp_path / "outside", {b"f": File(b"outside")})
    _user_xattr(outside / "f", b"secret")
    with open_snapshot(root) as s:
        assert s.xattr(b"d/f", "user.blobchain") is None
        os.rename(root / "d", tmp_path / "d-moved")
        os.symlink(outside, root / "d")
        with pytest.raises(PathEscapes):
            s.xattr(b"d/f", "user.blobchain")


@needs_root
def test_unreadable_file(tmp_path: Path, resolver: str) -> None:
    """EACCES (for an unprivileged user) becomes UnreadableFile."""
    tmp_path.chmod(0o755)
    (tmp_path / "secret").write_bytes(b"no")
    (tmp_path / "secret").chmod(0o600)
    with open_snapshot(tmp_path) as snap:
        pid = os.fork()
        if pid == 0:  # child: drop to nobody, try, report through the exit code
            code = 3
            try:
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                snap.open_file(b"secret")
            except UnreadableFile:
                code = 0
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_walk_fallback_matches_openat2(tree: tuple[Path, Snapshot], monkeypatch: pytest.MonkeyPatch) -> None:
    _, snap = tree
    with_openat2 = [snap.scandir(b"d"), _read(snap.open_file(b"d/sub/g"))]
    monkeypatch.setattr(snapmod, "use_openat2", False)
    assert [snap.scandir(b"d"), _read(snap.open_file(b"d/sub/g"))] == with_openat2


def test_a_component_swapped_while_opening_is_caught_by_where_the_fd_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The roots are checked on realpath()'s string; a component swapped for a symlink right
    after it would make stat() and open() land outside. The descriptor's real location decides."""
    roots = tmp_path / "roots"
    (roots / "a" / "snap").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "snap").mkdir(parents=True)
    real_stat = os.stat
    swapped = []

    def stat_after_swap(p, *a, **kw):  # type: ignore[no-untyped-def]
        if not swapped and os.fsencode(p).endswith(b"/a/snap"):
            swapped.append(True)
            os.rename(roots / "a", tmp_path / "a-moved")
            os.symlink(outside, roots / "a")
        return real_stat(p, *a, **kw)

    monkeypatch.setattr(os, "stat", stat_after_swap)
    with pytest.raises(SnapshotOutsideRoots, match="while being opened"):
        open_snapshot(roots / "a" / "snap", roots=[str(roots)])
    assert swapped
