"""Opening SQLite databases the same way everywhere in the embedded store."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["ProcessConnection", "connect", "is_full"]

_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_CANTOPEN = 14
# Less room than this on the database's filesystem: an I/O error there is the disk being full.
_LOW_SPACE = 1 << 20


def is_full(e: sqlite3.Error, path: str | os.PathLike[str]) -> bool:
    """Whether ``e`` means the disk holding ``path`` is full. SQLite reports ENOSPC as
    SQLITE_FULL only on some paths; on others (a WAL or journal write, opening the database)
    it says "disk I/O error" or "unable to open", so those count as full when the filesystem
    has (almost) no room left."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:
        return False
    if code & 0xFF == _SQLITE_FULL:
        return True
    if code & 0xFF not in (_SQLITE_IOERR, _SQLITE_CANTOPEN):
        return False
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _LOW_SPACE or st.f_favail == 0


# Connections inherited through fork() are kept, never closed: closing one in the child could
# disturb the parent's SQLite locks. (Fork only without other threads running.)
_INHERITED: list[sqlite3.Connection] = []


def connect(path: str | os.PathLike[str], timeout_s: float) -> sqlite3.Connection:
    """A connection in WAL mode with ``synchronous=FULL`` (a crash leaves whole transactions only).

    Switching to WAL needs a moment of exclusive access, and SQLite may answer "database is
    locked" at once (without the busy handler) while another process does the same, so retry.
    """
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    try:
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        raise
    return conn


class ProcessConnection:
    """One connection per process, opened on first use and again in a forked child (a SQLite
    connection must not cross ``fork()``). Callers serialise its use with their own lock."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout_s: float,
        setup: Callable[[sqlite3.Connection], object] | None = None,
    ) -> None:
        self._path = path
        self._timeout = timeout_s
        self._setup = setup
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def get(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:
                _INHERITED.append(self._conn)
                self._conn = None
            conn = connect(self._path, self._timeout)
            try:
                if self._setup is not None:
                    self._setup(conn)
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        elif self._conn is not None:
            _INHERITED.append(self._conn)
        self._conn = None


@contextmanager
def transaction(
    conn: sqlite3.Connection, *, write: bool, map_error: Callable[[sqlite3.Error], Exception]
) -> Iterator[sqlite3.Connection]:
    """One transaction on ``conn`` (``BEGIN IMMEDIATE`` for a write, so the write lock is taken
    before anything is read): committed on success, rolled back on any exception, and every
    sqlite3 error raised as ``map_error``'s named error. The caller holds its connection lock."""
    try:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    except sqlite3.Error as e:
        raise map_error(e) from e
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(e, sqlite3.Error):
            raise map_error(e) from e
        raise
