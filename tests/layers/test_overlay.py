"""The overlay upperdir fast path (BuildKit ``overlay.Changes``) and the merged lower view."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import fsgen
import pytest
import services
from conftest import needs_root
from fsgen import Dir, File, Hardlink, Symlink, Whiteout, t

from blobchain.layers.changes import ChangeKind, diff
from blobchain.layers.entries import tar_entries
from blobchain.layers.overlay import LowerView, UnsupportedOverlay, upper_changes
from blobchain.layers.snapshot import Snapshot, open_snapshot
from blobchain.layers.tarwriter import write_tar

pytestmark = needs_root  # whiteout devices and trusted.overlay.* xattrs

A, M, D, U = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE, ChangeKind.UNMODIFIED
Make = Callable[..., Snapshot]
OPAQUE = ((b"trusted.overlay.opaque", b"y"),)


def tar(changes: object, upper: Snapshot) -> bytes:
    buf = bytearray()
    write_tar(tar_entries(changes, upper), upper, buf.extend)  # type: ignore[arg-type]
    return bytes(buf)


def kinds(it: object) -> list[tuple[ChangeKind, bytes]]:
    return [(c.kind, c.path) for c in it]  # type: ignore[attr-defined]


# --- LowerView ----------------------------------------------------------------------------------


def test_lower_view_merges_layers(snapshots: Make) -> None:
    l0 = snapshots(
        {b"a/x": File(b"0"), b"a/y": File(b"y"), b"b/z": File(), b"c": File(b"c0"), b"o/old": File()}
    )
    l1 = snapshots(
        {
            b"a/x": File(b"1"),  # shadows l0
            b"a/y": Whiteout(),
            b"a/n": File(b"n"),
            b"b": Whiteout(),  # hides the whole dir
            b"o/": Dir(xattrs=OPAQUE),
            b"o/new": File(),
        }
    )
    with LowerView([l0, l1]) as v:
        assert [n for n, _ in v.scandir(b"")] == [b"a", b"c", b"o"]
        assert [n for n, _ in v.scandir(b"a")] == [b"n", b"x"]
        assert [n for n, _ in v.scandir(b"o")] == [b"new"]
        assert v.lookup(b"a/y") is None and v.lookup(b"b/z") is None and v.lookup(b"o/old") is None
        found = v.lookup(b"a/x")
        assert found is not None and found[0] is l1
        fd = v.open_file(b"a/x")
        try:
            assert os.read(fd, 10) == b"1"
        finally:
            os.close(fd)
        assert v.exists(b"c") and not v.exists(b"nope") and not v.exists(b"c/under-a-file")
        with pytest.raises(FileNotFoundError):
            v.lstat(b"b")


def test_rootfs_layer_hides_everything_below(snapshots: Make) -> None:
    l0 = snapshots({b"only-in-l0": File()})
    full = snapshots({b"x": File(), b"wh": Whiteout()})  # in a rootfs a 0/0 device is just a device
    l2 = snapshots({b"y": File()})
    with LowerView([l0, full, l2], ["upper", "rootfs", "upper"]) as v:
        assert [n for n, _ in v.scandir(b"")] == [b"wh", b"x", b"y"]
        assert v.layers == (l2, full)


def test_lower_view_rejects_bad_kinds(snapshots: Make) -> None:
    s = snapshots({})
    with pytest.raises(Exception, match="kind"):
        LowerView([s], ["bogus"])


# --- upper_changes ------------------------------------------------------------------------------


def test_upper_changes_synthetic_layers(snapshots: Make) -> None:
    layers, upper, merged_lower, merged = fsgen.overlay_opaque()
    lowers = [snapshots(s) for s in layers]
    up = snapshots(upper)
    with LowerView(lowers) as view:
        got = kinds(upper_changes(view, up))
        assert got == [
            (A, b"a/added"),
            (D, b"a/gone"),
            (D, b"a/new1"),
            (M, b"f"),
            (A, b"hidden"),
            (A, b"hidden/again"),
            (A, b"new"),
            (A, b"new/n"),
            (A, b"o/w"),
            (M, b"o/x"),
            (D, b"o/y"),
        ]
        # Same bytes as the double walk over the merged trees.
        ml, mu = snapshots(merged_lower), snapshots(merged)
        assert tar(upper_changes(view, up), up) == tar(diff(ml, mu), mu)


def test_base_layer_upper(snapshots: Make) -> None:
    up = snapshots({b"d/f": File(b"x"), b"w": Whiteout()})  # a whiteout over nothing: skipped
    assert kinds(upper_changes(None, up)) == [(A, b"d"), (A, b"d/f")]


def test_rootfs_snapshot_as_lower(snapshots: Make) -> None:
    lower = snapshots({b"d/keep": File(b"k"), b"d/gone": File(), b"same": File(b"s", mtime_ns=t(0, 5))})
    up = snapshots({b"d/gone": Whiteout(), b"d/new": File(), b"same": File(b"s", mtime_ns=t(0, 5))})
    # "same" was copied up unchanged: dropped, as sameDirent says.
    got = list(upper_changes(lower, up))
    assert kinds(got) == [(D, b"d/gone"), (A, b"d/new")]
    assert got[0].st is not None and stat.S_ISREG(got[0].st.st_mode)  # a Delete carries the lower's stat


def test_opaque_over_a_lower_file(snapshots: Make) -> None:
    lower = snapshots({b"x": File(b"was a file")})
    up = snapshots({b"x/": Dir(xattrs=OPAQUE), b"x/in": File()})
    assert kinds(upper_changes(lower, up)) == [(M, b"x"), (A, b"x/in")]


def test_whiteouts_inside_opaque_dirs_are_not_entries(snapshots: Make) -> None:
    lower = snapshots({b"o/a": File(), b"o/b": File()})
    up = snapshots({b"o/": Dir(xattrs=OPAQUE), b"o/a": Whiteout(), b"o/c": File()})
    # Below an opaque dir the whiteout device itself is invisible; a and b both go.
    assert kinds(upper_changes(lower, up)) == [(D, b"o/a"), (D, b"o/b"), (A, b"o/c")]


def test_user_overlay_opaque(snapshots: Make) -> None:
    lower = snapshots({b"o/a": File()})
    up = snapshots({b"o/": Dir(xattrs=((b"user.overlay.opaque", b"y"),)), b"o/b": File()})
    assert kinds(upper_changes(lower, up)) == [(D, b"o/a"), (A, b"o/b")]


def test_redirect_is_refused(snapshots: Make) -> None:
    lower = snapshots({b"d/x": File()})
    up = snapshots({b"e/": Dir(xattrs=((b"trusted.overlay.redirect", b"/d"),))})
    with pytest.raises(UnsupportedOverlay):
        list(upper_changes(lower, up))


def test_hardlink_copy_up_never_unmodified(snapshots: Make) -> None:
    """Known divergence from the double walk (spec pitfall 27): the peer copied up with the new
    link is the one written in full; peers left below are not referenced."""
    lower = snapshots({b"h1": File(b"h", mtime_ns=t(1, 1)), b"h2": Hardlink(b"h1")})
    up = snapshots({b"h1": File(b"h", mtime_ns=t(1, 1)), b"h3": Hardlink(b"h1")})
    changes = kinds(upper_changes(lower, up))
    assert changes == [(A, b"h3")]
    assert U not in [k for k, _ in changes]


# --- a real overlayfs mount ---------------------------------------------------------------------


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(lower, upper, merged mount point) of a live overlay mount; unmounted afterwards."""
    lower = fsgen.build(
        tmp_path / "lower",
        {
            b"etc/app.conf": File(b"v1", mtime_ns=t(0, 10)),
            b"etc/remove-me": File(b"x"),
            b"etc/keep": File(b"keep"),
            b"tree/a/b": File(b"b"),
            b"replace/old1": File(b"1"),
            b"replace/old2": File(b"2"),
            b"bin/tool": File(b"tool", mode=0o755, mtime_ns=t(0, 20)),
            b"bin/link": Symlink(b"tool"),
            b"hl1": File(b"pair", mtime_ns=t(1, 1)),
            b"hl2": Hardlink(b"hl1"),
        },
    )
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off,index=off,metacopy=off"
    r = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], capture_output=True, check=False
    )
    if r.returncode != 0:
        services.missing(f"cannot mount overlayfs here: {r.stderr.decode().strip()}")
    try:
        yield lower, upper, merged
    finally:
        subprocess.run(["umount", str(merged)], check=False)


def test_real_overlay_matches_double_walk(overlay: tuple[Path, Path, Path], tmp_path: Path) -> None:
    lower, upper, merged = overlay
    (merged / "etc" / "app.conf").write_bytes(b"v2 longer")
    (merged / "etc" / "remove-me").unlink()
    (merged / "bin" / "tool").chmod(0o700)
    shutil.rmtree(merged / "tree")
    shutil.rmtree(merged / "replace")
    (merged / "replace").mkdir()  # recreated: overlayfs marks it opaque
    (merged / "replace" / "new").write_bytes(b"new")
    (merged / "new" / "deep").mkdir(parents=True)
    (merged / "new" / "deep" / "f").write_bytes(b"f")
    os.symlink("../etc/keep", merged / "new" / "lnk")
    os.mkfifo(merged / "new" / "fifo")
    assert os.getxattr(upper / "replace", "trusted.overlay.opaque") == b"y"
    copy = tmp_path / "merged-copy"
    subprocess.run(["cp", "-a", f"{merged}/.", f"{copy}/"], check=True)
    with open_snapshot(lower) as lo, open_snapshot(upper) as up, open_snapshot(copy) as mc:
        fast = list(upper_changes(lo, up))
        assert kinds(fast) == [
            (M, b"bin/tool"),
            (M, b"etc/app.conf"),
            (D, b"etc/remove-me"),
            (A, b"new"),
            (A, b"new/deep"),
            (A, b"new/deep/f"),
            (A, b"new/fifo"),
            (A, b"new/lnk"),
            (A, b"replace/new"),
            (D, b"replace/old1"),
            (D, b"replace/old2"),
            (D, b"tree"),
        ]
        assert tar(fast, up) == tar(diff(lo, mc), mc)
