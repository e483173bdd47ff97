"""The optional C helpers (``blobchain.layers._speedups``) against the pure-Python reference.

Every layer byte must be the same whichever path runs: the property builds hypothesis chains
(long, non-ASCII and non-UTF-8 names, capabilities, hardlinks, devices, big ids) and writes
each layer with the helpers on and off; header fields are compared one by one on generated
entries; the body reader's anomalies must end in the Python path's named errors. Under CI the
extension must have been built (a fresh clone's ``pip install -e`` compiles it).
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsgen
import pytest
import services
from fschains import Model, chains
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobchain.layers import baselayer, native
from blobchain.layers.baselayer import native_base_layer, write_base_tar
from blobchain.layers.changes import diff, same_file
from blobchain.layers.entries import tar_entries
from blobchain.layers.errors import BlobchainError, FileChanged, PathEscapes
from blobchain.layers.snapshot import Snapshot, open_snapshot
from blobchain.layers.tarentry import TYPE_REG, TarEntry
from blobchain.layers.tarheader import encode_header
from blobchain.layers.tarwriter import write_tar

lib = native.available
# A missing extension skips locally (the install warns and goes on without a compiler) and fails
# under CI, where a fresh clone's `pip install -e` must have compiled it.
needs_lib = services.needs(
    lib is not None, "the C extension blobchain.layers._speedups is not built (no C compiler at install)"
)


_LIB_AT_IMPORT = native.lib


@pytest.fixture(autouse=True)
def native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests compare the two paths, so the helpers are on whatever BLOBCHAIN_PURE_PYTHON
    says (under it the rest of the suite runs pure; this file used to fail there)."""
    monkeypatch.setattr(native, "lib", native.available)


@pytest.fixture
def pure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(native, "lib", None)
    yield


@needs_lib
def test_extension_is_switched_on() -> None:
    """Built means used, unless BLOBCHAIN_PURE_PYTHON asks for the reference path."""
    pure_asked = os.environ.get("BLOBCHAIN_PURE_PYTHON", "") not in ("", "0")
    assert _LIB_AT_IMPORT is (None if pure_asked else native.available)


def _layer(lower: Path | None, upper: Path, use_native: bool) -> bytes:
    saved = native.lib
    native.lib = native.available if use_native else None
    try:
        buf = io.BytesIO()
        with open_snapshot(upper) as up:
            if lower is None:
                write_tar(tar_entries(diff(None, up), up), up, buf.write)
            else:
                with open_snapshot(lower) as low:
                    write_tar(tar_entries(diff(low, up), up), up, buf.write)
        return buf.getvalue()
    finally:
        native.lib = saved


def _base(upper: Path, sde: int | None = None) -> bytes:
    """The fused base-layer writer (native)."""
    buf = io.BytesIO()
    with open_snapshot(upper) as up:
        assert native_base_layer(up)
        n = write_base_tar(up, buf.write, source_date_epoch=sde)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def _reference(upper: Path, sde: int | None = None) -> bytes:
    """The pure-Python reference for the same base layer."""
    saved = native.lib
    native.lib = None
    try:
        buf = io.BytesIO()
        with open_snapshot(upper) as up:
            write_tar(tar_entries(diff(None, up), up, source_date_epoch=sde), up, buf.write)
        return buf.getvalue()
    finally:
        native.lib = saved


# --- whole layers ------------------------------------------------------------------------------


@needs_lib
@services.needs_root("chown, mknod and capabilities")
@settings(
    max_examples=int(os.environ.get("BLOBCHAIN_NATIVE_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
@given(chains(), st.sampled_from([None, 0, 1, 1_700_000_000, 4_000_000_000]))
def test_layers_equal_with_and_without_native(states: list[Model], sde: int | None) -> None:
    with tempfile.TemporaryDirectory(prefix="bc-native-") as work:
        dirs = [fsgen.build(Path(work) / f"s{i}", m.spec()) for i, m in enumerate(states)]
        for i, d in enumerate(dirs):
            lower = dirs[i - 1] if i else None
            assert _layer(lower, d, True) == _layer(lower, d, False)
            # every state as a base layer, through the fused writer
            assert _base(d, sde) == _reference(d, sde)


@needs_lib
@services.needs_root("chown, mknod and capabilities")
@pytest.mark.parametrize("name", sorted(fsgen.PAIRS))
def test_parity_pairs_equal_with_and_without_native(tmp_path: Path, name: str, xattr_mode: bool) -> None:
    lower, upper = fsgen.build_pair(tmp_path, fsgen.PAIRS[name])
    assert _layer(lower, upper, True) == _layer(lower, upper, False)
    assert _layer(None, upper, True) == _layer(None, upper, False)
    assert _base(upper) == _reference(upper)
    assert _base(lower) == _reference(lower)


@needs_lib
@services.needs_root("chown, mknod and capabilities")
def test_kitchen_sink_equal_with_and_without_native(tmp_path: Path, xattr_mode: bool) -> None:
    lower, upper = fsgen.build_pair(tmp_path, fsgen.kitchen_sink())
    assert _layer(lower, upper, True) == _layer(lower, upper, False)
    assert _layer(None, upper, True) == _layer(None, upper, False)
    for tree in (lower, upper):
        for sde in (None, 0, 1_000_000_000):
            assert _base(tree, sde) == _reference(tree, sde)


# --- headers -----------------------------------------------------------------------------------

_NAMES = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.lists(
        st.sampled_from([b"a", b"bb", b"c" * 50, b"d" * 99, b"e" * 101, "ü".encode(), b"\xff"]),
        min_size=1,
        max_size=6,
    ).map(b"/".join),
    st.lists(st.sampled_from([b"x", b"y" * 40, b"z" * 100]), min_size=1, max_size=5).map(
        lambda p: b"/".join(p) + b"/"
    ),
)
_INTS = st.one_of(
    st.integers(0, 4096),
    st.sampled_from([0, (1 << 21) - 1, 1 << 21, (1 << 33) - 1, 1 << 33, -1, 1 << 64, -(1 << 63)]),
    st.integers(-(1 << 70), 1 << 70),
)


@needs_lib
@settings(max_examples=3000, deadline=None)
@given(
    name=_NAMES,
    typeflag=st.sampled_from(
        [b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"x", b"g", b"L", b"\0", b"00", b""]
    ),
    link=st.one_of(st.just(b""), st.binary(max_size=120)),
    mode=_INTS,
    uid=_INTS,
    gid=_INTS,
    size=_INTS,
    mtime=_INTS,
    devmajor=_INTS,
    devminor=_INTS,
    pax=st.one_of(
        st.just({}),
        st.dictionaries(
            st.sampled_from(["SCHILY.xattr.security.capability", "path"]), st.binary(max_size=8), max_size=1
        ),
    ),
)
def test_header_equal_with_and_without_native(
    name: bytes, typeflag: bytes, link: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
    devmajor: int, devminor: int, pax: dict[str, bytes],
) -> None:  # fmt: skip
    e = TarEntry(name, typeflag, mode, uid, gid, size, mtime, link, devmajor, devminor, dict(pax))

    def run(use_native: bool) -> bytes | tuple[type[BaseException], str]:
        saved = native.lib
        native.lib = native.available if use_native else None
        try:
            return encode_header(e)
        except (BlobchainError, ValueError, OverflowError) as err:
            return type(err), str(err)
        finally:
            native.lib = saved

    assert run(True) == run(False)


@needs_lib
def test_native_header_is_the_ustar_block() -> None:
    assert lib is not None
    block = lib.ustar_header(b"d/f", 0o644, 1000, 1000, 5, 1_700_000_000, b"0", b"", 0, 0)
    assert (
        block == encode_header(TarEntry(b"d/f", TYPE_REG, 0o644, 1000, 1000, 5, 1_700_000_000))
        or block is None
    )
    assert block is not None and len(block) == 512
    # Not the fast path: the Python encoder decides.
    assert lib.ustar_header("str", 0, 0, 0, 0, 0, b"0", b"", 0, 0) is None
    assert lib.ustar_header(b"n\xff", 0, 0, 0, 0, 0, b"0", b"", 0, 0) is None
    assert lib.ustar_header(b"n", 0, 1 << 21, 0, 0, 0, b"0", b"", 0, 0) is None
    assert lib.ustar_header(b"n", 0, 0, 0, 0, 1 << 100, b"0", b"", 0, 0) is None


# --- bodies ------------------------------------------------------------------------------------


def _entry(snap: Snapshot, rel: bytes) -> TarEntry:
    st_ = snap.lstat(rel)
    return TarEntry(
        rel,
        TYPE_REG,
        0o644,
        0,
        0,
        st_.st_size,
        0,
        source=rel,
        ino=st_.st_ino,
        dev=st_.st_dev,
        mtime_ns=st_.st_mtime_ns,
    )


@needs_lib
def test_read_body_matches_the_python_path(tmp_path: Path) -> None:
    for size in (1, 511, 512, 513, 4096, 100_000, (1 << 19) - 1):
        (tmp_path / f"f{size}").write_bytes(os.urandom(size))
    with open_snapshot(tmp_path) as snap:
        entries = [_entry(snap, b"f%d" % size) for size in (1, 511, 512, 513, 4096, 100_000, (1 << 19) - 1)]
        outs = []
        for use_native in (True, False):
            saved = native.lib
            native.lib = native.available if use_native else None
            try:
                buf = io.BytesIO()
                write_tar(entries, snap, buf.write)
                outs.append(buf.getvalue())
            finally:
                native.lib = saved
        assert outs[0] == outs[1]


@needs_lib
def test_read_body_declines_every_anomaly(tmp_path: Path) -> None:
    """None (so the Python path re-reads and raises) for a changed, missing, escaping or
    unclean path; a body only for the walked file."""
    assert lib is not None
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"hello")
    os.symlink("/etc", tmp_path / "link")
    with open_snapshot(tmp_path) as snap:
        st_ = snap.lstat(b"d/f")
        ok = (st_.st_ino, st_.st_dev, st_.st_mtime_ns)
        assert lib.read_body(snap.fd, b"d/f", 5, *ok, b"H") == b"Hhello" + bytes(507)
        assert lib.read_body(snap.fd, b"d/f", 6, *ok, b"") is None  # size differs
        assert lib.read_body(snap.fd, b"d/f", 5, st_.st_ino + 1, st_.st_dev, st_.st_mtime_ns, b"") is None
        assert lib.read_body(snap.fd, b"d/f", 5, st_.st_ino, st_.st_dev, st_.st_mtime_ns + 1, b"") is None
        assert lib.read_body(snap.fd, b"d/f", 5, 0, 0, 0, b"") is not None  # 0 = not recorded
        for rel in (
            b"d/nope",
            b"link/passwd",
            b"../etc/passwd",
            b"d//f",
            b"./d/f",
            b"d/",
            b"/d/f",
            b"d",
            b"",
        ):
            assert lib.read_body(snap.fd, rel, 5, 0, 0, 0, b"") is None, rel


@needs_lib
@pytest.mark.parametrize("use_native", [True, False])
def test_changed_file_raises_the_same_error(tmp_path: Path, use_native: bool) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    with open_snapshot(tmp_path) as snap:
        e = _entry(snap, b"f")
        (tmp_path / "f").write_bytes(b"HELLO!")
        saved = native.lib
        native.lib = native.available if use_native else None
        try:
            with pytest.raises(FileChanged, match="size 6 != 5"):
                write_tar([e], snap, io.BytesIO().write)
        finally:
            native.lib = saved


# --- xattrs ------------------------------------------------------------------------------------


@needs_lib
def test_lgetxattr(tmp_path: Path) -> None:
    assert lib is not None
    f = tmp_path / "f"
    f.write_bytes(b"")
    p = os.fsencode(f)
    assert lib.lgetxattr(p, b"user.nope") is None
    try:
        os.setxattr(p, b"user.small", b"v")
        os.setxattr(p, b"user.big", b"x" * 3000)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        pytest.skip("no user xattrs on this filesystem")
    assert lib.lgetxattr(p, b"user.small") == b"v"
    assert lib.lgetxattr(p, b"user.big") == b"x" * 3000
    with pytest.raises(FileNotFoundError) as info:
        lib.lgetxattr(p + b"-missing", b"user.small")
    assert info.value.errno == errno.ENOENT and info.value.filename == p + b"-missing"
    with pytest.raises(ValueError):
        lib.lgetxattr(p + b"\0x", b"user.small")


def test_pure_python_switch_still_writes_layers(tmp_path: Path, pure: None) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    with open_snapshot(tmp_path) as snap:
        buf = io.BytesIO()
        write_tar(tar_entries(diff(None, snap), snap), snap, buf.write)
    assert native.lib is None
    assert buf.getvalue()[:1] == b"a"


# --- listings ----------------------------------------------------------------------------------

_STAT_FIELDS = [f for f in dir(os.lstat("/")) if f.startswith("st_")]


@needs_lib
def test_scandir_equals_the_python_listing(tmp_path: Path) -> None:
    """Names in raw byte order and every stat_result field (not just the tuple part) as
    ``os.lstat`` gives them, for every file type and odd names."""
    assert lib is not None
    base = os.fsencode(tmp_path)
    for name in (b"b", b"a", b"\xff\xfe", "ü".encode(), b"a-b", b"a.b", b"A", b"n" * 255, b" sp"):
        with open(base + b"/" + name, "wb") as f:
            f.write(name)
    os.mkdir(base + b"/dir")
    os.symlink(b"../nowhere", base + b"/link")
    os.mkfifo(base + b"/fifo")
    os.utime(base + b"/a", ns=(-1_500_000_001, -2))  # before 1970, negative nanoseconds
    if os.geteuid() == 0:
        os.mknod(base + b"/dev", 0o600 | 0o020000, os.makedev(1, 3))
        os.chown(base + b"/b", 4_000_000_000, 65534)
    with open_snapshot(tmp_path) as snap:
        got = lib.scandir(snap.fd)
        saved = native.lib
        native.lib = None
        try:
            want = snap.scandir()
        finally:
            native.lib = saved
    assert got is not None
    assert [n for n, _ in got] == [n for n, _ in want] == sorted(n for n, _ in want)
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert type(a) is os.stat_result
        assert {f: getattr(a, f) for f in _STAT_FIELDS} == {f: getattr(b, f) for f in _STAT_FIELDS}
        assert tuple(a) == tuple(b)


@needs_lib
def test_scandir_declines_a_bad_descriptor(tmp_path: Path) -> None:
    assert lib is not None
    f = tmp_path / "f"
    f.write_bytes(b"")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert lib.scandir(fd) is None  # not a directory
    finally:
        os.close(fd)
    assert lib.scandir(-1) is None
    assert lib.scandir(1 << 40) is None


# --- the fused base-layer writer ----------------------------------------------------------------


@needs_lib
def test_base_layer_of_a_deep_wide_tree(tmp_path: Path) -> None:
    """Several size-limited batches per directory, deep pre-order, long names (USTAR prefix
    split and PAX), empty and 512-multiple bodies, a body over the native limit, a hardlink
    pair and a symlink between native entries, pre-1970 mtimes."""
    base = tmp_path / "t"
    d = base
    for depth in range(6):
        d = d / (f"dir{depth}-" + "x" * 40)
        d.mkdir(parents=True)
        for k in range(30):
            (d / f"f{k:03d}").write_bytes(os.urandom(k * 100_003 % 70_000))
    (base / "big").write_bytes(os.urandom((1 << 19) + 1))
    (base / "exact").write_bytes(b"e" * 1024)
    (base / "empty").write_bytes(b"")
    os.link(base / "exact", base / "hl")
    os.symlink("exact", base / "sym")
    (base / ("n" * 120)).write_bytes(b"long")
    os.utime(base / "empty", ns=(-5_000_000_001, -5_000_000_001))
    for sde in (None, 10, 1_700_000_000):
        assert _base(base, sde) == _reference(base, sde)


@needs_lib
def test_base_layer_progress_and_count(tmp_path: Path) -> None:
    for k in range(200):
        (tmp_path / f"f{k}").write_bytes(b"x" * k)
    calls: list[tuple[int, int]] = []
    buf = io.BytesIO()
    with open_snapshot(tmp_path) as up:
        n = write_base_tar(up, buf.write, lambda a, b: calls.append((a, b)))
    assert calls[-1] == (200, n) == (200, len(buf.getvalue()))
    assert all(a <= b for (a, _), (b, _) in itertools.pairwise(calls))


@needs_lib
@pytest.mark.parametrize("kind", ["listing", "scandir"])
def test_base_layer_changed_file_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A file that changes between the listing and its read: the Python path's FileChanged
    (from a C Listing, and from the scandir list that stands in when the Listing fails)."""
    (tmp_path / "f").write_bytes(b"hello")
    with open_snapshot(tmp_path) as up:
        listing = up.listing(b"") if kind == "listing" else up.scandir(b"")
        (tmp_path / "f").write_bytes(b"HELLO!")
        monkeypatch.setattr(Snapshot, "listing", lambda self, rel=b"": listing)
        with pytest.raises(FileChanged):
            write_base_tar(up, io.BytesIO().write)


# --- Listing, getxattrat and its fallback, the double walk's native skip -------------------------

_CAP = bytes.fromhex("0100000200100000000000000000000000000000")  # cap_net_bind_service, v2


@pytest.fixture(params=[True, False], ids=["getxattrat", "path-lgetxattr"])
def xattr_mode(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Both capability lookups the helpers have: getxattrat(2) beneath the listed directory, and
    the path lgetxattr they fall back to on kernels before 6.13 (ENOSYS)."""
    assert lib is not None
    was = lib.set_getxattrat(request.param)
    try:
        yield request.param
    finally:
        lib.set_getxattrat(was)


@needs_lib
def test_listing_is_scandir_kept_in_c(tmp_path: Path) -> None:
    assert lib is not None
    for name in (b"b", b"a", b"\xff", b"dir"):
        (tmp_path / os.fsdecode(name)).write_bytes(name)
    os.symlink(b"nowhere", tmp_path / "link")
    with open_snapshot(tmp_path) as snap:
        got = snap.listing(b"")
        want = snap.scandir(b"")
        assert type(got) is lib.Listing
        assert len(got) == len(want) == 5
        assert [got[i] for i in range(len(got))] == want
        assert got[-1] == want[-1] and got[0] is got[0]  # built once, then kept
        for (_, a), (_, b) in zip([got[i] for i in range(5)], want, strict=True):
            assert {f: getattr(a, f) for f in _STAT_FIELDS} == {f: getattr(b, f) for f in _STAT_FIELDS}
        with pytest.raises(IndexError):
            got[5]
        assert lib.listing(-1) is None
        saved = native.lib
        native.lib = None
        try:
            assert snap.listing(b"") == want  # pure Python: the scandir list
        finally:
            native.lib = saved


@needs_lib
def test_listing_at_opens_beneath_the_root_and_lists_as_listing(tmp_path: Path) -> None:
    """``listing_at(rootfd, rel)`` is ``listing`` of ``rel`` opened beneath the root; anything
    it must not open (a symlink in the way, '..', a missing or non-directory path) is None, and
    Snapshot.listing then raises the named error as before."""
    assert lib is not None
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    for name in ("z", "y"):
        (root / "a" / "b" / name).write_bytes(name.encode())
    (root / "file").write_bytes(b"f")
    os.symlink("a", root / "via-link")
    os.symlink(str(tmp_path), root / "out")
    with open_snapshot(root) as snap:
        fd = snap.open_dir(b"a/b")
        try:
            want = lib.listing(fd)
        finally:
            os.close(fd)
        got = lib.listing_at(snap.fd, b"a/b")
        assert want is not None and got is not None
        assert [got[i] for i in range(len(got))] == [want[i] for i in range(len(want))] == snap.scandir(b"a/b")
        root_listing = lib.listing_at(snap.fd, b"")
        assert root_listing is not None and [root_listing[i][0] for i in range(len(root_listing))] == [
            b"a", b"file", b"out", b"via-link"
        ]
        assert len(lib.listing_at(snap.fd, b"")) == 4  # the root descriptor's offset was kept
        for rel in (b"via-link", b"via-link/b", b"out", b"a/../a", b"missing", b"file", b"/a", b"a/"):
            assert lib.listing_at(snap.fd, rel) is None, rel
        with pytest.raises(PathEscapes):
            snap.listing(b"via-link/b")
        with pytest.raises(NotADirectoryError):
            snap.listing(b"file")


@needs_lib
def test_set_getxattrat_switch(tmp_path: Path) -> None:
    assert lib is not None
    was = lib.set_getxattrat(False)
    try:
        assert lib.set_getxattrat(True) is False
        assert lib.set_getxattrat(True) is True
    finally:
        lib.set_getxattrat(was)


@needs_lib
def test_no_getxattrat_env_switches_the_fallback_on() -> None:
    """BLOBCHAIN_NO_GETXATTRAT=1 (how CI forces the pre-6.13 path) turns getxattrat off."""
    import subprocess
    import sys

    code = "from blobchain.layers import native; print(native.available.set_getxattrat(True))"
    for value, want in (("1", "False"), ("", "True")):
        env = dict(os.environ, BLOBCHAIN_NO_GETXATTRAT=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        assert out.stdout.strip() == want


def _capability_tree(base: Path) -> Path:
    """Capabilities on directories, empty files and files with bodies, next to plain ones."""
    base.mkdir()
    for d in ("d1", "d2", "d3"):
        (base / d).mkdir()
        for k in range(6):
            (base / d / f"f{k}").write_bytes(b"x" * k)
    (base / "top").write_bytes(b"top")
    for rel in ("d1/f0", "d1/f3", "d2", "top"):
        os.setxattr(base / rel, "security.capability", _CAP)
    return base


@needs_lib
@services.needs_root("capabilities")
def test_base_layer_capabilities_in_both_xattr_modes(tmp_path: Path, xattr_mode: bool) -> None:
    tree = _capability_tree(tmp_path / "t")
    got = _base(tree)
    assert got == _reference(tree)
    assert got.count(b"SCHILY.xattr.security.capability") == 4


@needs_lib
@services.needs_root("capabilities")
def test_diff_capabilities_in_both_xattr_modes(tmp_path: Path, xattr_mode: bool) -> None:
    """A capability added, removed or kept on otherwise identical files (whole-second and
    nanosecond mtimes): the native skip must not pass a pair whose capabilities differ."""
    lower = _capability_tree(tmp_path / "lo")
    subprocess_copy(lower, tmp_path / "up")
    upper = tmp_path / "up"
    os.removexattr(upper / "d1" / "f3", "security.capability")
    os.setxattr(upper / "d3" / "f2", "security.capability", _CAP)
    os.setxattr(lower / "d3" / "f4", "security.capability", _CAP)
    os.setxattr(upper / "d3" / "f4", "security.capability", _CAP)
    got = _layer(lower, upper, True)
    assert got == _layer(lower, upper, False)
    names = _tar_names(got)
    assert b"d1/f3" in names and b"d3/f2" in names
    assert b"d3/f4" not in names and b"d1/f0" not in names


def subprocess_copy(src: Path, dst: Path) -> None:
    """cp -a: a separate tree (other inodes) with the same metadata, xattrs included."""
    import subprocess

    subprocess.run(["cp", "-a", "--reflink=never", str(src), str(dst)], check=True)


def _tar_names(data: bytes) -> list[bytes]:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [os.fsencode(m.name) for m in tf.getmembers()]


@needs_lib
@pytest.mark.parametrize("whole_seconds", [True, False])
def test_diff_native_skip_decides_as_same_file(tmp_path: Path, whole_seconds: bool) -> None:
    """Copies with the same metadata: same content is dropped, same-size different content is a
    Modify only when the mtimes are whole seconds (containerd's rule), a symlink retargeted to a
    same-length target likewise, an unchanged hardlinked pair is linked to a new peer (Unmodified),
    a mode change is a Modify; large bodies (several compare chunks) differ only at the end."""
    lower = tmp_path / "lo"
    lower.mkdir()
    for k in range(40):
        (lower / f"f{k:02d}").write_bytes(b"%d" % k * (k * 37))
    (lower / "big").write_bytes(b"b" * (600_000 - 1) + b"1")
    (lower / "big-same").write_bytes(os.urandom(700_000))
    (lower / "empty").write_bytes(b"")
    os.symlink("target-1", lower / "sym")
    (lower / "hl-a").write_bytes(b"peer")
    os.link(lower / "hl-a", lower / "hl-b")
    (lower / "sub").mkdir()
    (lower / "sub" / "x").write_bytes(b"same")
    subprocess_copy(lower, tmp_path / "up")
    upper = tmp_path / "up"
    edits = {"f05": b"X" * (5 * 37 - 1) + b"Y", "f33": None, "big": b"b" * 600_000}
    for name, data in edits.items():
        p = upper / name
        if data is not None:
            st = p.stat()
            p.write_bytes(data)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(upper / "f33", 0o600)
    os.link(upper / "hl-a", upper / "hl-new")  # an Add whose Unmodified peers get linked to it
    os.unlink(upper / "sym")
    os.symlink("target-2", upper / "sym")
    t = 1_700_000_000 * 10**9 + (0 if whole_seconds else 123)
    for root in (lower, upper):
        for dp, dns, fns in os.walk(root):
            for n in dns + fns:
                os.utime(os.path.join(dp, n), ns=(t, t), follow_symlinks=False)
    got = _layer(lower, upper, True)
    assert got == _layer(lower, upper, False)
    names = set(_tar_names(got))
    assert {b"f33", b"hl-a", b"hl-b", b"hl-new"} <= names
    assert (b"f05" in names) == whole_seconds and (b"big" in names) == whole_seconds
    assert (b"sym" in names) == whole_seconds
    assert not names & {b"f04", b"f06", b"big-same", b"empty", b"sub/x"}


@needs_lib
def test_skip_same_stops_at_what_it_cannot_settle(tmp_path: Path) -> None:
    """Directly: it passes equal pairs (whole-second symlinks by their targets), and stops at a
    name only on one side, a directory (named when same_file holds for it), a changed file or
    symlink and a vanished file (the Python walk then raises its named error)."""
    assert lib is not None
    lower, upper = tmp_path / "lo", tmp_path / "up"
    lower.mkdir()
    for n in ("a", "b", "c", "d", "e"):
        (lower / n).write_bytes(n.encode())
    (lower / "dir").mkdir()
    os.symlink("target", lower / "f-link")
    (lower / "g").write_bytes(b"g")
    subprocess_copy(lower, upper)
    t = 1_700_000_000 * 10**9
    for root in (lower, upper):
        for n in ("a", "b", "c", "d", "e", "f-link", "g"):
            os.utime(root / n, ns=(t, t), follow_symlinks=False)
    with open_snapshot(lower) as lo, open_snapshot(upper) as up:
        ll, ul = lo.listing(b""), up.listing(b"")
        names = [ll[i][0] for i in range(len(ll))]
        assert names == [b"a", b"b", b"c", b"d", b"dir", b"e", b"f-link", b"g"]

        def skip(i: int, j: int) -> tuple[int, int, bytes | None]:
            return lib.skip_same(lo.fd, up.fd, lo.path(b"x")[:-1], up.path(b"x")[:-1], b"", ll, ul, i, j)

        # a..d equal (content compared), stops at the directory, which same_file holds for
        assert skip(0, 0) == (4, 4, b"dir")
        assert skip(5, 5) == (8, 8, None)  # e, the symlink (same target) and g
        assert skip(1, 0) == (1, 0, None)  # different names
        (upper / "c").write_bytes(b"C")  # same size; the listing still has the old stat
        os.utime(upper / "c", ns=(t, t))
        assert skip(0, 0) == (2, 2, None)
        os.unlink(upper / "f-link")
        os.symlink("tarGet", upper / "f-link")  # same length, other target, same mtime
        os.utime(upper / "f-link", ns=(t, t), follow_symlinks=False)
        ul = up.listing(b"")
        assert skip(5, 5) == (6, 6, None)
        assert not same_file(lo, up, b"f-link", ll[6][1], ul[6][1])
        os.chmod(upper / "dir", 0o700)  # the directory's metadata differs: the walk decides
        ul = up.listing(b"")
        assert skip(4, 4) == (4, 4, None)
        assert not same_file(lo, up, b"dir", ll[4][1], ul[4][1])
        os.unlink(upper / "d")
        assert skip(3, 3) == (3, 3, None)  # vanished: the Python path decides
        assert skip(0, 0) == (2, 2, None)
        with pytest.raises(FileChanged):
            same_file(lo, up, b"d", ll[3][1], ul[3][1])  # what the walk runs on that pair


@needs_lib
def test_base_layer_file_rewritten_after_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression guard for the single fstat after the read: a file rewritten between the
    listing and its read with the same size and mtime (only ctime moves) is not written from
    the listing's view: the native read declines (ctime differs), the Python path reads it
    again, and the layer is what the reference writes from the same listing."""
    (tmp_path / "f").write_bytes(b"hello")
    (tmp_path / "g").write_bytes(b"other")
    with open_snapshot(tmp_path) as up:
        listing = up.listing(b"")
        listed = list(listing[i] for i in range(len(listing)))
        st = (tmp_path / "f").stat()
        (tmp_path / "f").write_bytes(b"HELLO")
        os.utime(tmp_path / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (tmp_path / "f").stat().st_ctime_ns != st.st_ctime_ns
        monkeypatch.setattr(Snapshot, "listing", lambda self, rel=b"": listing)
        by_python: list[bytes] = []
        real_write_entry = baselayer.write_entry

        def spy(e: TarEntry, *args: object) -> None:
            by_python.append(e.name)
            real_write_entry(e, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(baselayer, "write_entry", spy)
        buf = io.BytesIO()
        write_base_tar(up, buf.write)
        assert by_python == [b"f"]  # declined by the native read (ctime moved); g stayed native
        monkeypatch.setattr(Snapshot, "scandir", lambda self, rel=b"": listed)
        assert buf.getvalue() == _reference(tmp_path)
    assert b"HELLO" in buf.getvalue()
