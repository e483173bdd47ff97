"""Embedded GC leases: two tables in the store's SQLite database (``.blobchain/metadata.db``),
beside the ref records but with a connection and transactions of their own."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from blobchain.layers.errors import StoreFull, Unavailable
from blobchain.storage.leases import LeaseBase
from blobchain.storage.sqlite_util import ProcessConnection, is_full, transaction

__all__ = ["SqliteLeaseManager"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id   TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expires_at ON leases (expires_at);
CREATE TABLE IF NOT EXISTS lease_resources (
    lease_id TEXT NOT NULL REFERENCES leases (lease_id) ON DELETE CASCADE,
    digest   TEXT NOT NULL,
    PRIMARY KEY (lease_id, digest)
) WITHOUT ROWID;
"""


class SqliteLeaseManager(LeaseBase):
    """:class:`~blobchain.storage.leases.LeaseManager` in a SQLite file (thread- and
    process-safe). ``clock`` gives lease times (wall clock by default, shared across processes)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.RLock()
        self._db = ProcessConnection(
            self.path, busy_timeout_s, lambda conn: conn.execute("PRAGMA foreign_keys=ON")
        )
        with self._tx() as conn:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)

    def __repr__(self) -> str:
        return f"SqliteLeaseManager({str(self.path)!r})"

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                conn = self._db.get()
            except sqlite3.Error as e:
                raise self._map(e) from e
            with transaction(conn, write=write, map_error=self._map) as tx:
                yield tx

    def _map(self, e: sqlite3.Error) -> StoreFull | Unavailable:
        if is_full(e, self.path):
            return StoreFull(f"lease database full: {e}", path=str(self.path))
        return Unavailable(f"lease database error: {e}", path=str(self.path))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _create(self, lease_id: str, ttl_s: float) -> None:
        now = self._clock()
        with self._tx() as conn:
            # Expired leases protect nothing; dropping them here keeps the table small.
            conn.execute("DELETE FROM leases WHERE expires_at <= ? AND lease_id != ?", (now, lease_id))
            conn.execute(
                "INSERT INTO leases (lease_id, expires_at) VALUES (?, ?)"
                " ON CONFLICT (lease_id) DO UPDATE SET expires_at = excluded.expires_at",
                (lease_id, now + ttl_s),
            )

    def _add(self, lease_id: str, digest: str) -> bool:
        with self._tx() as conn:
            row = conn.execute("SELECT expires_at FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
            if row is None or row[0] <= self._clock():
                return False
            conn.execute(
                "INSERT OR IGNORE INTO lease_resources (lease_id, digest) VALUES (?, ?)", (lease_id, digest)
            )
            return True

    def _delete(self, lease_id: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM lease_resources WHERE lease_id = ?", (lease_id,))
            conn.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,))

    def _live(self) -> set[str]:
        with self._tx(write=False) as conn:
            rows = conn.execute(
                "SELECT DISTINCT r.digest FROM lease_resources r JOIN leases l ON l.lease_id = r.lease_id"
                " WHERE l.expires_at > ?",
                (self._clock(),),
            )
            return {d for (d,) in rows}
