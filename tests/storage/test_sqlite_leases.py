"""SqliteLeaseManager: the lease contract, the clock, and sharing the metadata database file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobchain.layers.records import RefSpec
from blobchain.storage.leases import MissingLease
from blobchain.storage.leases.sqlite import SqliteLeaseManager
from blobchain.storage.metadata.sqlite import SqliteMetadataStore

from .contracts import LeaseManagerContract, digest_of


@pytest.fixture
def lease_manager(tmp_path: Path) -> Iterator[SqliteLeaseManager]:
    leases = SqliteLeaseManager(tmp_path / ".blobchain" / "metadata.db")
    yield leases
    leases.close()


class TestSqliteLeaseManager(LeaseManagerContract):
    pass


def test_lease_expiry_follows_the_clock(tmp_path: Path) -> None:
    now = [1000.0]
    leases = SqliteLeaseManager(tmp_path / "m.db", clock=lambda: now[0])
    d = digest_of(b"held")
    leases.create_lease("l", 10)
    leases.add_resource("l", d)
    now[0] = 1009.0
    assert leases.live_digests() == {d}
    now[0] = 1010.0
    assert leases.live_digests() == set()
    with pytest.raises(MissingLease):
        leases.add_resource("l", d)
    # Creating another lease purges the expired one with its resources.
    leases.create_lease("other", 10)
    conn = sqlite3.connect(leases.path)
    assert conn.execute("SELECT lease_id FROM leases").fetchall() == [("other",)]
    assert conn.execute("SELECT COUNT(*) FROM lease_resources").fetchone()[0] == 0
    conn.close()
    leases.close()


def test_shares_the_metadata_database(tmp_path: Path) -> None:
    # The embedded store keeps one database file; either side may open it first.
    db = tmp_path / "metadata.db"
    leases = SqliteLeaseManager(db)
    metadata = SqliteMetadataStore(db)
    metadata.register(RefSpec("r", "/s"))
    leases.create_lease("l", 60)
    leases.add_resource("l", digest_of(b"x"))
    assert leases.live_digests() == {digest_of(b"x")}
    assert metadata.get("r") is not None
    metadata.close()
    leases.close()
