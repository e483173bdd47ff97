"""Conformance suites for the storage contracts, reusable by every implementation.

Subclass a suite in a ``Test*`` class and provide its fixture; the suites use only the Protocol
methods of :mod:`blobchain.storage`:

- :class:`ContentStoreContract` needs ``content_store`` (an empty ContentStore) and
  ``damage_blob`` (``damage_blob(store, digest, data)`` replaces a stored blob's bytes behind the
  store's back, as a disk error or another client would);
- :class:`MetadataStoreContract` needs ``metadata_store`` (an empty MetadataStore);
- :class:`LeaseManagerContract` needs ``lease_manager`` (a LeaseManager with no leases);
- :class:`ClaimServiceContract` needs ``claim_service`` (a ClaimService with no held keys).

Example::

    class TestS3Content(ContentStoreContract):
        @pytest.fixture
        def content_store(self, s3_bucket): return S3ContentStore(...)
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from blobchain.layers.errors import (
    Conflict,
    ConflictingParent,
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RefNotFound,
)
from blobchain.layers.records import DIFF_ID_LABEL, Compression, LayerBlob, RefSpec
from blobchain.storage.claims import Claim, ClaimLost, ClaimService
from blobchain.storage.content import BlobInfo, ContentStore, Ingest
from blobchain.storage.leases import LeaseManager, MissingLease
from blobchain.storage.metadata import MetadataStore

__all__ = [
    "ContentStoreContract",
    "LeaseManagerContract",
    "ClaimServiceContract",
    "MetadataStoreContract",
    "digest_of",
    "layer_blob",
]

THREADS = 8
EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
BAD_DIGESTS = [
    "",
    "sha256:",
    "sha256:../../../../etc/passwd",
    "sha256:" + "A" * 64,
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 64 + "/",
    "sha512:" + "0" * 128,
    "../" + "0" * 64,
    "0" * 64,
]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def payload(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes (incompressible, so sizes are honest)."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def layer_blob(seed: int, variant: str = "gzip-6", *, diff_seed: int | None = None) -> LayerBlob:
    """A LayerBlob with digests derived from ``seed`` (blob) and ``diff_seed`` (diffID)."""
    comp = Compression.ZSTD if variant.startswith("zstd") else Compression.GZIP
    return LayerBlob(
        digest=digest_of(f"blob-{seed}-{variant}".encode()),
        size=1000 + seed,
        media_type=comp.media_type(),
        diff_id=digest_of(f"diff-{seed if diff_seed is None else diff_seed}".encode()),
        compression=comp,
        compressor=f"test-compressor {variant}",
        variant=variant,
    )


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released together; return results in index order."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def _commit(store: ContentStore, data: bytes, ref: str = "t", **kw: Any) -> BlobInfo:
    w = store.ingest(ref)
    for i in range(0, len(data), 65536):
        w.write(data[i : i + 65536])
    return w.commit(**kw)


def _read(store: ContentStore, digest: str) -> bytes:
    with store.open(digest) as f:
        return f.read()


def flip_byte(data: bytes, at: int | None = None) -> bytes:
    i = len(data) // 2 if at is None else at
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


DamageBlob = Callable[[ContentStore, str, bytes], None]


# --- content ------------------------------------------------------------------------------------


class ContentStoreContract:
    def test_implements_protocol(self, content_store: ContentStore) -> None:
        assert isinstance(content_store, ContentStore)
        w = content_store.ingest("proto")
        try:
            assert isinstance(w, Ingest)
        finally:
            w.abort()

    def test_capabilities_are_said_by_the_store(self, content_store: ContentStore) -> None:
        # What callers branch on (push's mount-hint labels, export into the store's own
        # directory) is on the contract, not found by the store's class.
        assert isinstance(content_store.cheap_labels, bool)
        root = content_store.layout_root
        if root is not None:
            assert os.path.isfile(os.path.join(root, "oci-layout")) and content_store.cheap_labels
            d = content_store.ingest("cap")
            d.write(b"x")
            info = d.commit()
            assert os.path.isfile(os.path.join(root, "blobs", "sha256", info.digest[7:]))

    def test_ingest_commit_roundtrip(self, content_store: ContentStore) -> None:
        data = payload(1, 300_000)
        w = content_store.ingest("roundtrip")
        assert w.offset == 0
        assert w.write(data[:1000]) == 1000
        assert w.write(memoryview(data)[1000:]) == len(data) - 1000
        assert w.offset == len(data)
        info = w.commit(size=len(data), expected=digest_of(data))
        assert (info.digest, info.size) == (digest_of(data), len(data))
        assert _read(content_store, info.digest) == data
        assert content_store.info(info.digest) == BlobInfo(info.digest, len(data), {})
        assert info.digest in set(content_store.list_digests())

    def test_commit_without_expectations_reports_digest(self, content_store: ContentStore) -> None:
        data = b"hello blob"
        info = _commit(content_store, data)
        assert info.digest == digest_of(data)
        assert info.size == len(data)

    def test_empty_blob(self, content_store: ContentStore) -> None:
        info = _commit(content_store, b"", size=0, expected=EMPTY_SHA256)
        assert info.digest == EMPTY_SHA256
        assert _read(content_store, EMPTY_SHA256) == b""

    def test_context_manager_commit(self, content_store: ContentStore) -> None:
        with content_store.ingest("cm") as w:
            w.write(b"abc")
            info = w.commit(expected=digest_of(b"abc"))
        assert _read(content_store, info.digest) == b"abc"

    def test_commit_existing_is_success(self, content_store: ContentStore) -> None:
        data = payload(2, 70_000)
        first = _commit(content_store, data, "a")
        second = _commit(content_store, data, "b", size=len(data), expected=digest_of(data))
        assert first.digest == second.digest == digest_of(data)
        assert second.size == len(data)
        assert list(content_store.list_digests()) == [digest_of(data)]
        assert _read(content_store, digest_of(data)) == data

    def test_commit_existing_merges_labels(self, content_store: ContentStore) -> None:
        data = b"labelled twice"
        _commit(content_store, data, labels={"a": "1"})
        info = _commit(content_store, data, labels={"b": "2"})
        assert dict(info.labels) == {"a": "1", "b": "2"}

    def test_digest_mismatch_leaves_nothing(self, content_store: ContentStore) -> None:
        data = b"the real bytes"
        wrong = digest_of(b"other bytes")
        with pytest.raises(DigestMismatch) as ei:
            _commit(content_store, data, expected=wrong)
        assert ei.value.expected == wrong
        assert ei.value.got == digest_of(data)
        assert content_store.info(digest_of(data)) is None
        assert content_store.info(wrong) is None
        assert list(content_store.list_digests()) == []

    def test_size_mismatch_leaves_nothing(self, content_store: ContentStore) -> None:
        data = b"twelve bytes"
        with pytest.raises(DigestMismatch):
            _commit(content_store, data, size=len(data) + 1, expected=digest_of(data))
        assert content_store.info(digest_of(data)) is None
        assert list(content_store.list_digests()) == []

    def test_abort_leaves_nothing(self, content_store: ContentStore) -> None:
        w = content_store.ingest("aborted")
        w.write(b"never published")
        w.abort()
        w.abort()  # idempotent
        assert content_store.info(digest_of(b"never published")) is None
        assert list(content_store.list_digests()) == []

    def test_exception_in_context_aborts_and_propagates(self, content_store: ContentStore) -> None:
        with pytest.raises(RuntimeError, match="boom"), content_store.ingest("exc") as w:
            w.write(b"partial")
            raise RuntimeError("boom")
        assert list(content_store.list_digests()) == []

    def test_keyboard_interrupt_in_context_aborts(self, content_store: ContentStore) -> None:
        with pytest.raises(KeyboardInterrupt), content_store.ingest("ctrl-c") as w:
            w.write(b"partial")
            raise KeyboardInterrupt
        assert list(content_store.list_digests()) == []

    def test_ingest_is_closed_after_commit(self, content_store: ContentStore) -> None:
        w = content_store.ingest("closed")
        w.write(b"x")
        w.commit()
        with pytest.raises(FailedPrecondition):
            w.write(b"y")
        with pytest.raises(FailedPrecondition):
            w.commit()
        assert _read(content_store, digest_of(b"x")) == b"x"

    def test_concurrent_writers_same_digest(self, content_store: ContentStore) -> None:
        data = payload(3, 1 << 20)

        def write(i: int) -> BlobInfo:
            return _commit(content_store, data, f"same-{i}", size=len(data), expected=digest_of(data))

        infos = _race(THREADS, write)
        assert {(i.digest, i.size) for i in infos} == {(digest_of(data), len(data))}
        assert list(content_store.list_digests()) == [digest_of(data)]
        assert _read(content_store, digest_of(data)) == data

    def test_concurrent_writers_different_digests(self, content_store: ContentStore) -> None:
        blobs = [payload(100 + i, 50_000 + i) for i in range(THREADS)]
        infos = _race(THREADS, lambda i: _commit(content_store, blobs[i], f"diff-{i}"))
        assert [i.digest for i in infos] == [digest_of(b) for b in blobs]
        assert set(content_store.list_digests()) == {digest_of(b) for b in blobs}
        for b in blobs:
            assert _read(content_store, digest_of(b)) == b

    def test_labels_kept(self, content_store: ContentStore) -> None:
        diff_id = digest_of(b"uncompressed")
        info = _commit(content_store, b"compressed", labels={DIFF_ID_LABEL: diff_id})
        assert dict(info.labels) == {DIFF_ID_LABEL: diff_id}
        stored = content_store.info(info.digest)
        assert stored is not None and dict(stored.labels) == {DIFF_ID_LABEL: diff_id}
        merged = content_store.set_labels(info.digest, {"other": "x"})
        assert dict(merged.labels) == {DIFF_ID_LABEL: diff_id, "other": "x"}
        again = content_store.info(info.digest)
        assert again is not None and dict(again.labels) == dict(merged.labels)

    def test_set_labels_missing_raises_notfound(self, content_store: ContentStore) -> None:
        with pytest.raises(NotFound):
            content_store.set_labels(digest_of(b"absent"), {"k": "v"})

    def test_open_missing_raises_notfound(self, content_store: ContentStore) -> None:
        with pytest.raises(NotFound):
            content_store.open(digest_of(b"absent"))

    def test_info_missing_is_none(self, content_store: ContentStore) -> None:
        assert content_store.info(digest_of(b"absent")) is None

    def test_invalid_digest_rejected(self, content_store: ContentStore) -> None:
        for bad in BAD_DIGESTS:
            with pytest.raises(InvalidArgument):
                content_store.open(bad)
            with pytest.raises(InvalidArgument):
                content_store.info(bad)
            with pytest.raises(InvalidArgument):
                content_store.delete(bad)
            with pytest.raises(InvalidArgument):
                content_store.set_labels(bad, {"k": "v"})

    def test_invalid_expected_digest_rejected(self, content_store: ContentStore) -> None:
        with pytest.raises(InvalidArgument):
            _commit(content_store, b"data", expected="sha256:../../escape")
        assert list(content_store.list_digests()) == []

    def test_delete(self, content_store: ContentStore) -> None:
        info = _commit(content_store, b"to delete", labels={"k": "v"})
        assert content_store.delete(info.digest) is True
        assert content_store.delete(info.digest) is False
        assert content_store.info(info.digest) is None
        with pytest.raises(NotFound):
            content_store.open(info.digest)
        assert list(content_store.list_digests()) == []
        # The labels went with the blob: writing the same bytes again starts clean.
        again = _commit(content_store, b"to delete")
        assert dict(again.labels) == {}

    # --- integrity: verified reads, quarantine, verify, creation time, sweep by ref -----------

    def test_ingest_reports_digest_before_commit(self, content_store: ContentStore) -> None:
        data = payload(9, 200_000)
        with content_store.ingest("early") as w:
            w.write(data)
            assert w.digest == digest_of(data)
            assert content_store.info(digest_of(data)) is None  # known, not yet visible
            w.commit()
        assert content_store.info(digest_of(data)) is not None

    def test_info_has_creation_time(self, content_store: ContentStore) -> None:
        before = time.time()
        info = _commit(content_store, b"aged blob")
        stored = content_store.info(info.digest)
        assert stored is not None and stored.created is not None
        # Server clocks (S3) may differ a little from ours, and LastModified has 1 s resolution.
        assert before - 5 <= stored.created <= time.time() + 5

    def test_corrupt_blob_read_raises_before_last_bytes_and_is_quarantined(
        self, content_store: ContentStore, damage_blob: DamageBlob
    ) -> None:
        data = payload(10, 3 << 20)
        digest = _commit(content_store, data).digest
        damage_blob(content_store, digest, flip_byte(data, len(data) - 10))
        got = bytearray()
        with pytest.raises(DigestMismatch) as ei, content_store.open(digest) as f:
            # A consumer that stops at the blob's size never gets the damaged tail.
            while len(got) < len(data) and (chunk := f.read(min(65536, len(data) - len(got)))):
                got += chunk
        assert len(got) < len(data)
        assert ei.value.expected == digest and ei.value.got != digest
        assert ei.value.details.get("quarantined")
        # Moved aside, not deleted: out of readers' and GC's sight, kept as evidence.
        assert content_store.info(digest) is None
        assert digest not in set(content_store.list_digests())
        assert any(digest[7:] in q for q in content_store.quarantined())
        # And the good bytes can be published again under their name.
        again = _commit(content_store, data, size=len(data), expected=digest)
        assert again.digest == digest and _read(content_store, digest) == data

    def test_corrupt_small_blob_read_to_eof(self, content_store: ContentStore, damage_blob: DamageBlob) -> None:
        digest = _commit(content_store, b"tiny but precious").digest
        damage_blob(content_store, digest, b"tiny but PRECIOUS")
        with pytest.raises(DigestMismatch), content_store.open(digest) as f:
            f.read()
        assert content_store.info(digest) is None

    def test_read_without_quarantine_leaves_the_copy(
        self, content_store: ContentStore, damage_blob: DamageBlob
    ) -> None:
        digest = _commit(content_store, b"x" * 5000).digest
        damage_blob(content_store, digest, b"y" * 5000)
        with pytest.raises(DigestMismatch), content_store.open(digest, quarantine=False) as f:
            f.read()
        assert content_store.info(digest) is not None
        assert list(content_store.quarantined()) == []

    def test_verify(self, content_store: ContentStore, damage_blob: DamageBlob) -> None:
        good = _commit(content_store, payload(11, 100_000)).digest
        bad_data = payload(12, 100_000)
        bad = _commit(content_store, bad_data).digest
        assert content_store.verify(digest_of(b"absent")) is None
        info = content_store.verify(good)
        assert info is not None and info.size == 100_000
        assert content_store.verify(good, quick=True) is not None
        damage_blob(content_store, bad, flip_byte(bad_data))
        # Damage behind the store's back is visible to the quick check too (it re-reads).
        with pytest.raises(DigestMismatch):
            content_store.verify(bad, quick=True, quarantine=False)
        assert content_store.info(bad) is not None
        with pytest.raises(DigestMismatch):
            content_store.verify(bad)
        assert content_store.info(bad) is None
        assert content_store.verify(good) is not None

    def test_read_from_offset_is_verified(self, content_store: ContentStore, damage_blob: DamageBlob) -> None:
        data = payload(14, 300_000)
        digest = _commit(content_store, data).digest
        with content_store.open(digest, offset=123_456) as f:
            assert f.read() == data[123_456:]
        # Damage before the offset is still found (the prefix is hashed, not returned).
        damage_blob(content_store, digest, flip_byte(data, 10))
        with pytest.raises(DigestMismatch), content_store.open(digest, offset=200_000) as f:
            f.read()
        assert content_store.info(digest) is None

    def test_quarantine(self, content_store: ContentStore) -> None:
        digest = _commit(content_store, b"suspect").digest
        where = content_store.quarantine(digest, reason="test")
        assert where and digest[7:] in where
        assert content_store.info(digest) is None
        assert content_store.quarantine(digest) is None
        assert list(content_store.quarantined()) == [where]

    def test_sweep_by_ref_takes_only_that_refs_ingests(self, content_store: ContentStore) -> None:
        big = payload(13, 12 << 20)  # several S3 parts: a multipart upload is in flight
        dead = content_store.ingest("r-dead#gzip-5")
        live = content_store.ingest("r-live#gzip-5")
        for w in (dead, live):
            for i in range(0, len(big), 1 << 20):
                w.write(big[i : i + (1 << 20)])
        try:
            assert content_store.sweep(0, ref="r-dead#gzip-5") >= 1
            assert content_store.sweep(0, ref="r-dead#gzip-5") == 0
            info = live.commit(size=len(big), expected=digest_of(big))
            assert info.digest == digest_of(big)
        finally:
            dead.abort()
            live.abort()

    def test_sweep_keeps_committed_blobs(self, content_store: ContentStore) -> None:
        info = _commit(content_store, b"survives sweep")
        aborted = content_store.ingest("left")
        aborted.write(b"junk")
        aborted.abort()
        assert content_store.sweep(0) >= 0
        assert _read(content_store, info.digest) == b"survives sweep"


# --- metadata -----------------------------------------------------------------------------------


def _spec(ref: str = "r1", **kw: Any) -> RefSpec:
    return RefSpec(ref_id=ref, snapshot=kw.pop("snapshot", f"/snapshots/{ref}"), **kw)


class MetadataStoreContract:
    def test_implements_protocol(self, metadata_store: MetadataStore) -> None:
        assert isinstance(metadata_store, MetadataStore)

    def test_get_unknown_is_none(self, metadata_store: MetadataStore) -> None:
        assert metadata_store.get("nope") is None

    def test_chain_specs_reads_the_whole_ancestry(self, metadata_store: MetadataStore) -> None:
        specs = [_spec("c0"), _spec("c1", parent="c0", kind="upper"), _spec("c2", parent="c1")]
        for spec in specs:
            metadata_store.register(spec)
        assert metadata_store.chain_specs("c2") == {s.ref_id: s for s in specs}
        assert metadata_store.chain_specs("c0") == {"c0": specs[0]}
        assert metadata_store.chain_specs("nope") == {}
        # A missing parent ends the walk (the caller's ancestry check names it).
        metadata_store.register(_spec("orphan", parent="gone"))
        assert metadata_store.chain_specs("orphan") == {"orphan": _spec("orphan", parent="gone")}

    def test_register_creates(self, metadata_store: MetadataStore) -> None:
        spec = _spec("child", parent="base", kind="upper", layer_type="linux")
        rec = metadata_store.register(spec)
        assert rec.spec == spec and rec.blob is None and rec.chain_id is None and rec.variants == ()
        assert metadata_store.get("child") == rec

    def test_register_identical_is_idempotent(self, metadata_store: MetadataStore) -> None:
        spec = _spec("r", parent="p")
        metadata_store.register(spec)
        metadata_store.set_blob("r", layer_blob(1))
        again = metadata_store.register(spec)
        assert again.spec == spec
        assert again.blob == layer_blob(1)  # the existing record, not a fresh one

    @pytest.mark.parametrize(
        "change",
        [
            {"parent": "other"},
            {"parent": None},
            {"snapshot": "/elsewhere"},
            {"kind": "upper"},
            {"layer_type": "windows"},
        ],
    )
    def test_register_conflicting_spec(self, metadata_store: MetadataStore, change: dict[str, Any]) -> None:
        base = {"ref_id": "r", "snapshot": "/snap", "parent": "p", "kind": "rootfs", "layer_type": "linux"}
        metadata_store.register(RefSpec(**base))
        with pytest.raises(ConflictingParent):
            metadata_store.register(RefSpec(**{**base, **change}))
        rec = metadata_store.get("r")
        assert rec is not None and rec.spec == RefSpec(**base)

    def test_set_blob_unknown_ref(self, metadata_store: MetadataStore) -> None:
        with pytest.raises(RefNotFound):
            metadata_store.set_blob("ghost", layer_blob(1))
        assert metadata_store.get("ghost") is None

    def test_first_blob_is_main(self, metadata_store: MetadataStore) -> None:
        metadata_store.register(_spec("r"))
        rec = metadata_store.set_blob("r", layer_blob(1, "gzip-6"))
        assert rec.blob == layer_blob(1, "gzip-6")
        assert rec.variants == ()
        assert metadata_store.get("r") == rec

    def test_other_variants_appended_in_order(self, metadata_store: MetadataStore) -> None:
        metadata_store.register(_spec("r"))
        main = layer_blob(1, "gzip-6")
        z = layer_blob(1, "zstd-3", diff_seed=1)
        u = layer_blob(1, "uncompressed", diff_seed=1)
        metadata_store.set_blob("r", main)
        metadata_store.set_blob("r", z)
        rec = metadata_store.set_blob("r", u)
        assert rec.blob == main
        assert rec.variants == (z, u)
        assert metadata_store.get("r") == rec

    def test_same_variant_is_noop(self, metadata_store: MetadataStore) -> None:
        metadata_store.register(_spec("r"))
        main = layer_blob(1, "gzip-6")
        z = layer_blob(1, "zstd-3", diff_seed=1)
        metadata_store.set_blob("r", main)
        metadata_store.set_blob("r", z)
        before = metadata_store.get("r")
        # Same variant keys, other bytes (e.g. another compressor build): the stored ones stand.
        other_main = LayerBlob(**{**main.to_dict(), "digest": digest_of(b"x"), "size": 5})
        other_z = LayerBlob(**{**z.to_dict(), "digest": digest_of(b"y"), "size": 6})
        assert metadata_store.set_blob("r", other_main) == before
        assert metadata_store.set_blob("r", other_z) == before
        assert metadata_store.set_blob("r", main) == before
        assert metadata_store.get("r") == before

    def test_different_diff_id_conflicts(self, metadata_store: MetadataStore) -> None:
        metadata_store.register(_spec("r"))
        metadata_store.set_blob("r", layer_blob(1, "gzip-6"))
        before = metadata_store.get("r")
        with pytest.raises(Conflict):
            metadata_store.set_blob("r", layer_blob(1, "zstd-3", diff_seed=999))
        with pytest.raises(Conflict):
            metadata_store.set_blob("r", layer_blob(2, "gzip-6"))
        assert metadata_store.get("r") == before

    def test_set_chain_idempotent_never_overwrites(self, metadata_store: MetadataStore) -> None:
        metadata_store.register(_spec("r"))
        c1, b1 = digest_of(b"c1"), digest_of(b"b1")
        rec = metadata_store.set_chain("r", c1, b1)
        assert (rec.chain_id, rec.blob_chain_id) == (c1, b1)
        assert metadata_store.set_chain("r", c1, b1) == rec
        later = metadata_store.set_chain("r", digest_of(b"c2"), digest_of(b"b2"))
        assert (later.chain_id, later.blob_chain_id) == (c1, b1)
        got = metadata_store.get("r")
        assert got is not None and (got.chain_id, got.blob_chain_id) == (c1, b1)

    def test_set_chain_unknown_ref(self, metadata_store: MetadataStore) -> None:
        with pytest.raises(RefNotFound):
            metadata_store.set_chain("ghost", digest_of(b"c"), digest_of(b"b"))

    def test_set_chain_keeps_blobs(self, metadata_store: MetadataStore) -> None:
        metadata_store.register(_spec("r"))
        metadata_store.set_blob("r", layer_blob(1))
        rec = metadata_store.set_chain("r", digest_of(b"c"), digest_of(b"b"))
        assert rec.blob == layer_blob(1)
        # And a blob after the chain keeps the chain.
        rec = metadata_store.set_blob("r", layer_blob(1, "zstd-3", diff_seed=1))
        assert rec.chain_id == digest_of(b"c") and rec.variants == (layer_blob(1, "zstd-3", diff_seed=1),)

    def test_list_refs(self, metadata_store: MetadataStore) -> None:
        assert list(metadata_store.list_refs()) == []
        for i in range(5):
            metadata_store.register(_spec(f"r{i}", parent=f"r{i - 1}" if i else None))
        metadata_store.set_blob("r2", layer_blob(2))
        recs = {r.ref_id: r for r in metadata_store.list_refs()}
        assert set(recs) == {f"r{i}" for i in range(5)}
        assert recs["r2"].blob == layer_blob(2)
        assert recs["r3"].parent == "r2"
        for ref_id, rec in recs.items():
            assert metadata_store.get(ref_id) == rec

    def test_record_fields_roundtrip(self, metadata_store: MetadataStore) -> None:
        spec = RefSpec(
            ref_id="w:1@x+y", snapshot="/s p a c e/ü", parent="p.0", kind="upper", layer_type="windows"
        )
        metadata_store.register(spec)
        blob = LayerBlob(
            digest=digest_of(b"b"),
            size=123456789012,
            media_type="application/vnd.docker.image.rootfs.diff.tar.gzip",
            diff_id=digest_of(b"d"),
            compression=Compression.GZIP,
            compressor="zlib-ng 2.2.2 blocks=1MiB level=9",
            variant="gzip-9@sde=0",
        )
        metadata_store.set_blob(spec.ref_id, blob)
        rec = metadata_store.get(spec.ref_id)
        assert rec is not None and rec.spec == spec and rec.blob == blob

    def test_manifests(self, metadata_store: MetadataStore) -> None:
        assert metadata_store.manifest_digests() == set()
        a = [digest_of(b"m1"), digest_of(b"c1"), digest_of(b"l1")]
        b = [digest_of(b"m2"), digest_of(b"l1")]
        metadata_store.put_manifest("img:a", a)
        metadata_store.put_manifest("img:b", b)
        assert metadata_store.manifest_digests() == set(a) | set(b)
        metadata_store.put_manifest("img:a", a)  # idempotent
        assert metadata_store.manifest_digests() == set(a) | set(b)

    def test_manifest_rejects_invalid_digest(self, metadata_store: MetadataStore) -> None:
        with pytest.raises(InvalidArgument):
            metadata_store.put_manifest("bad", ["sha256:../../x"])

    def test_threads_race_set_chain_one_value(self, metadata_store: MetadataStore) -> None:
        metadata_store.register(_spec("r"))
        pairs = [(digest_of(f"c{i}".encode()), digest_of(f"b{i}".encode())) for i in range(THREADS)]
        recs = _race(THREADS, lambda i: metadata_store.set_chain("r", *pairs[i]))
        winners = {(r.chain_id, r.blob_chain_id) for r in recs}
        assert len(winners) == 1
        (winner,) = winners
        assert winner in pairs
        final = metadata_store.get("r")
        assert final is not None and (final.chain_id, final.blob_chain_id) == winner

    def test_threads_race_register(self, metadata_store: MetadataStore) -> None:
        spec = _spec("r", parent="p")
        recs = _race(THREADS, lambda i: metadata_store.register(spec))
        assert {r.spec for r in recs} == {spec}
        assert [r.ref_id for r in metadata_store.list_refs()] == ["r"]

    def test_damaged_mark_until_rebuilt(self, metadata_store: MetadataStore) -> None:
        metadata_store.register(_spec("r"))
        main = layer_blob(1, "gzip-6")
        z = layer_blob(1, "zstd-3", diff_seed=1)
        metadata_store.set_blob("r", main)
        metadata_store.set_blob("r", z)
        with pytest.raises(RefNotFound):
            metadata_store.mark_damaged("ghost", main.digest)
        with pytest.raises(InvalidArgument):
            metadata_store.mark_damaged("r", "sha256:nope")
        rec = metadata_store.mark_damaged("r", main.digest)
        assert rec.damaged == (main.digest,)
        rec = metadata_store.mark_damaged("r", z.digest)
        assert set(rec.damaged) == {main.digest, z.digest}
        assert metadata_store.mark_damaged("r", z.digest).damaged == rec.damaged  # idempotent
        got = metadata_store.get("r")
        assert got is not None and set(got.damaged) == {main.digest, z.digest}
        assert got.blob == main and got.variants == (z,)  # the blobs stay recorded
        assert {r.ref_id: set(r.damaged) for r in metadata_store.list_refs()} == {
            "r": {main.digest, z.digest}
        }
        # The rebuild (same variant, same bytes) clears its mark; a re-verification the other.
        rec = metadata_store.set_blob("r", main)
        assert rec.damaged == (z.digest,)
        rec = metadata_store.clear_damaged("r", z.digest)
        assert rec.damaged == ()
        assert metadata_store.get("r") == rec
        assert "damaged" not in rec.to_dict()

    def test_threads_race_set_blob(self, metadata_store: MetadataStore) -> None:
        metadata_store.register(_spec("r"))
        variants = [f"zstd-{i + 1}" for i in range(THREADS)]
        # Each variant twice: duplicates must be no-ops, every distinct variant stored once.
        _race(
            2 * THREADS,
            lambda i: metadata_store.set_blob("r", layer_blob(1, variants[i % THREADS], diff_seed=1)),
        )
        rec = metadata_store.get("r")
        assert rec is not None and rec.blob is not None
        keys = [b.variant for b in rec.blobs()]
        assert sorted(keys) == sorted(variants)
        assert len(keys) == len(set(keys))
        assert {b.diff_id for b in rec.blobs()} == {digest_of(b"diff-1")}


# --- leases -------------------------------------------------------------------------------------


def _wait_for(cond: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


class LeaseManagerContract:
    def test_implements_protocol(self, lease_manager: LeaseManager) -> None:
        assert isinstance(lease_manager, LeaseManager)

    def test_lease_holds_digests(self, lease_manager: LeaseManager) -> None:
        d1, d2 = digest_of(b"1"), digest_of(b"2")
        assert lease_manager.live_digests() == set()
        lease_manager.create_lease("l1", 3600)
        lease_manager.add_resource("l1", d1)
        lease_manager.add_resource("l1", d2)
        lease_manager.add_resource("l1", d2)
        assert lease_manager.live_digests() == {d1, d2}
        lease_manager.delete_lease("l1")
        assert lease_manager.live_digests() == set()
        lease_manager.delete_lease("l1")  # deleting an absent lease is fine

    def test_digest_in_two_leases(self, lease_manager: LeaseManager) -> None:
        d = digest_of(b"shared")
        for lease in ("a", "b"):
            lease_manager.create_lease(lease, 3600)
            lease_manager.add_resource(lease, d)
        lease_manager.delete_lease("a")
        assert lease_manager.live_digests() == {d}

    def test_expired_lease_ignored(self, lease_manager: LeaseManager) -> None:
        d_short, d_long = digest_of(b"short"), digest_of(b"long")
        lease_manager.create_lease("long", 3600)
        lease_manager.add_resource("long", d_long)
        # Shorten only after adding: a stall between the calls must not expire it first.
        lease_manager.create_lease("short", 3600)
        lease_manager.add_resource("short", d_short)
        lease_manager.create_lease("short", 0.2)
        assert _wait_for(lambda: d_short not in lease_manager.live_digests())
        assert lease_manager.live_digests() == {d_long}

    def test_recreate_extends_lease(self, lease_manager: LeaseManager) -> None:
        d = digest_of(b"extended")
        lease_manager.create_lease("l", 3600)
        lease_manager.add_resource("l", d)
        lease_manager.create_lease("l", 7200)
        assert lease_manager.live_digests() == {d}

    def test_add_resource_to_unknown_lease(self, lease_manager: LeaseManager) -> None:
        with pytest.raises(MissingLease):
            lease_manager.add_resource("no-such-lease", digest_of(b"x"))
        assert lease_manager.live_digests() == set()

    def test_add_resource_rejects_invalid_digest(self, lease_manager: LeaseManager) -> None:
        lease_manager.create_lease("l", 3600)
        with pytest.raises(InvalidArgument):
            lease_manager.add_resource("l", "sha256:nope")


# --- claims --------------------------------------------------------------------------------------


class ClaimServiceContract:
    def test_implements_protocol(self, claim_service: ClaimService) -> None:
        assert isinstance(claim_service, ClaimService)
        claim = claim_service.try_acquire("proto", 30)
        assert claim is not None
        try:
            assert isinstance(claim, Claim)
        finally:
            claim.release()

    def test_exclusive_acquire(self, claim_service: ClaimService) -> None:
        a = claim_service.try_acquire("ref/a:gzip-6", 30)
        assert a is not None and a.key == "ref/a:gzip-6" and a.token
        try:
            assert claim_service.try_acquire("ref/a:gzip-6", 30) is None
            other = claim_service.try_acquire("ref/a:zstd-3", 30)
            assert other is not None
            other.release()
        finally:
            a.release()

    def test_release_then_reacquire(self, claim_service: ClaimService) -> None:
        a = claim_service.try_acquire("k", 30)
        assert a is not None
        a.release()
        b = claim_service.try_acquire("k", 30)
        assert b is not None
        try:
            assert b.token != a.token
        finally:
            b.release()

    def test_holder_reports_token(self, claim_service: ClaimService) -> None:
        assert claim_service.holder("k") is None
        a = claim_service.try_acquire("k", 30)
        assert a is not None
        assert claim_service.holder("k") == a.token
        a.release()
        assert claim_service.holder("k") is None

    def test_release_is_idempotent(self, claim_service: ClaimService) -> None:
        a = claim_service.try_acquire("k", 30)
        assert a is not None
        a.release()
        a.release()
        b = claim_service.try_acquire("k", 30)
        assert b is not None
        a.release()  # a stale claim's release must not free someone else's
        assert claim_service.holder("k") == b.token
        assert claim_service.try_acquire("k", 30) is None
        b.release()

    def test_refresh_while_held(self, claim_service: ClaimService) -> None:
        a = claim_service.try_acquire("k", 30)
        assert a is not None
        a.refresh()
        a.refresh()
        assert claim_service.holder("k") == a.token
        a.release()

    def test_refresh_after_release_raises(self, claim_service: ClaimService) -> None:
        a = claim_service.try_acquire("k", 30)
        assert a is not None
        a.release()
        with pytest.raises(ClaimLost):
            a.refresh()

    def test_odd_keys(self, claim_service: ClaimService) -> None:
        keys = ["a/b/../c", "ü-ß:zstd-22@sde=0", "x" * 1000, "sha256:" + "0" * 64]
        claims = [claim_service.try_acquire(k, 30) for k in keys]
        try:
            assert all(claim is not None for claim in claims)
            assert [claim_service.holder(k) for k in keys] == [claim.token for claim in claims if claim]
        finally:
            for claim in claims:
                if claim:
                    claim.release()

    def test_threads_race_single_winner(self, claim_service: ClaimService) -> None:
        claims = _race(THREADS, lambda i: claim_service.try_acquire("contended", 30))
        winners = [claim for claim in claims if claim is not None]
        assert len(winners) == 1
        assert claim_service.holder("contended") == winners[0].token
        winners[0].release()
