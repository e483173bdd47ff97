"""The embedded content store: an OCI image layout directory on local disk.

Layout: ``<root>/oci-layout``, ``<root>/blobs/sha256/<hex>`` (read-only files), and private state
under ``<root>/.blobchain/``: ingest temp files in ``ingest/`` (same filesystem as the blobs, so
publishing is a link), blob labels and each blob's stat fingerprint at publish in ``content.db``
(SQLite, WAL), and corrupt copies moved aside in ``quarantine/``. ``index.json`` belongs to the
exporter and is never touched here.

Publishing never replaces an existing blob: the verified temp file is hard-linked to its final
name, and EEXIST means another writer (thread or process) already published the same bytes.

Reads are verified (:mod:`blobchain.storage.content.verified`); a blob that fails is renamed into
``quarantine/`` (if the file is still the one read). The fingerprint (size, mtime, ctime, inode)
recorded when a blob was published or last verified tells ``verify(quick=True)`` whether the
file may have been written since: any write changes its ctime, which no user can set back.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from blobchain.layers.errors import (
    BlobchainError,
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreFull,
    Unavailable,
)
from blobchain.layers.records import check_digest
from blobchain.storage.content import BlobInfo, ingest_tag
from blobchain.storage.content.direct import DirectFileWriter
from blobchain.storage.content.ingest import IngestBase
from blobchain.storage.content.verified import VerifyingReader, drain_verified
from blobchain.storage.sqlite_util import ProcessConnection, is_full

__all__ = ["LocalContentStore", "LocalIngest", "layout_digests"]

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_WRITE_BUFFER = 1 << 20
_SAFE_REF = re.compile(r"[^A-Za-z0-9._-]+")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _store_full(err: OSError, what: str) -> StoreFull:
    return StoreFull(
        f"content store full while {what}: {os.strerror(err.errno or 0)} ({err.filename or ''})",
        errno=err.errno,
    )


_INGEST_PID = re.compile(r"\.p(\d+)\.[0-9a-f]{32}\.tmp$")


def _fingerprint(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalIngest(IngestBase):
    """One blob being written to a temp file under ``.blobchain/ingest/``; hashes as bytes arrive."""

    def __init__(self, store: LocalContentStore, ref: str) -> None:
        super().__init__(ref)
        self._store = store
        # The writer's pid is in the name so orphans of dead writers can be swept at once, and
        # the ref's tag so a new holder of the ref can drop a dead holder's ingests.
        name = f"{_SAFE_REF.sub('_', ref)[:40]}.{ingest_tag(ref)}.p{os.getpid()}.{uuid.uuid4().hex}.tmp"
        self.path = store.ingest_dir / name
        # 0666 less the umask, as containerd creates ingest data; publishing drops the write bits.
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        # Big blobs bypass the page cache (storage/content/direct.py: a third of the CPU of a
        # large layer went to buffered writes); the bytes on disk are the same either way.
        self._writer = DirectFileWriter(self._fd, direct=store.direct_writes)

    def _write(self, data: memoryview) -> None:
        assert self._fd is not None
        try:
            self._writer.write(data)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise _store_full(e, f"writing ingest {self.ref!r}") from e
            raise

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _publish(self, digest: str, labels: dict[str, str]) -> BlobInfo:
        assert self._fd is not None
        try:
            self._writer.finish()
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise _store_full(e, f"flushing ingest {self.ref!r}") from e
            raise
        finally:
            self._close_fd()
        self._store._publish(self.path, digest)
        self._remove_temp()
        if labels:
            return self._store.set_labels(digest, labels)
        info = self._store.info(digest)
        if info is None:  # deleted between publish and here (a racing GC); report what we published
            return BlobInfo(digest, self._offset, {})
        return info

    def _discard(self) -> None:
        if self._fd is not None:
            self._writer.abandon()  # a full disk here is irrelevant, the file is going away
            self._close_fd()
        self._remove_temp()

    def _remove_temp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _LabelDB:
    """Blob labels in ``content.db``; one connection per process, serialized by a lock."""

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._db = ProcessConnection(
            path,
            busy_timeout_s,
            lambda conn: conn.executescript(
                "CREATE TABLE IF NOT EXISTS labels (digest TEXT NOT NULL, key TEXT NOT NULL,"
                " value TEXT NOT NULL, PRIMARY KEY (digest, key)) WITHOUT ROWID;"
                "CREATE TABLE IF NOT EXISTS fingerprints (digest TEXT PRIMARY KEY,"
                " fingerprint TEXT NOT NULL) WITHOUT ROWID;"
            ),
        )

    def _connection(self) -> sqlite3.Connection:
        return self._db.get()

    def get(self, digest: str) -> dict[str, str]:
        with self._lock:
            try:
                rows = self._connection().execute(
                    "SELECT key, value FROM labels WHERE digest = ? ORDER BY key", (digest,)
                )
                return dict(rows.fetchall())
            except sqlite3.Error as e:
                raise self._map(e) from e

    def merge(self, digest: str, labels: Mapping[str, str]) -> None:
        self._write(
            "INSERT INTO labels (digest, key, value) VALUES (?, ?, ?)"
            " ON CONFLICT (digest, key) DO UPDATE SET value = excluded.value",
            [(digest, str(k), str(v)) for k, v in labels.items()],
        )

    def forget(self, digest: str) -> None:
        self._write("DELETE FROM labels WHERE digest = ?", [(digest,)])
        self.forget_fingerprint(digest)

    def fingerprint(self, digest: str) -> str | None:
        with self._lock:
            try:
                row = (
                    self._connection()
                    .execute("SELECT fingerprint FROM fingerprints WHERE digest = ?", (digest,))
                    .fetchone()
                )
            except sqlite3.Error as e:
                raise self._map(e) from e
        return None if row is None else str(row[0])

    def set_fingerprint(self, digest: str, fingerprint: str) -> None:
        self._write(
            "INSERT INTO fingerprints (digest, fingerprint) VALUES (?, ?)"
            " ON CONFLICT (digest) DO UPDATE SET fingerprint = excluded.fingerprint",
            [(digest, fingerprint)],
        )

    def forget_fingerprint(self, digest: str) -> None:
        self._write("DELETE FROM fingerprints WHERE digest = ?", [(digest,)])

    def _write(self, sql: str, rows: list[tuple[str, ...]]) -> None:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(sql, rows)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise self._map(e) from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _map(self, e: sqlite3.Error) -> BlobchainError:
        if is_full(e, self._path):
            return StoreFull(f"content label database full: {e}", path=str(self._path))
        return Unavailable(f"content label database error: {e}", path=str(self._path))


class LocalContentStore:
    """A :class:`~blobchain.storage.content.ContentStore` over an OCI image layout directory."""

    cheap_labels = True  # a row in .blobchain/content.db

    def __init__(
        self, root: str | os.PathLike[str], *, busy_timeout_s: float = 30.0, direct_writes: bool = True
    ) -> None:
        self.root = Path(root)
        # Ingests write big blobs with O_DIRECT where the filesystem allows (storage/content/direct.py).
        self.direct_writes = direct_writes
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.state_dir = self.root / ".blobchain"
        self.ingest_dir = self.state_dir / "ingest"
        self.quarantine_dir = self.state_dir / "quarantine"
        for d in (self.blobs_dir, self.ingest_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._write_layout_marker()
        self._labels = _LabelDB(self.state_dir / "content.db", busy_timeout_s)

    def __repr__(self) -> str:
        return f"LocalContentStore({str(self.root)!r})"

    @property
    def layout_root(self) -> str:
        return str(self.root)

    def _write_layout_marker(self) -> None:
        marker = self.root / "oci-layout"
        if marker.exists():
            return
        tmp = self.state_dir / f"oci-layout.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_text(json.dumps(OCI_LAYOUT, separators=(",", ":")))
            os.replace(tmp, marker)  # concurrent initialisers write identical bytes
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # a full disk must not leave the temp file behind
            raise

    # --- paths --------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob lives; ``digest`` is validated so it cannot name anything else."""
        return self.blobs_dir / check_digest(digest).removeprefix("sha256:")

    # --- ContentStore -------------------------------------------------------------------------

    def ingest(self, ref: str) -> LocalIngest:
        try:
            return LocalIngest(self, ref)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise _store_full(e, f"creating ingest {ref!r}") from e
            raise

    def info(self, digest: str) -> BlobInfo | None:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return None
        return BlobInfo(digest, st.st_size, self._labels.get(digest), created=st.st_mtime)

    def open(self, digest: str, offset: int = 0, *, quarantine: bool = True) -> BinaryIO:
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found", digest=digest) from None
        raw = io.FileIO(fd, "rb")
        st = os.fstat(fd)

        def bad_copy(err: DigestMismatch) -> str | None:
            return self._quarantine_if(digest, st, err.message)

        reader = VerifyingReader(
            raw,
            digest,
            size=st.st_size,
            where=f"blob {path}",
            on_mismatch=bad_copy if quarantine else None,
            skip=offset,
        )
        return io.BufferedReader(reader, buffer_size=_WRITE_BUFFER)

    def verify(self, digest: str, *, quick: bool = False, quarantine: bool = True) -> BlobInfo | None:
        path = self.blob_path(digest)
        if quick:
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            if self._labels.fingerprint(digest) == _fingerprint(st):
                return BlobInfo(digest, st.st_size, self._labels.get(digest), created=st.st_mtime)
        try:
            before = path.stat()
        except FileNotFoundError:
            return None
        info = drain_verified(self, digest, quarantine=quarantine)
        if info is not None:
            with contextlib.suppress(FileNotFoundError):
                after = path.stat()
                if _fingerprint(after) == _fingerprint(before):  # not written while we read it
                    self._labels.set_fingerprint(digest, _fingerprint(after))
        return info

    def quarantine(self, digest: str, *, reason: str = "") -> str | None:
        return self._quarantine_if(digest, None, reason)

    def quarantined(self) -> Iterator[str]:
        try:
            entries = sorted(
                (
                    e
                    for e in os.scandir(self.quarantine_dir)
                    if e.is_file(follow_symlinks=False) and not e.name.endswith(".reason")
                ),
                key=lambda e: (e.stat().st_mtime, e.name),
            )
        except FileNotFoundError:
            return iter([])
        return iter([e.path for e in entries])

    def _quarantine_if(self, digest: str, read: os.stat_result | None, reason: str) -> str | None:
        """Rename the blob into ``quarantine/`` if it is still the file that was read (``read``'s
        inode): a good copy published after the bad one was moved is never taken."""
        path = self.blob_path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if read is not None and (st.st_ino, st.st_dev) != (read.st_ino, read.st_dev):
            return None
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.quarantine_dir / f"{digest[7:]}.{stamp}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return None  # someone else moved or deleted it first
        self._labels.forget_fingerprint(digest)
        if reason:
            with contextlib.suppress(OSError):
                dest.with_name(dest.name + ".reason").write_text(reason + "\n")
        with contextlib.suppress(OSError):
            _fsync_dir(self.blobs_dir)
        return str(dest)

    def delete(self, digest: str) -> bool:
        try:
            os.unlink(self.blob_path(digest))
        except FileNotFoundError:
            return False
        # Labels go after the blob: a crash in between leaves stale rows, which are still true
        # of the same digest if it is ever written again.
        self._labels.forget(digest)
        return True

    def list_digests(self) -> Iterator[str]:
        names = sorted(e.name for e in os.scandir(self.blobs_dir) if _HEX64.match(e.name))
        return iter(["sha256:" + n for n in names])

    def set_labels(self, digest: str, labels: Mapping[str, str]) -> BlobInfo:
        if not self.blob_path(digest).exists():
            raise NotFound(f"blob {digest} not found", digest=digest)
        if labels:
            self._labels.merge(digest, labels)
        info = self.info(digest)
        if info is None:
            raise NotFound(f"blob {digest} not found", digest=digest)
        return info

    def sweep(self, older_than_s: float, *, ref: str | None = None) -> int:
        cutoff = time.time() - older_than_s
        tag = None if ref is None else f".{ingest_tag(ref)}.p"
        removed = 0
        for entry in os.scandir(self.ingest_dir):
            if tag is not None and tag not in entry.name:
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue  # its writer finished or aborted meanwhile
        return removed

    def sweep_orphans(self) -> int:
        """Remove ingest temp files whose writing process no longer exists (killed mid-write)."""
        removed = 0
        for entry in os.scandir(self.ingest_dir):
            m = _INGEST_PID.search(entry.name)
            if m is None or _alive(int(m.group(1))):
                continue
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    def pinned(self) -> set[str]:
        """Everything the layout's ``index.json`` reaches: exported images survive GC."""
        return layout_digests(self)

    def close(self) -> None:
        self._labels.close()

    # --- internals ----------------------------------------------------------------------------

    def _publish(self, tmp: Path, digest: str) -> None:
        """Make the fully written, fsynced ``tmp`` visible as ``digest`` without replacing anything."""
        final = self.blob_path(digest)
        try:
            # Read-only, honouring the umask the file was created under (containerd: mode &^ 0333).
            os.chmod(tmp, stat.S_IMODE(os.stat(tmp).st_mode) & ~0o333)
            os.link(tmp, final)
            # Drop the temp name now: unlinking changes the inode's ctime, and the fingerprint
            # taken below must be the blob's lasting one (else every quick verify re-reads it).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        except FileExistsError:
            # Same digest: keep the existing blob; refresh its age for GC grace. Its fingerprint
            # follows only if it was intact-as-recorded before (a touch must not launder a
            # damaged copy into a trusted one).
            with contextlib.suppress(OSError):
                trusted = self._labels.fingerprint(digest) == _fingerprint(final.stat())
                os.utime(final)
                if trusted:
                    self._labels.set_fingerprint(digest, _fingerprint(final.stat()))
            return
        except FileNotFoundError:
            raise FailedPrecondition(
                f"ingest temp file {tmp} vanished before commit (swept?)", path=str(tmp), digest=digest
            ) from None
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise _store_full(e, f"publishing {digest}") from e
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # No hard links here: a rename is still atomic and replacing identical bytes is harmless.
            if final.exists():
                return
            os.rename(tmp, final)
        try:
            _fsync_dir(self.blobs_dir)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise _store_full(e, f"syncing {self.blobs_dir}") from e
            raise
        with contextlib.suppress(FileNotFoundError):
            self._labels.set_fingerprint(digest, _fingerprint(final.stat()))


# Descriptors worth opening to follow further (everything else is a leaf: config, layer, ...).
_TRAVERSABLE = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)


def layout_digests(store: LocalContentStore) -> set[str]:
    """Digests reachable from the layout's ``index.json`` (empty if there is none).

    An unreadable index or manifest raises FailedPrecondition: deleting without knowing what the
    exported images need would be worse than not collecting.
    """
    index_path = store.root / "index.json"
    try:
        index = _json_doc(index_path.read_bytes(), str(index_path))
    except FileNotFoundError:
        return set()
    seen: set[str] = set()
    stack: list[Any] = list(_children(index, str(index_path)))
    while stack:
        desc = stack.pop()
        if not isinstance(desc, dict):
            continue
        raw = desc.get("digest")
        try:
            digest = check_digest(raw if isinstance(raw, str) else "")
        except InvalidArgument:
            continue  # another algorithm, or junk: nothing our store could hold
        if digest in seen:
            continue
        seen.add(digest)
        if desc.get("mediaType") not in _TRAVERSABLE:
            continue
        try:
            with store.open(digest) as f:
                doc = _json_doc(f.read(), digest)
        except NotFound:
            continue  # the layout points at a blob it lacks; nothing below it to keep
        stack.extend(_children(doc, digest))
    return seen


def _json_doc(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise FailedPrecondition(
            f"cannot collect garbage: {where} is not valid JSON ({e})", path=where
        ) from e
    if not isinstance(doc, dict):
        raise FailedPrecondition(f"cannot collect garbage: {where} is not a JSON object", path=where)
    return doc


def _children(doc: dict[str, Any], where: str) -> list[Any]:
    out: list[Any] = []
    for key in ("manifests", "layers", "blobs"):
        items = doc.get(key)
        if isinstance(items, list):
            out.extend(items)
    for key in ("config", "subject"):
        if isinstance(doc.get(key), dict):
            out.append(doc[key])
    return out
