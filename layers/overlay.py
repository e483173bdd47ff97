"""Changes from an overlay upper directory alone: BuildKit's ``overlay.Changes`` fast path.

Only the upper directory is walked; the lower is consulted per entry. A character device 0/0 is
a whiteout (a Delete when the path exists in the lower, else nothing); a directory marked opaque
(``trusted.overlay.opaque`` or ``user.overlay.opaque`` = ``y``) that also exists in the lower is
reported like any entry and then diffed against the lower with the double walk, which gives
explicit per-entry whiteouts (``.wh..wh..opq`` is never produced). ``trusted.overlay.redirect``
cannot be handled and raises :class:`UnsupportedOverlay` (BuildKit falls back to the double walk).

:class:`LowerView` is the merged, read-only view of the parent layers that the lookups need.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from stat import S_IFCHR, S_IFDIR, S_IFMT

from blobchain.layers.changes import ADD, DELETE, MODIFY, Change, diff_dir, same_file
from blobchain.layers.errors import FailedPrecondition, InvalidArgument, register
from blobchain.layers.snapshot import Snapshot

__all__ = ["LowerView", "UnsupportedOverlay", "upper_changes"]

_OPAQUE_KEYS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
_REDIRECT_KEY = b"trusted.overlay.redirect"
_MAX_DIR_CACHE = 4096

ROOTFS = "rootfs"
UPPER = "upper"


@register
class UnsupportedOverlay(FailedPrecondition):
    """The upper directory uses an overlay feature the fast path cannot diff (redirect_dir);
    the caller should fall back to the double walk against a full rootfs."""

    code = "unsupported_overlay"


def _is_whiteout(st: os.stat_result) -> bool:
    return S_IFMT(st.st_mode) == S_IFCHR and st.st_rdev == 0


def _is_opaque(layer: Snapshot, rel: bytes) -> bool:
    return any(layer.xattr(rel, key) == b"y" for key in _OPAQUE_KEYS)


class LowerView:
    """The merged view of a chain of parent layers, as an overlay mount would show it.

    ``layers`` are bottom first; ``kinds`` (default: all ``"upper"``) says for each whether it
    is a full ``"rootfs"`` (then it alone is the view of everything below it) or an overlay
    ``"upper"`` directory (looked up top-down, honouring whiteout devices and opaque dirs).
    Not thread-safe: it caches open directory descriptors; :meth:`close` releases them.
    """

    def __init__(self, layers: Sequence[Snapshot], kinds: Sequence[str] | None = None) -> None:
        kinds = [UPPER] * len(layers) if kinds is None else list(kinds)
        if len(kinds) != len(layers):
            raise InvalidArgument("one kind per layer", layers=len(layers), kinds=len(kinds))
        if not layers:
            raise InvalidArgument("a lower view needs at least one layer")
        for k in kinds:
            if k not in (ROOTFS, UPPER):
                raise InvalidArgument(f"invalid layer kind {k!r}", kind=k)
        start = max((i for i, k in enumerate(kinds) if k == ROOTFS), default=0)
        self._layers: tuple[Snapshot, ...] = tuple(reversed(layers[start:]))  # top first
        self._upper: tuple[bool, ...] = tuple(k == UPPER for k in reversed(kinds[start:]))
        self._dirs: dict[bytes, tuple[int, ...]] = {}
        self._fds: dict[int, tuple[bytes, int]] = {}

    @property
    def layers(self) -> tuple[Snapshot, ...]:
        """The layers that make up the view, top first."""
        return self._layers

    def close(self) -> None:
        for _, fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> LowerView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- resolution --------------------------------------------------------------------------

    def _lstat_in(self, idx: int, rel: bytes) -> os.stat_result | None:
        parent, _, name = rel.rpartition(b"/")
        layer = self._layers[idx]
        if not parent:
            fd = layer.fd
        else:
            cached = self._fds.get(idx)
            if cached is not None and cached[0] == parent:
                fd = cached[1]
            else:
                try:
                    fd = layer.open_dir(parent)
                except (FileNotFoundError, NotADirectoryError):
                    return None
                if cached is not None:
                    os.close(cached[1])
                self._fds[idx] = (parent, fd)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _contributors(self, rel: bytes) -> tuple[int, ...]:
        """The layers (top first) whose directory ``rel`` shows in the merged directory."""
        found = self._dirs.get(rel)
        if found is not None:
            return found
        if not rel:
            res: list[int] = []
            for idx, layer in enumerate(self._layers):
                res.append(idx)
                if self._upper[idx] and _is_opaque(layer, b""):
                    break
            out = tuple(res)
        else:
            # Iterate down from the nearest known ancestor: no recursion on deep trees.
            parts = rel.split(b"/")
            k = len(parts) - 1
            while k > 0 and b"/".join(parts[:k]) not in self._dirs:
                k -= 1
            out = self._dirs[b"/".join(parts[:k])] if k > 0 else self._contributors(b"")
            for n in range(k + 1, len(parts) + 1):
                out = self._merge_dir(b"/".join(parts[:n]), out)
        if len(self._dirs) >= _MAX_DIR_CACHE:
            self._dirs.clear()
        self._dirs[rel] = out
        return out

    def _merge_dir(self, rel: bytes, parent: tuple[int, ...]) -> tuple[int, ...]:
        res: list[int] = []
        for idx in parent:
            st = self._lstat_in(idx, rel)
            if st is None:
                continue
            if S_IFMT(st.st_mode) != S_IFDIR:
                # The topmost entry decides; a non-directory (or whiteout) below a directory
                # ends the merge, as in overlayfs.
                break
            res.append(idx)
            if self._upper[idx] and _is_opaque(self._layers[idx], rel):
                break
        self._dirs[rel] = tuple(res)
        return tuple(res)

    def lookup(self, rel: bytes) -> tuple[Snapshot, os.stat_result] | None:
        """The layer holding ``rel`` in the merged view and its lstat, or None if absent."""
        if not rel:
            top = self._layers[0]
            return top, top.lstat(b"")
        parent = rel.rpartition(b"/")[0]
        for idx in self._contributors(parent):
            st = self._lstat_in(idx, rel)
            if st is None:
                continue
            if self._upper[idx] and _is_whiteout(st):
                return None
            return self._layers[idx], st
        return None

    def _holder(self, rel: bytes) -> Snapshot:
        found = self.lookup(rel)
        if found is None:
            raise FileNotFoundError(2, "not in the lower view", rel)
        return found[0]

    # -- the Tree protocol (what the walk and the tar writer need) ----------------------------

    def lstat(self, rel: bytes) -> os.stat_result:
        found = self.lookup(rel)
        if found is None:
            raise FileNotFoundError(2, "not in the lower view", rel)
        return found[1]

    def exists(self, rel: bytes) -> bool:
        return self.lookup(rel) is not None

    def scandir(self, rel: bytes = b"") -> list[tuple[bytes, os.stat_result]]:
        """The merged directory ``rel``: whiteouts removed, opaque directories honoured."""
        merged: dict[bytes, os.stat_result] = {}
        hidden: set[bytes] = set()
        for idx in self._contributors(rel):
            upper = self._upper[idx]
            for name, st in self._layers[idx].scandir(rel):
                if name in merged or name in hidden:
                    continue
                if upper and _is_whiteout(st):
                    hidden.add(name)
                else:
                    merged[name] = st
        return sorted(merged.items())

    def capability(self, rel: bytes) -> bytes | None:
        return self._holder(rel).capability(rel)

    def xattr(self, rel: bytes, name: bytes | str) -> bytes | None:
        return self._holder(rel).xattr(rel, name)

    def readlink(self, rel: bytes) -> bytes:
        return self._holder(rel).readlink(rel)

    def open_file(self, rel: bytes) -> int:
        return self._holder(rel).open_file(rel)


class _UpperView:
    """The upper directory without its whiteout devices: BuildKit's "upperdirView" mount
    (``lowerdir=<upperdir>:<empty>``), used for the double walk below an opaque directory."""

    __slots__ = ("_upper",)

    def __init__(self, upper: Snapshot) -> None:
        self._upper = upper

    def scandir(self, rel: bytes = b"") -> list[tuple[bytes, os.stat_result]]:
        return [(n, st) for n, st in self._upper.scandir(rel) if not _is_whiteout(st)]

    def capability(self, rel: bytes) -> bytes | None:
        return self._upper.capability(rel)

    def readlink(self, rel: bytes) -> bytes:
        return self._upper.readlink(rel)

    def open_file(self, rel: bytes) -> int:
        return self._upper.open_file(rel)


def upper_changes(lower: LowerView | Snapshot | None, upper: Snapshot) -> Iterator[Change]:
    """The changes recorded in overlay upper directory ``upper`` over ``lower``, in the
    pre-order sorted walk order (the same order as :func:`~blobchain.layers.changes.diff`).

    ``lower`` is the merged parent (a :class:`LowerView`, or a full rootfs Snapshot), or None
    for a base layer. Unchanged entries copied up are dropped; the walk itself never reports
    Unmodified (only the double walk below an opaque directory can, as in BuildKit).
    """
    if isinstance(lower, Snapshot):
        lower = LowerView([lower], [ROOTFS])
    view = _UpperView(upper)
    stack: list[list] = [[b"", upper.scandir(b""), 0]]
    new = Change
    while stack:
        frame = stack[-1]
        prefix, entries, i = frame
        n = len(entries)
        child = None
        while i < n:
            name, st = entries[i]
            i += 1
            path = prefix + name
            fmt = S_IFMT(st.st_mode)
            if fmt == S_IFDIR and upper.xattr(path, _REDIRECT_KEY):
                raise UnsupportedOverlay(
                    "redirect_dir is used, which the overlay differ does not support", path=path
                )
            if fmt == S_IFCHR and st.st_rdev == 0:
                gone = lower.lookup(path) if lower is not None else None
                if gone is not None:
                    yield new(DELETE, path, gone[1])  # the lower's stat, as diff() reports
                continue
            base = lower.lookup(path) if lower is not None else None
            if base is None:
                yield new(ADD, path, st)
            elif not same_file(lower, view, path, base[1], st):  # type: ignore[arg-type]
                yield new(MODIFY, path, st)
            if fmt != S_IFDIR:
                continue
            if base is not None and _is_opaque(upper, path):
                # Opaque: the upper dir replaces the lower one; diff the two whole directories.
                lower_is_dir = S_IFMT(base[1].st_mode) == S_IFDIR
                yield from diff_dir(lower, view, path, lower_is_dir=lower_is_dir)  # type: ignore[arg-type]
                continue
            child = path
            break
        if child is None:
            stack.pop()
        else:
            frame[2] = i
            stack.append([child + b"/", upper.scandir(child), 0])
