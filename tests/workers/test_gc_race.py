"""GC against builds that commit (issue 6, defect 9), on the local layout and on S3: a blob is on
its build's lease before the ingest publishes it, and the grace period works on every store."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blobchain.layers.records import LayerOptions, RefSpec
from blobchain.storage.claims.local import LocalClaimService
from blobchain.storage.content import BlobInfo, ContentStore
from blobchain.storage.content.local import LocalContentStore
from blobchain.storage.content.s3 import S3ContentStore
from blobchain.storage.deps import Deps
from blobchain.storage.gc import collect_garbage
from blobchain.storage.leases.sqlite import SqliteLeaseManager
from blobchain.storage.metadata.sqlite import SqliteMetadataStore
from blobchain.workers.refjob import build_ref


@pytest.fixture(params=["local", "s3"])
def content(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ContentStore]:
    if request.param == "local":
        store = LocalContentStore(tmp_path / "layout")
        yield store
        store.close()
    else:
        yield S3ContentStore(
            request.getfixturevalue("s3_client"),
            request.getfixturevalue("s3_bucket"),
            request.getfixturevalue("s3_prefix"),
            part_size=5 << 20,
        )


@pytest.fixture
def metadata(tmp_path: Path) -> Iterator[SqliteMetadataStore]:
    meta = SqliteMetadataStore(tmp_path / "state" / "metadata.db")
    yield meta
    meta.close()


def _deps(content: Any, metadata: SqliteMetadataStore, tmp_path: Path) -> Deps:
    claims = LocalClaimService(str(tmp_path / "state"))
    return Deps(content=content, metadata=metadata, leases=SqliteLeaseManager(metadata.path), claims=claims, threads=1)


def _refs(tmp_path: Path, metadata: SqliteMetadataStore, n: int) -> list[str]:
    ids = []
    for i in range(n):
        snap = tmp_path / "snaps" / f"s{i}"
        (snap / "etc").mkdir(parents=True)
        (snap / "etc" / "hostname").write_text(f"host {i}\n")
        (snap / "data").write_bytes(os.urandom(20_000 + i))
        metadata.register(RefSpec(f"r{i}", str(snap)))
        ids.append(f"r{i}")
    return ids


class _GCRightAfterPublish:
    """The store, with a whole GC run (no grace) right after each commit publishes: the worst
    moment, between a blob becoming visible and its record being written."""

    def __init__(self, store: ContentStore, metadata: SqliteMetadataStore) -> None:
        self._store = store
        self._metadata = metadata
        self.collected: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def ingest(self, ref: str) -> Any:
        outer = self
        ing = self._store.ingest(ref)

        class _Ingest:
            def __getattr__(self, name: str) -> Any:
                return getattr(ing, name)

            def __enter__(self) -> Any:
                return self

            def __exit__(self, *exc: object) -> None:
                ing.__exit__(*exc)

            def commit(self, **kw: Any) -> BlobInfo:
                info = ing.commit(**kw)
                outer.collected += collect_garbage(outer._store, outer._metadata, SqliteLeaseManager(outer._metadata.path), grace_s=0).deleted
                return info

        return _Ingest()


def test_gc_between_publish_and_record_keeps_the_blob(
    content: ContentStore, metadata: SqliteMetadataStore, tmp_path: Path
) -> None:
    store = _GCRightAfterPublish(content, metadata)
    deps = _deps(store, metadata, tmp_path)
    for ref in _refs(tmp_path, metadata, 3):
        rec = build_ref(ref, LayerOptions(), deps).record
        assert rec.blob is not None
        assert content.info(rec.blob.digest) is not None, f"GC took {ref}'s blob before its record"
        # A forced second variant goes through the convert path: same rule.
        conv = build_ref(ref, LayerOptions(compression="zstd"), deps, force=True).record
        zstd = conv.blob_for(LayerOptions(compression="zstd"))
        assert zstd is not None and content.info(zstd.digest) is not None
    assert store.collected == []


def test_gc_in_a_loop_while_builds_commit(
    content: ContentStore, metadata: SqliteMetadataStore, tmp_path: Path
) -> None:
    refs = _refs(tmp_path, metadata, 12)
    deps = _deps(content, metadata, tmp_path)
    stop = threading.Event()
    runs: list[int] = []
    errors: list[BaseException] = []

    def collect() -> None:
        while not stop.is_set():
            try:
                collect_garbage(content, metadata, SqliteLeaseManager(metadata.path), grace_s=0)
                runs.append(1)
            except BaseException as e:  # reported below
                errors.append(e)
                return

    gc_thread = threading.Thread(target=collect, daemon=True)
    gc_thread.start()
    try:
        results = {}
        for ref in refs:
            results[ref] = build_ref(ref, LayerOptions(), deps).record
    finally:
        stop.set()
        gc_thread.join(60)
    assert not errors, errors
    assert runs, "GC never ran"
    for ref, rec in results.items():
        assert rec.blob is not None and content.info(rec.blob.digest) is not None, ref
    # Recorded blobs are roots; one more collection keeps all of them.
    collect_garbage(content, metadata, SqliteLeaseManager(metadata.path), grace_s=0)
    assert {r.blob.digest for r in results.values() if r.blob} <= set(content.list_digests())


def test_grace_period_spares_young_blobs_on_every_store(
    content: ContentStore, metadata: SqliteMetadataStore
) -> None:
    with content.ingest("orphan") as ing:
        ing.write(b"nobody refers to me")
        digest = ing.commit().digest
    info = content.info(digest)
    assert info is not None and info.created is not None
    report = collect_garbage(content, metadata, SqliteLeaseManager(metadata.path), grace_s=3600)
    assert digest not in report.deleted and content.info(digest) is not None
    report = collect_garbage(content, metadata, SqliteLeaseManager(metadata.path), grace_s=0)
    assert report.deleted == [digest] and content.info(digest) is None
