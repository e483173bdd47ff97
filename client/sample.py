"""A small sample chain of snapshots, so ``blobchain demo`` runs on a fresh machine."""

from __future__ import annotations

import os
import shutil

__all__ = ["make_sample_chain"]

_EPOCH = 1_700_000_000


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _touch_all(root: str) -> None:
    # Fixed mtimes (directories last) so the demo's digests are the same on every machine.
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (_EPOCH, _EPOCH), follow_symlinks=False)
    os.utime(root, (_EPOCH, _EPOCH))


def make_sample_chain(base: str) -> list[str]:
    """Build three filesystem states under ``base`` and return their paths, base first."""
    if os.path.exists(base):
        shutil.rmtree(base)
    s0, s1, s2 = (os.path.join(base, f"rootfs-{i}") for i in range(3))

    # 0: a small base system
    _write(f"{s0}/etc/os-release", b'NAME="blobchain sample"\nVERSION_ID=1\n')
    _write(f"{s0}/etc/app.conf", b"level=info\n")
    _write(f"{s0}/usr/bin/tool", b"#!/bin/sh\necho tool\n" * 64, 0o755)
    _write(f"{s0}/usr/share/doc/readme.txt", b"blobchain sample\n" * 4096)
    for i in range(200):
        _write(f"{s0}/usr/lib/data/file{i:03d}.dat", os.urandom(0) + bytes([i % 251]) * (512 + i * 37))
    os.symlink("tool", f"{s0}/usr/bin/tool-alias")
    os.link(f"{s0}/usr/bin/tool", f"{s0}/usr/bin/tool-hardlink")
    _touch_all(s0)

    # 1: modify, add, delete a file and a whole tree
    shutil.copytree(s0, s1, symlinks=True)
    _write(f"{s1}/etc/app.conf", b"level=debug\n")
    _write(f"{s1}/opt/app/main.py", b"print('hello from layer 1')\n" * 100, 0o755)
    os.unlink(f"{s1}/usr/share/doc/readme.txt")
    shutil.rmtree(f"{s1}/usr/lib/data")
    _touch_all(s1)

    # 2: a directory replaced by a file, a permission change, a new hardlink to a lower file
    shutil.copytree(s1, s2, symlinks=True)
    shutil.rmtree(f"{s2}/opt/app")
    _write(f"{s2}/opt/app", b"now a file\n")
    os.chmod(f"{s2}/usr/bin/tool", 0o700)
    os.link(f"{s2}/etc/os-release", f"{s2}/etc/os-release.bak")
    _touch_all(s2)
    return [s0, s1, s2]
