"""The embedded metadata store: one SQLite file holding ref records and manifests (GC leases
share the file: :mod:`blobchain.storage.leases.sqlite`).

WAL journal with ``synchronous=FULL``, so a crash leaves either no record or a whole one. Every
write is a single ``BEGIN IMMEDIATE`` transaction that reads, checks the rules of
:mod:`blobchain.storage.metadata` and writes, so concurrent threads and processes serialize on the
database lock (waiting up to the busy timeout) and never interleave a read-modify-write.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blobchain.layers.errors import (
    BlobchainError,
    FailedPrecondition,
    RefNotFound,
    StoreFull,
    Unavailable,
)
from blobchain.layers.records import LayerBlob, RefRecord, RefSpec
from blobchain.storage.metadata.base import MetadataBase
from blobchain.storage.sqlite_util import ProcessConnection, is_full, transaction

__all__ = ["SCHEMA_VERSION", "SqliteMetadataStore"]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE refs (
    ref_id        TEXT PRIMARY KEY,
    snapshot      TEXT NOT NULL,
    parent        TEXT,
    kind          TEXT NOT NULL,
    layer_type    TEXT NOT NULL,
    blob          TEXT,              -- main LayerBlob as JSON, NULL until the first set_blob
    blob_digest   TEXT,
    chain_id      TEXT,
    blob_chain_id TEXT
);
CREATE INDEX refs_blob_digest ON refs (blob_digest);
CREATE TABLE variants (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,  -- keeps insertion order
    ref_id  TEXT NOT NULL REFERENCES refs (ref_id),
    variant TEXT NOT NULL,
    digest  TEXT NOT NULL,
    blob    TEXT NOT NULL,
    UNIQUE (ref_id, variant)
);
CREATE TABLE manifest_blobs (
    name   TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (name, digest)
) WITHOUT ROWID;
"""

# Version 2: digests of a ref's blobs found corrupt, until rebuilt or re-verified.
_SCHEMA_V2 = """
CREATE TABLE damaged (
    ref_id TEXT NOT NULL REFERENCES refs (ref_id),
    digest TEXT NOT NULL,
    PRIMARY KEY (ref_id, digest)
) WITHOUT ROWID;
"""


def _blob_json(blob: LayerBlob) -> str:
    return json.dumps(blob.to_dict(), sort_keys=True, separators=(",", ":"))


class SqliteMetadataStore(MetadataBase):
    """MetadataStore in one SQLite file (thread- and process-safe).

    The fencing ``token`` of the contract is accepted and ignored: local locks are kernel-held, and the
    records are written under the same rules either way.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = ProcessConnection(
            self.path, busy_timeout_s, lambda conn: conn.execute("PRAGMA foreign_keys=ON")
        )
        self._init_schema()

    def __repr__(self) -> str:
        return f"SqliteMetadataStore({str(self.path)!r})"

    # --- connection and transactions ----------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        # One connection per process (reopened after fork), used under self._lock.
        try:
            return self._db.get()
        except sqlite3.Error as e:
            raise self._map(e) from e

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                conn = self._connection()
            except sqlite3.Error as e:
                raise self._map(e) from e
            with transaction(conn, write=write, map_error=self._map) as tx:
                yield tx

    def _map(self, e: sqlite3.Error) -> BlobchainError:
        if is_full(e, self.path):
            return StoreFull(f"metadata database full: {e}", path=str(self.path))
        return Unavailable(f"metadata database error: {e}", path=str(self.path))

    def _init_schema(self) -> None:
        with self._tx(write=True) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                steps = [_SCHEMA, _SCHEMA_V2][version:]
                for stmt in ";".join(steps).split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"{self.path} has schema version {version}, newer than this blobchain ({SCHEMA_VERSION})",
                    path=str(self.path),
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- records ------------------------------------------------------------------------------

    @staticmethod
    def _load(conn: sqlite3.Connection, ref_id: str) -> RefRecord | None:
        row = conn.execute(
            "SELECT ref_id, snapshot, parent, kind, layer_type, blob, chain_id, blob_chain_id"
            " FROM refs WHERE ref_id = ?",
            (ref_id,),
        ).fetchone()
        if row is None:
            return None
        variants = conn.execute(
            "SELECT blob FROM variants WHERE ref_id = ? ORDER BY id", (ref_id,)
        ).fetchall()
        damaged = conn.execute(
            "SELECT digest FROM damaged WHERE ref_id = ? ORDER BY digest", (ref_id,)
        ).fetchall()
        return SqliteMetadataStore._record(row, [v[0] for v in variants], [d[0] for d in damaged])

    @staticmethod
    def _record(
        row: tuple[str | None, ...], variants: list[str], damaged: list[str] | None = None
    ) -> RefRecord:
        ref_id, snapshot, parent, kind, layer_type, blob, chain, blob_chain = row
        assert ref_id is not None and snapshot is not None and kind is not None and layer_type is not None
        return RefRecord(
            spec=RefSpec(ref_id=ref_id, snapshot=snapshot, parent=parent, kind=kind, layer_type=layer_type),
            blob=LayerBlob.from_dict(json.loads(blob)) if blob else None,
            chain_id=chain,
            blob_chain_id=blob_chain,
            variants=tuple(LayerBlob.from_dict(json.loads(v)) for v in variants),
            damaged=tuple(damaged or ()),
        )

    def _require(self, conn: sqlite3.Connection, ref_id: str) -> RefRecord:
        rec = self._load(conn, ref_id)
        if rec is None:
            raise RefNotFound(f"ref {ref_id} not found", ref=ref_id)
        return rec

    def get(self, ref_id: str) -> RefRecord | None:
        with self._tx(write=False) as conn:
            return self._load(conn, ref_id)

    def chain_specs(self, ref_id: str) -> dict[str, RefSpec]:
        out: dict[str, RefSpec] = {}
        with self._tx(write=False) as conn:
            cur: str | None = ref_id
            while cur is not None and cur not in out:
                row = conn.execute(
                    "SELECT snapshot, parent, kind, layer_type FROM refs WHERE ref_id = ?", (cur,)
                ).fetchone()
                if row is None:
                    break
                out[cur] = RefSpec(ref_id=cur, snapshot=row[0], parent=row[1], kind=row[2], layer_type=row[3])
                cur = row[1]
        return out

    def _register(self, spec: RefSpec) -> tuple[RefRecord | None, RefSpec | None]:
        with self._tx(write=True) as conn:
            rec = self._load(conn, spec.ref_id)
            if rec is not None:
                return rec, (rec.spec if rec.spec != spec else None)
            conn.execute(
                "INSERT INTO refs (ref_id, snapshot, parent, kind, layer_type) VALUES (?, ?, ?, ?, ?)",
                (spec.ref_id, spec.snapshot, spec.parent, spec.kind, spec.layer_type),
            )
            return RefRecord(spec=spec), None

    def _set_blob(
        self, ref_id: str, blob: LayerBlob, token: str | None, claim_key: str | None, release: bool
    ) -> tuple[RefRecord | None, str | None]:
        with self._tx(write=True) as conn:
            rec = self._require(conn, ref_id)
            if blob.digest in rec.damaged:  # the rebuild of a corrupt blob
                conn.execute("DELETE FROM damaged WHERE ref_id = ? AND digest = ?", (ref_id, blob.digest))
                rec = self._require(conn, ref_id)
            if rec.diff_id is not None and rec.diff_id != blob.diff_id:
                return rec, rec.diff_id
            new = rec.with_blob(blob)
            if new is rec:
                return rec, None
            if rec.blob is None:
                conn.execute(
                    "UPDATE refs SET blob = ?, blob_digest = ? WHERE ref_id = ?",
                    (_blob_json(blob), blob.digest, ref_id),
                )
            else:
                conn.execute(
                    "INSERT INTO variants (ref_id, variant, digest, blob) VALUES (?, ?, ?, ?)",
                    (ref_id, blob.variant, blob.digest, _blob_json(blob)),
                )
            return new, None

    def _set_chain(
        self,
        ref_id: str,
        chain_id: str,
        blob_chain_id: str,
        token: str | None,
        claim_key: str | None,
        release: bool,
    ) -> RefRecord:
        with self._tx(write=True) as conn:
            rec = self._require(conn, ref_id)
            if rec.chain_id is not None:
                return rec  # never overwritten: the first writer's values stand
            conn.execute(
                "UPDATE refs SET chain_id = ?, blob_chain_id = ? WHERE ref_id = ?",
                (chain_id, blob_chain_id, ref_id),
            )
            return self._require(conn, ref_id)

    def _damaged(self, ref_id: str, digest: str, mark: bool) -> RefRecord:
        with self._tx(write=True) as conn:
            self._require(conn, ref_id)
            if mark:
                conn.execute("INSERT OR IGNORE INTO damaged (ref_id, digest) VALUES (?, ?)", (ref_id, digest))
            else:
                conn.execute("DELETE FROM damaged WHERE ref_id = ? AND digest = ?", (ref_id, digest))
            return self._require(conn, ref_id)

    def list_refs(self) -> Iterator[RefRecord]:
        # Read everything in one transaction (a consistent view), then yield without holding it.
        with self._tx(write=False) as conn:
            rows = conn.execute(
                "SELECT ref_id, snapshot, parent, kind, layer_type, blob, chain_id, blob_chain_id"
                " FROM refs ORDER BY rowid"
            ).fetchall()
            variants: dict[str, list[str]] = {}
            for ref_id, blob in conn.execute("SELECT ref_id, blob FROM variants ORDER BY id"):
                variants.setdefault(ref_id, []).append(blob)
            damaged: dict[str, list[str]] = {}
            for ref_id, digest in conn.execute("SELECT ref_id, digest FROM damaged ORDER BY digest"):
                damaged.setdefault(ref_id, []).append(digest)
        return iter(
            [self._record(row, variants.get(row[0], []), damaged.get(row[0], [])) for row in rows]
        )

    # --- manifests ----------------------------------------------------------------------------

    def _put_manifest(self, name: str, checked: list[str]) -> None:
        with self._tx(write=True) as conn:
            conn.execute("DELETE FROM manifest_blobs WHERE name = ?", (name,))
            conn.executemany(
                "INSERT INTO manifest_blobs (name, digest) VALUES (?, ?)", [(name, d) for d in checked]
            )

    def manifest_digests(self) -> set[str]:
        with self._tx(write=False) as conn:
            return {d for (d,) in conn.execute("SELECT DISTINCT digest FROM manifest_blobs")}
