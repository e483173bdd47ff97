"""Byte parity with containerd through the product path: ``blobchain export`` as a user runs it.

Each chain is exported by the real CLI (a subprocess, embedded mode). The layers are then read
back from the layout as any consumer would (``index.json`` -> tag -> manifest -> layer blobs),
each blob's digest is checked, it is decompressed by its media type, and the tar must equal
containerd's ``ctr snapshots diff`` of the same states (whiteout mtimes normalised to 0, as
``whiteout_epoch=0``), and its sha256 the diffID in the image config.

- full-rootfs chains: fsgen's chain of states (every entry type, hardlink groups forming and
  breaking, long names);
- ``--upper`` chains: upper dirs made by the kernel. A real overlay mount (lowerdir / upperdir /
  workdir) is changed through its merged dir (deletes, a tree removed and recreated, renames,
  copy-ups, long link targets), then unmounted; containerd diffs the merged states.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsgen
import pytest
import services
import zstandard
from fsgen import Dir, File, Hardlink, Symlink, t

from .containerd import Containerd, first_difference

pytestmark = [pytest.mark.compat, services.needs_root("containerd, overlay mounts, mknod, chown")]

BLOBCHAIN = str(Path(sys.executable).parent / "blobchain")
LONG_TARGET = b"/opt/" + b"t" * 140  # a symlink target over 100 bytes: PAX linkpath
LONG_DIR = b"deep/" + b"d" * 60 + b"/" + b"e" * 60  # with a name, a hardlink target over 100 bytes


def export(snapshots: list[Path], out: Path, *args: str) -> dict[str, Any]:
    """``blobchain export`` in a subprocess (embedded: no BLOBCHAIN_* settings); its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOBCHAIN_")}
    r = subprocess.run(
        [BLOBCHAIN, "export", *map(str, snapshots), "--oci", str(out), "--json", "-q", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, f"blobchain export failed ({r.returncode}):\n{r.stderr}"
    return dict(json.loads(r.stdout))


def _blob(layout: Path, digest: str) -> bytes:
    data = (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest, f"blob {digest} does not match its name"
    return data


def _decompress(media_type: str, data: bytes) -> bytes:
    if media_type.endswith(("+gzip", ".gzip")):
        return gzip.decompress(data)
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    assert media_type.endswith((".tar", "layer.v1.tar")), media_type
    return data


def layout_layers(layout: Path, tag: str = "latest") -> list[bytes]:
    """The image's layer tars, uncompressed, read from the layout as a consumer reads it."""
    index = json.loads((layout / "index.json").read_text())
    tagged = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    assert len(tagged) == 1, index
    manifest = json.loads(_blob(layout, tagged[0]["digest"]))
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    tars = []
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        data = _blob(layout, desc["digest"])
        assert len(data) == desc["size"]
        tar = _decompress(desc["mediaType"], data)
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        tars.append(tar)
    return tars


def containerd_layers(ctrd: Containerd, states: list[Path]) -> list[bytes]:
    """containerd's diff of each state against the previous one (the first against nothing)."""
    out, parent = [], None
    for state in states:
        key = ctrd.commit_state(state, parent=parent)
        out.append(ctrd.diff_bytes(key))
        parent = key
    return out


def assert_same_layers(ours: list[bytes], theirs: list[bytes]) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        report = first_difference(a, b)
        assert report is None, f"layer {i}: {report}"


# --- full rootfs chains -----------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_rootfs_chain_through_export(ctrd: Containerd, tmp_path: Path, compression: str) -> None:
    states = [fsgen.build(tmp_path / f"s{i}", spec) for i, spec in enumerate(_rootfs_chain())]
    export(states, tmp_path / "oci", "-c", compression)
    ours = layout_layers(tmp_path / "oci")
    assert_same_layers(ours, containerd_layers(ctrd, states))
    assert all(len(tar) > 1024 for tar in ours)  # real layers, not empty ones


def _rootfs_chain() -> list[fsgen.Spec]:
    states = fsgen.chain()
    extra: dict[bytes, fsgen.Node] = {
        b"links/long": Symlink(LONG_TARGET),
        LONG_DIR + b"/first": File(b"linked", mtime_ns=t(7, 7)),
        LONG_DIR + b"/second": Hardlink(LONG_DIR + b"/first"),  # linkname > 100 bytes
    }
    return [*states[:2], {**states[2], **extra}, states[3]]


# --- --upper chains from a real overlay mount -------------------------------------------------


@contextlib.contextmanager
def overlay(lowers: list[Path], upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    """A real overlay mount (top lower first in ``lowers``); unmounted after the block, leaving
    in ``upper`` what the kernel wrote: copy-ups, whiteout devices, opaque directories."""
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in lowers)
    # No redirects, index or metacopy: upper dirs as BuildKit's overlay differ accepts them.
    opts = f"lowerdir={lowerdir},upperdir={upper},workdir={work},redirect_dir=off,index=off,metacopy=off"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], capture_output=True, text=True)
    if r.returncode != 0:
        services.missing(f"cannot mount overlayfs here: {r.stderr.strip()}")
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)
        shutil.rmtree(work)


def _base() -> fsgen.Spec:
    return {
        b"etc/hosts": File(b"127.0.0.1 localhost\n"),
        b"etc/passwd": File(b"root:x:0:0::/root:/bin/sh\n"),
        b"usr/bin/tool": File(b"#!/bin/sh\necho tool\n", mode=0o755),
        b"usr/bin/other": File(b"other", mode=0o755),
        b"usr/lib/libx.so": File(b"lib" * 3000),
        b"var/cache/a": File(b"a"),
        b"var/cache/b/c": File(b"c"),
        b"var/log/old.log": File(b"old log"),
        b"opt/dir/sub/file": File(b"deep"),
        b"home/u/.profile": File(b"PS1=$\n", uid=1000, gid=1000),
        b"home/u/": Dir(uid=1000, gid=1000),
        b"links/short": Symlink(b"../etc/hosts"),
        LONG_DIR + b"/keep": File(b"keep"),
        b"empty/": Dir(mode=0o700),
    }


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _layer1(m: Path) -> None:
    """Changes made through the merged dir; the kernel turns them into the upper dir."""
    (m / "etc/hosts").write_bytes(b"127.0.0.1 localhost\n10.0.0.1 db\n")  # copy-up
    (m / "usr/bin/other").chmod(0o700)  # metadata-only copy-up
    (m / "var/log/old.log").unlink()  # whiteout device
    shutil.rmtree(m / "var/cache")  # a lower tree removed ...
    (m / "var/cache").mkdir()  # ... and recreated: an opaque dir
    _write(m / "var/cache/new", b"fresh")
    os.rename(m / "home/u/.profile", m / "home/u/.profile.bak")  # copy-up + whiteout
    os.symlink(LONG_TARGET, m / "links/long")  # target > 100 bytes
    _write(m / (LONG_DIR.decode() + "/first"), b"a new pair")
    os.link(m / (LONG_DIR.decode() + "/first"), m / (LONG_DIR.decode() + "/second"))  # linkname > 100
    _write(m / "opt/new/file", b"new in layer 1")
    os.mkfifo(m / "opt/new/fifo")


def _layer2(m: Path) -> None:
    (m / "etc/passwd").unlink()  # from the base
    (m / "opt/new/file").unlink()  # from layer 1's upper
    shutil.rmtree(m / "opt/dir")  # a whole lower directory
    shutil.rmtree(m / "var/cache")  # opaque again, over layer 1's opaque dir
    (m / "var/cache").mkdir(mode=0o750)
    _write(m / "var/cache/newer", b"fresher")
    (m / "links/long").unlink()
    os.symlink(LONG_TARGET + b"/moved/" + b"u" * 40, m / "links/long")
    os.utime(m / "usr/lib/libx.so", ns=(t(50, 5), t(50, 5)))  # touch only
    os.chown(m / "usr/bin/tool", 1000, 1000)
    (m / "usr/bin/tool").chmod(0o755)
    shutil.rmtree(m / "empty")
    (m / "empty").mkdir(mode=0o755)  # an empty opaque dir over an empty lower dir
    _write(m / "brand/new/tree/file", b"x" * 5000)


def _overlay_chain(tmp_path: Path, ctrd: Containerd) -> tuple[list[Path], list[bytes]]:
    """Build base + two kernel-made upper dirs; return them and containerd's layers."""
    base = fsgen.build(tmp_path / "base", _base())
    uppers, theirs = [], []
    key = ctrd.commit_state(base)
    theirs.append(ctrd.diff_bytes(key))
    for i, change in enumerate((_layer1, _layer2), start=1):
        upper = tmp_path / f"upper{i}"
        with overlay([*reversed(uppers), base], upper, tmp_path / f"work{i}", tmp_path / f"merged{i}") as m:
            change(m)
            key = ctrd.commit_state(m, parent=key)  # the merged state, diffed by containerd
            theirs.append(ctrd.diff_bytes(key))
        uppers.append(upper)
    return [base, *uppers], theirs


def _kernel_made(upper: Path) -> tuple[set[str], set[str]]:
    """The whiteout devices and opaque directories the kernel left in an upper dir."""
    whiteouts, opaque = set(), set()
    for d, dirs, files in os.walk(upper):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, upper)
            if os.path.isdir(p) and not os.path.islink(p):
                with contextlib.suppress(OSError):
                    if os.getxattr(p, "trusted.overlay.opaque") == b"y":
                        opaque.add(rel)
            elif (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0:
                whiteouts.add(rel)
    return whiteouts, opaque


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_upper_chain_from_a_real_overlay_through_export(ctrd: Containerd, tmp_path: Path, compression: str) -> None:
    snapshots, theirs = _overlay_chain(tmp_path, ctrd)
    # What the kernel made is what this test is about: check it really is there.
    w1, o1 = _kernel_made(snapshots[1])
    w2, o2 = _kernel_made(snapshots[2])
    assert {"var/log/old.log", "home/u/.profile"} <= w1 and "var/cache" in o1
    assert {"etc/passwd", "opt/new/file", "opt/dir"} <= w2 and {"var/cache", "empty"} <= o2
    export(snapshots, tmp_path / "oci", "--upper", "-c", compression)
    assert_same_layers(layout_layers(tmp_path / "oci"), theirs)
