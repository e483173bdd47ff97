"""Checks on where an export writes, made before anything is built or written.

An OCI layout (and the embedded store, which is one) must be a writable directory whose
``index.json`` can be updated, must not lie inside a snapshot of the chain (the layer would
contain the store's own files), and no snapshot may lie inside it. Every failure is a named
error; nothing is created by these checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from collections.abc import Iterable
from typing import Any

from blobchain.layers.errors import InvalidLayout, NotWritable, StoreOverlapsSnapshot, from_os_error
from blobchain.layers.oci import check_index, check_tag

__all__ = ["check_destination", "check_disjoint", "check_layout", "is_fresh", "read_index", "remove_if_empty"]


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_disjoint(store: str, snapshots: Iterable[str], *, what: str = "store") -> None:
    """StoreOverlapsSnapshot if ``store`` is (inside) a snapshot, or a snapshot is inside it.

    Compared as real paths, so a symlink or ``..`` does not hide the overlap."""
    s = _real(store)
    for snap in snapshots:
        p = _real(snap)
        if _within(s, p):
            raise StoreOverlapsSnapshot(
                f"the {what} {store} is inside the snapshot {snap}: the layer would contain it",
                path=store,
                snapshot=snap,
            )
        if _within(p, s):
            raise StoreOverlapsSnapshot(
                f"the snapshot {snap} is inside the {what} {store}", path=store, snapshot=snap
            )


def _existing_base(path: str) -> str:
    """``path`` or its nearest existing ancestor (what a mkdir -p would write into)."""
    cur = os.path.abspath(path)
    while not os.path.lexists(cur):
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    return cur


def _check_writable(path: str, what: str) -> None:
    base = _existing_base(path)
    if not os.path.isdir(base):
        raise InvalidLayout(f"the {what} {path}: {base} exists and is not a directory", path=path)
    try:
        readonly = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError as e:
        raise from_os_error(e, f"checking the {what} {path}") from None
    if readonly:
        raise NotWritable(f"the {what} {path} is on a read-only filesystem", path=path)
    # access() also refuses an immutable directory, even to root.
    if not os.access(base, os.W_OK | os.X_OK):
        raise NotWritable(
            f"the {what} {path} is not writable ({base}: permission denied, or immutable)", path=path
        )
    if base == os.path.abspath(path):
        for sub in ("blobs", os.path.join("blobs", "sha256")):
            d = os.path.join(base, sub)
            if os.path.isdir(d) and not os.access(d, os.W_OK | os.X_OK):
                raise NotWritable(f"the {what} {path} is not writable ({d}: permission denied)", path=path)


def read_index(dest: str) -> dict[str, Any] | None:
    """The layout's current ``index.json``, checked (InvalidLayout), or None if there is none."""
    path = os.path.join(dest, "index.json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidLayout(f"cannot read {path}: {os.strerror(e.errno or 0)}", path=path) from None
    return check_index(data, path)


def check_layout(dest: str, *, what: str = "output layout") -> dict[str, Any] | None:
    """``dest`` can take an image: a writable directory (or creatable), a parseable
    ``index.json`` and ``oci-layout`` if present. Returns the current index (or None)."""
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise InvalidLayout(f"the {what} {dest} exists and is not a directory", path=dest)
    _check_writable(dest, what)
    marker = os.path.join(dest, "oci-layout")
    if os.path.lexists(marker):
        try:
            with open(marker, "rb") as f:
                ok = isinstance(json.load(f).get("imageLayoutVersion"), str)
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise InvalidLayout(f"{marker} is not an OCI layout marker", path=marker)
    return read_index(dest)


def check_destination(dest: str, tag: str | None, snapshots: Iterable[str]) -> dict[str, Any] | None:
    """Every check an export makes before it builds: the tag, the overlap with the
    snapshots, the layout itself."""
    if tag is not None:
        check_tag(tag)
    check_disjoint(dest, snapshots, what="output layout")
    return check_layout(dest)


def is_fresh(path: str) -> bool:
    """``path`` does not exist or is an empty directory: a failed run may clean it up."""
    if not os.path.lexists(path):
        return True
    try:
        return os.path.isdir(path) and not os.path.islink(path) and not any(os.scandir(path))
    except OSError:
        return False


def _in_use(dest: str) -> bool:
    """Whether another run holds a lease in the store at ``dest`` (it is building into it, so
    its skeleton is not ours to remove). Unreadable state counts as in use."""
    db = os.path.join(dest, ".blobchain", "metadata.db")
    if not os.path.exists(db):
        return False
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            return conn.execute("SELECT 1 FROM leases LIMIT 1").fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return True


def remove_if_empty(dest: str, *, keep_dir: bool = False) -> bool:
    """Remove the layout skeleton a failed run made at ``dest`` when it holds nothing worth
    keeping: no blob, no ``index.json``, no ingest in progress, no other run's lease. ``keep_dir`` keeps ``dest``
    itself (it existed, empty, before the run). True if removed."""
    if not os.path.isdir(dest) or os.path.lexists(os.path.join(dest, "index.json")):
        return False
    for sub in (os.path.join("blobs", "sha256"), os.path.join(".blobchain", "ingest")):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if any(os.scandir(os.path.join(dest, sub))):
                return False
    known = {"blobs", ".blobchain", "oci-layout"}
    if any(e.name not in known for e in os.scandir(dest)) or _in_use(dest):
        return False
    if not keep_dir:
        shutil.rmtree(dest, ignore_errors=True)
        return not os.path.lexists(dest)
    for name in known:
        p = os.path.join(dest, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)
    return True
