"""Opening SQLite databases the same way everywhere in the embedded store."""

from __future__ import annotations

import os
import sqlite3
import time

__all__ = ["connect"]


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
