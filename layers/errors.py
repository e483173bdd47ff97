"""The error hierarchy, classed by what the caller should do.

Every error blobchain raises derives from :class:`BlobchainError`. The base classes tell the
caller what to do (fix the input, retry later, give up); the leaf classes name the problem and
carry the offending values. ``code`` is a stable string used to move errors across process and
Celery boundaries (see :func:`from_code`).
"""

from __future__ import annotations

import errno
import os
from typing import Any, TypeVar

__all__ = [
    "AlreadyExists",
    "BlobchainError",
    "Cancelled",
    "Conflict",
    "ConflictingParent",
    "DigestMismatch",
    "FailedPrecondition",
    "FileChanged",
    "InvalidArgument",
    "InvalidLayout",
    "InvalidLevel",
    "InvalidSetting",
    "InvalidTag",
    "MissingParent",
    "NonAddressableParent",
    "NotFound",
    "NotWritable",
    "ParentCycle",
    "PathEscapes",
    "PathTooLong",
    "RefNotFound",
    "SnapshotNotFound",
    "SnapshotOutsideRoots",
    "StoreFull",
    "StoreNotFound",
    "StoreOverlapsSnapshot",
    "Unavailable",
    "UnknownCompression",
    "UnreadableFile",
    "UnsupportedCompression",
    "UsageError",
    "from_code",
    "registered_codes",
    "register",
    "from_os_error",
]


_E = TypeVar("_E", bound="type[BlobchainError]")
# code -> class: every error that may cross a process or Celery boundary, registered where it is
# defined (``@register``), so ``from_code`` knows it whatever was imported first.
_CODES: dict[str, type[BlobchainError]] = {}


def register(cls: _E) -> _E:
    """Class decorator: make ``cls.code`` rebuildable by :func:`from_code`. One class per code."""
    have = _CODES.get(cls.code)
    if have is not None and have is not cls:
        raise TypeError(f"error code {cls.code!r} is taken by {have.__qualname__}")
    _CODES[cls.code] = cls
    return cls


def registered_codes() -> dict[str, type[BlobchainError]]:
    """Every registered code and its class (a copy)."""
    return dict(_CODES)


class BlobchainError(Exception):
    """Base of every blobchain error. ``code`` names the class across process boundaries."""

    code = "blobchain"
    retryable = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle by message and details so errors survive process pools and Celery.
        return (_rebuild, (self.code, self.message, self.details))

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": _jsonable(self.details)}


register(BlobchainError)


# --- action classes -------------------------------------------------------------------------


@register
class InvalidArgument(BlobchainError):
    """The input is wrong; retrying the same request will fail the same way."""

    code = "invalid_argument"


@register
class NotFound(BlobchainError):
    code = "not_found"


@register
class AlreadyExists(BlobchainError):
    code = "already_exists"


@register
class FailedPrecondition(BlobchainError):
    """The system is not in the state the operation needs (e.g. an ancestor lacks its blob)."""

    code = "failed_precondition"


@register
class Conflict(BlobchainError):
    code = "conflict"


@register
class Unavailable(BlobchainError):
    """A service (S3, Redis) could not be reached; the operation may be retried."""

    code = "unavailable"
    retryable = True


@register
class Cancelled(BlobchainError):
    code = "cancelled"


@register
class DigestMismatch(BlobchainError):
    code = "digest_mismatch"

    def __init__(self, message: str, *, expected: str = "", got: str = "", **details: Any) -> None:
        super().__init__(message, expected=expected, got=got, **details)
        self.expected = expected
        self.got = got


# --- named problems -------------------------------------------------------------------------


@register
class UnknownCompression(InvalidArgument):
    code = "unknown_compression"


@register
class InvalidLevel(InvalidArgument):
    code = "invalid_level"


@register
class UnsupportedCompression(InvalidArgument):
    """A valid compression that this layer kind cannot use (Windows layers: tar and gzip only)."""

    code = "unsupported_compression"


@register
class SnapshotNotFound(InvalidArgument):
    code = "snapshot_not_found"


@register
class SnapshotOutsideRoots(InvalidArgument):
    code = "snapshot_outside_roots"


@register
class MissingParent(InvalidArgument):
    code = "missing_parent"


@register
class ParentCycle(InvalidArgument):
    code = "parent_cycle"


@register
class ConflictingParent(InvalidArgument):
    """One ref was given two different parents (or snapshots)."""

    code = "conflicting_parent"


@register
class PathEscapes(InvalidArgument):
    """A path would leave its snapshot root (through ``..`` or a symlink)."""

    code = "path_escapes"


@register
class UnreadableFile(InvalidArgument):
    code = "unreadable_file"


@register
class UsageError(InvalidArgument):
    """The command line itself is wrong: an unknown option, a missing or malformed value."""

    code = "usage_error"


@register
class InvalidSetting(InvalidArgument):
    """A setting (``BLOBCHAIN_*``, the config file, or a client argument) has a bad value."""

    code = "invalid_setting"


@register
class InvalidTag(InvalidArgument):
    """An image tag that is not an OCI ref name (``org.opencontainers.image.ref.name``)."""

    code = "invalid_tag"


@register
class PathTooLong(InvalidArgument):
    """A path inside a snapshot is longer than the kernel accepts for one lookup (PATH_MAX)."""

    code = "path_too_long"


@register
class StoreOverlapsSnapshot(InvalidArgument):
    """The store or the output layout lies inside a snapshot, or a snapshot inside the store:
    the layer would contain the store's own files (and change while it is written)."""

    code = "store_overlaps_snapshot"


@register
class InvalidLayout(FailedPrecondition):
    """The output path is not a usable OCI image layout (a regular file, a corrupt or
    wrongly shaped ``index.json`` or ``oci-layout``)."""

    code = "invalid_layout"


@register
class NotWritable(FailedPrecondition):
    """The store or output path cannot be written (read-only filesystem, permissions,
    an immutable directory)."""

    code = "not_writable"


@register
class FileChanged(FailedPrecondition):
    """A file changed or vanished while the layer was being written; the tar is discarded."""

    code = "file_changed"


@register
class RefNotFound(NotFound):
    code = "ref_not_found"


@register
class StoreNotFound(NotFound):
    """No blobchain store at the given path (reading commands never create one)."""

    code = "store_not_found"


@register
class NonAddressableParent(FailedPrecondition):
    code = "non_addressable_parent"


@register
class StoreFull(Unavailable):
    code = "store_full"
    retryable = False


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def from_os_error(e: OSError, what: str) -> BlobchainError:
    """A named error for an OSError met while ``what`` (e.g. "creating the store /x"):
    full disk, read-only or immutable, not a directory, name too long; else Unavailable."""
    where = f" ({e.filename})" if e.filename else ""
    reason = f"{what}: {os.strerror(e.errno or 0) if e.errno else e}{where}"
    if e.errno in _FULL_ERRNOS:
        return StoreFull(reason, errno=e.errno)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return NotWritable(reason, errno=e.errno)
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return InvalidLayout(reason, errno=e.errno)
    if e.errno == errno.ENAMETOOLONG:
        return PathTooLong(reason, errno=e.errno)
    if e.errno == errno.ENOENT:
        return NotFound(reason, errno=e.errno)
    return Unavailable(reason, errno=e.errno)


def from_code(code: str, message: str, details: dict[str, Any] | None = None) -> BlobchainError:
    """Rebuild an error from its ``code`` (the inverse of :meth:`BlobchainError.to_dict`)."""
    cls = _CODES.get(code, BlobchainError)
    err = cls.__new__(cls)
    BlobchainError.__init__(err, message, **(details or {}))
    if isinstance(err, DigestMismatch):
        err.expected = str((details or {}).get("expected", ""))
        err.got = str((details or {}).get("got", ""))
    return err


def _rebuild(code: str, message: str, details: dict[str, Any]) -> BlobchainError:
    return from_code(code, message, details)


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in details.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "surrogateescape").encode("utf-8", "backslashreplace").decode()
        elif not isinstance(v, (str, int, float, bool, type(None), list, dict)):
            v = str(v)
        out[k] = v
    return out
