"""SqliteMetadataStore: the conformance suites plus schema, durability and multi-process behaviour."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobchain.layers.errors import FailedPrecondition, StoreFull
from blobchain.layers.records import RefSpec
from blobchain.storage.metadata.sqlite import SCHEMA_VERSION, SqliteMetadataStore

from . import expect_line, spawn_python, tmpfs
from .contracts import MetadataStoreContract, digest_of, layer_blob


@pytest.fixture
def metadata_store(tmp_path: Path) -> Iterator[SqliteMetadataStore]:
    store = SqliteMetadataStore(tmp_path / ".blobchain" / "metadata.db")
    yield store
    store.close()


class TestSqliteMetadataStore(MetadataStoreContract):
    pass


def test_database_settings(metadata_store: SqliteMetadataStore) -> None:
    conn = sqlite3.connect(metadata_store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"refs", "variants", "manifest_blobs", "damaged"} <= tables
    finally:
        conn.close()


def test_records_persist_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    a = SqliteMetadataStore(path)
    a.register(RefSpec("r", "/s"))
    a.set_blob("r", layer_blob(1))
    a.set_blob("r", layer_blob(1, "zstd-3"))
    a.set_chain("r", digest_of(b"c"), digest_of(b"b"))
    a.put_manifest("m", [digest_of(b"m")])
    expected = a.get("r")
    a.close()
    b = SqliteMetadataStore(path)
    assert b.get("r") == expected
    assert b.manifest_digests() == {digest_of(b"m")}
    b.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    SqliteMetadataStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(FailedPrecondition, match="schema version"):
        SqliteMetadataStore(path)


def test_put_manifest_repoints_a_name(metadata_store: SqliteMetadataStore) -> None:
    metadata_store.put_manifest("img", [digest_of(b"old")])
    metadata_store.put_manifest("img", [digest_of(b"new")])
    assert metadata_store.manifest_digests() == {digest_of(b"new")}


def test_store_full_on_tiny_tmpfs(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "256k") as mnt:
        store = SqliteMetadataStore(mnt / "m.db")
        try:
            written = 0
            with pytest.raises(StoreFull):
                for i in range(10_000):
                    store.register(RefSpec(f"r{i}", "/" + "s" * 4000 + str(i)))
                    written = i + 1
            assert written > 0
            # Every committed record is intact and the failed one left nothing.
            assert [r.ref_id for r in store.list_refs()] == [f"r{i}" for i in range(written)]
            assert store.get(f"r{written}") is None
        finally:
            store.close()
        conn = sqlite3.connect(mnt / "m.db")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()


# --- processes ------------------------------------------------------------------------------------

_CHAIN_CHILD = """
import sys, hashlib
from blobchain.storage.metadata.sqlite import SqliteMetadataStore
d = lambda s: "sha256:" + hashlib.sha256(s.encode()).hexdigest()
store = SqliteMetadataStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
rec = store.set_chain("r", d("c" + sys.argv[2]), d("b" + sys.argv[2]))
print(rec.chain_id, rec.blob_chain_id, flush=True)
"""


def test_processes_race_set_chain_one_value(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = SqliteMetadataStore(path)
    store.register(RefSpec("r", "/s"))
    procs = [spawn_python(_CHAIN_CHILD, str(path), str(i)) for i in range(6)]
    for p in procs:
        expect_line(p, "ready")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.add(tuple(out.split()))
    assert len(results) == 1
    ((chain, blob_chain),) = results
    assert any(
        chain == digest_of(f"c{i}".encode()) and blob_chain == digest_of(f"b{i}".encode()) for i in range(6)
    )
    rec = store.get("r")
    assert rec is not None and (rec.chain_id, rec.blob_chain_id) == (chain, blob_chain)
    store.close()


_WRITER_CHILD = """
import sys
from blobchain.layers.records import RefSpec
from blobchain.storage.metadata.sqlite import SqliteMetadataStore
import importlib.util
spec = importlib.util.spec_from_file_location("contracts", sys.argv[2])
contracts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(contracts)
digest_of, layer_blob = contracts.digest_of, contracts.layer_blob
store = SqliteMetadataStore(sys.argv[1])
i = 0
while True:
    ref = f"r{i}"
    store.register(RefSpec(ref, f"/snap/{i}", parent=f"r{i - 1}" if i else None))
    store.set_blob(ref, layer_blob(i, "gzip-6"))
    store.set_blob(ref, layer_blob(i, "zstd-3"))
    store.set_chain(ref, digest_of(f"c{i}".encode()), digest_of(f"b{i}".encode()))
    if i == 20:
        print("busy", flush=True)
    i += 1
"""


def test_sigkill_mid_writes_leaves_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    contracts_py = str(Path(__file__).with_name("contracts.py"))
    proc = spawn_python(_WRITER_CHILD, str(path), contracts_py)
    expect_line(proc, "busy")
    # The child writes back to back (most of its time is inside a transaction's fsync); a random
    # pause lets the kill land at a different step each run.
    time.sleep(random.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    store = SqliteMetadataStore(path)
    recs = list(store.list_refs())
    assert len(recs) > 20
    for n, rec in enumerate(recs):
        # Registration order is kept and every record holds whole values or none at all.
        assert rec.spec == RefSpec(f"r{n}", f"/snap/{n}", parent=f"r{n - 1}" if n else None)
        assert rec.blob in (None, layer_blob(n, "gzip-6"))
        assert rec.variants in ((), (layer_blob(n, "zstd-3"),))
        assert (rec.chain_id, rec.blob_chain_id) in (
            (None, None),
            (digest_of(f"c{n}".encode()), digest_of(f"b{n}".encode())),
        )
        if n < len(recs) - 1:  # only the last ref can be mid-way
            assert rec.variants and rec.chain_id
    # The store is writable again after the crash.
    last = recs[-1].ref_id
    assert store.set_blob(last, layer_blob(len(recs) - 1, "gzip-6")).blob == layer_blob(
        len(recs) - 1, "gzip-6"
    )
    store.close()


def test_usable_in_a_forked_child_and_after(tmp_path: Path) -> None:
    store = SqliteMetadataStore(tmp_path / "m.db")
    store.register(RefSpec("a", "/a"))
    pid = os.fork()
    if pid == 0:  # the child opens its own connection; the inherited one is left alone
        code = 1
        try:
            store.register(RefSpec("b", "/b"))
            store.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.register(RefSpec("c", "/c"))
    assert [r.ref_id for r in store.list_refs()] == ["a", "b", "c"]
    store.close()
