"""S3ContentStore against a real SeaweedFS: the conformance suite plus streaming, failure and
concurrency behaviour of the S3 protocol (multipart, If-None-Match, sweeping, outages)."""

from __future__ import annotations

import hashlib
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from services import S3Service

from blobchain.layers.errors import BlobchainError, NotFound, Unavailable
from blobchain.layers.records import DIFF_ID_LABEL
from blobchain.storage.content.s3 import MiB, S3AccessDenied, S3ContentStore, make_s3_client

from .contracts import ContentStoreContract, _race, digest_of, payload

pytestmark = pytest.mark.integration

PART = 5 * MiB


@pytest.fixture
def content_store(s3_client: Any, s3_bucket: str, s3_prefix: str) -> S3ContentStore:
    return S3ContentStore(s3_client, s3_bucket, s3_prefix, part_size=PART)


def _damage_s3(store: object, digest: str, data: bytes) -> None:
    """Overwrite the object with other bytes, as another client (or a server fault) would."""
    assert isinstance(store, S3ContentStore)
    store.client.put_object(Bucket=store.bucket, Key=store.blob_key(digest), Body=data)


class TestS3ContentStore(ContentStoreContract):
    @pytest.fixture
    def damage_blob(self) -> object:
        return _damage_s3


# --- helpers ------------------------------------------------------------------------------------


def chunks(total: int, chunk: int = 256 * 1024, seed: int = 7) -> Iterator[bytes]:
    """``total`` deterministic bytes in chunks, generated on the fly (never all in memory)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * (chunk // 32)
    sent = 0
    n = 0
    while sent < total:
        piece = block[: min(chunk, total - sent)]
        # Vary each chunk so parts differ (a stuck buffer would change the digest).
        piece = n.to_bytes(8, "big") + piece[8:] if len(piece) >= 8 else piece
        yield piece
        sent += len(piece)
        n += 1


def digest_of_stream(it: Iterator[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for c in it:
        h.update(c)
        n += len(c)
    return "sha256:" + h.hexdigest(), n


def leftovers(store: S3ContentStore) -> tuple[list[str], list[str]]:
    """(objects under uploads/, keys with pending multipart uploads) for this store's prefix."""
    c = store.client
    objs = c.list_objects_v2(Bucket=store.bucket, Prefix=store.uploads_prefix).get("Contents") or []
    ups = c.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads") or []
    return [o["Key"] for o in objs], [u["Key"] for u in ups]


def read_digest(store: S3ContentStore, digest: str) -> tuple[str, int]:
    with store.open(digest) as f:
        return digest_of_stream(iter(lambda: f.read(MiB), b""))


# --- streaming ----------------------------------------------------------------------------------


def test_client_config_is_s3_compatible_safe(s3_client: Any) -> None:
    cfg = s3_client.meta.config
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert cfg.s3["addressing_style"] == "path"
    assert cfg.signature_version == "s3v4"
    assert cfg.retries["mode"] == "standard"


def test_streaming_multipart_upload_has_flat_memory(content_store: S3ContentStore) -> None:
    total = 16 * PART + 12345  # 17 parts
    want = digest_of_stream(chunks(total))
    tracemalloc.start()
    try:
        with content_store.ingest("big") as w:
            for c in chunks(total):
                w.write(c)
            info = w.commit(size=total, expected=want[0], labels={DIFF_ID_LABEL: want[0]})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.digest, info.size) == want
    # (max_in_flight_parts + 1) buffers of one part, plus what the HTTP stack holds per request;
    # the blob itself is over three times that.
    assert peak < 5 * PART, f"peak {peak / MiB:.1f} MiB for a {total / MiB:.1f} MiB blob"
    assert read_digest(content_store, info.digest) == want
    stored = content_store.info(info.digest)
    assert stored is not None and stored.size == total and dict(stored.labels) == {DIFF_ID_LABEL: want[0]}
    assert leftovers(content_store) == ([], [])


def test_blob_of_exactly_one_part_uses_single_put(content_store: S3ContentStore) -> None:
    data = payload(11, PART)
    with content_store.ingest("one-part") as w:
        w.write(data)
        assert w._upload_id is None  # no multipart upload started for a blob that fits one part
        info = w.commit(expected=digest_of(data))
    assert info.size == PART
    with content_store.open(info.digest) as f:
        assert f.read() == data
    assert leftovers(content_store) == ([], [])


def test_reader_streams_in_pieces(content_store: S3ContentStore) -> None:
    data = payload(12, 3 * MiB + 17)
    with content_store.ingest("r") as w:
        w.write(data)
        info = w.commit()
    with content_store.open(info.digest) as f:
        assert f.readable()
        head = f.read(10)
        rest = f.read()
    assert head + rest == data


def test_failing_source_leaves_nothing(content_store: S3ContentStore) -> None:
    def source() -> Iterator[bytes]:
        yield from chunks(2 * PART + 1000)
        raise OSError("source disk died")

    with pytest.raises(OSError, match="source disk died"), content_store.ingest("dies") as w:
        for c in source():
            w.write(c)
    assert w._upload_id is None
    assert list(content_store.list_digests()) == []
    assert leftovers(content_store) == ([], [])


def test_digest_mismatch_after_multipart_leaves_nothing(content_store: S3ContentStore) -> None:
    with content_store.ingest("bad") as w:
        for c in chunks(PART + 100):
            w.write(c)
        with pytest.raises(BlobchainError, match="does not match"):
            w.commit(expected=digest_of(b"something else"))
    assert list(content_store.list_digests()) == []
    assert leftovers(content_store) == ([], [])


def test_concurrent_multipart_commits_of_one_digest(content_store: S3ContentStore) -> None:
    total = PART + 4096  # two parts: the temp-object + conditional copy path
    want = digest_of_stream(chunks(total))

    def write(i: int) -> tuple[str, int]:
        with content_store.ingest(f"dup-{i}") as w:
            for c in chunks(total):
                w.write(c)
            info = w.commit(size=total, expected=want[0])
        return info.digest, info.size

    assert set(_race(6, write)) == {want}
    assert list(content_store.list_digests()) == [want[0]]
    assert read_digest(content_store, want[0]) == want
    assert leftovers(content_store) == ([], [])


def test_multipart_copy_path(s3_client: Any, s3_bucket: str, s3_prefix: str) -> None:
    # Above the threshold (5 GiB in production) the final key is made with UploadPartCopy.
    store = S3ContentStore(s3_client, s3_bucket, s3_prefix, part_size=PART, multipart_copy_threshold=PART)
    total = 2 * PART + 999
    want = digest_of_stream(chunks(total, seed=3))
    with store.ingest("huge") as w:
        for c in chunks(total, seed=3):
            w.write(c)
        info = w.commit(labels={DIFF_ID_LABEL: want[0]})
    assert (info.digest, info.size) == want
    assert read_digest(store, info.digest) == want
    # A second commit meets the existing key (412 on the conditional complete) and succeeds.
    with store.ingest("huge-again") as w:
        for c in chunks(total, seed=3):
            w.write(c)
        again = w.commit()
    assert (again.digest, again.size, dict(again.labels)) == (*want, {DIFF_ID_LABEL: want[0]})
    # set_labels on a large object copies it onto itself part by part.
    labelled = store.set_labels(info.digest, {"x": "y"})
    assert dict(labelled.labels) == {DIFF_ID_LABEL: want[0], "x": "y"}
    assert read_digest(store, info.digest) == want
    assert leftovers(store) == ([], [])


def test_if_none_match_never_overwrites(content_store: S3ContentStore) -> None:
    data = b"the first bytes win"
    info = content_store.ingest("a")
    info.write(data)
    first = info.commit()
    key = content_store.blob_key(first.digest)
    # A writer racing with other bytes under the same key (only a bug could do this) gets 412,
    # on both creation paths, and the stored bytes stay.
    other = b"other bytes, same key"
    assert content_store._put_if_absent(key, other, digest_of(other), {}) is False
    tmp = content_store.uploads_prefix + "manual"
    content_store.client.put_object(Bucket=content_store.bucket, Key=tmp, Body=other)
    assert content_store._copy(tmp, key, len(other), {}, if_none_match=True) is False
    content_store.client.delete_object(Bucket=content_store.bucket, Key=tmp)
    with content_store.open(first.digest) as f:
        assert f.read() == data


def test_labels_with_awkward_names_and_values(content_store: S3ContentStore) -> None:
    labels = {
        DIFF_ID_LABEL: digest_of(b"d"),
        "Mixed.Case/Name": "Value With Spaces",
        "ünï_cødé": "välue%20not-decoded\t",
        "a_b": "x",
        "a/b": "y",
    }
    with content_store.ingest("labels") as w:
        w.write(b"labelled")
        info = w.commit(labels=labels)
    stored = content_store.info(info.digest)
    assert stored is not None and dict(stored.labels) == labels


def test_sweep_removes_stale_uploads(content_store: S3ContentStore) -> None:
    kept = content_store.ingest("kept")
    kept.write(b"committed blob")
    blob = kept.commit()
    # A crashed worker: a multipart upload started and never finished or aborted.
    crashed = content_store.ingest("crashed")
    for c in chunks(PART + 10):
        crashed.write(c)
    crashed._drain(0)
    # A temp object whose copy never happened.
    content_store.client.put_object(
        Bucket=content_store.bucket, Key=content_store.uploads_prefix + "orphan", Body=b"x"
    )
    objs, ups = leftovers(content_store)
    assert len(objs) == 1 and len(ups) == 1
    assert content_store.sweep(3600) == 0  # young: left alone
    assert content_store.sweep(0) == 2
    assert leftovers(content_store) == ([], [])
    crashed.abort()  # the upload is gone already: abort stays quiet
    with content_store.open(blob.digest) as f:
        assert f.read() == b"committed blob"


def test_delete_and_open_missing(content_store: S3ContentStore) -> None:
    w = content_store.ingest("gone")
    w.write(b"short-lived")
    info = w.commit()
    assert content_store.delete(info.digest)
    with pytest.raises(NotFound, match=content_store.bucket):
        content_store.open(info.digest)


# --- errors -------------------------------------------------------------------------------------


def test_wrong_credentials_give_a_clear_non_retryable_error(s3_service: S3Service, s3_prefix: str) -> None:
    bad_secret = "definitely-not-the-secret-4242"
    client = make_s3_client(
        s3_service.endpoint, s3_service.region, s3_service.access_key, bad_secret, max_attempts=1
    )
    store = S3ContentStore(client, s3_service.bucket, s3_prefix)
    for op in (
        lambda: store.info(digest_of(b"x")),
        lambda: list(store.list_digests()),
        lambda: _commit_bytes(store, b"denied"),
        lambda: _commit_bytes(store, payload(5, PART + 1)),
    ):
        with pytest.raises(S3AccessDenied) as ei:
            op()
        assert not ei.value.retryable
        assert s3_service.endpoint in str(ei.value)
        assert bad_secret not in str(ei.value) and bad_secret not in repr(ei.value.to_dict())
    assert bad_secret not in repr(store) and s3_service.secret_key not in repr(s3_service)


def _commit_bytes(store: S3ContentStore, data: bytes) -> None:
    with store.ingest("t") as w:
        w.write(data)
        w.commit()


def test_s3_stopped_is_unavailable_then_recovers(private_s3: S3Service) -> None:
    client = private_s3.client(max_attempts=2, connect_timeout=1, read_timeout=5)
    store = S3ContentStore(client, private_s3.bucket, "outage/", part_size=PART)
    before = store.ingest("before")
    before.write(b"stored before the outage")
    info = before.commit()

    with private_s3.down():
        with pytest.raises(Unavailable) as ei:
            store.info(info.digest)
        assert ei.value.retryable
        assert private_s3.endpoint in str(ei.value)
        assert private_s3.secret_key not in str(ei.value)
        # A write in progress when S3 goes away fails as Unavailable, not as a partial blob.
        w = store.ingest("during")
        with pytest.raises(Unavailable):
            for c in chunks(2 * PART):
                w.write(c)
            w.commit()
        w.abort()

    assert store.info(info.digest) == info
    with store.ingest("after") as w:
        w.write(b"written after the outage")
        after = w.commit()
    with store.open(after.digest) as f:
        assert f.read() == b"written after the outage"
    assert leftovers(store) == ([], [])


def test_s3_hanging_is_unavailable_then_recovers(private_s3: S3Service) -> None:
    client = private_s3.client(max_attempts=2, connect_timeout=1, read_timeout=1)
    store = S3ContentStore(client, private_s3.bucket, "hang/")
    private_s3.pause()
    try:
        with pytest.raises(Unavailable, match="unavailable"):
            store.info(digest_of(b"x"))
    finally:
        private_s3.resume()
    # A just-resumed server may take over the 1 s read timeout to answer on a loaded host.
    deadline = time.monotonic() + 30
    while True:
        try:
            assert store.info(digest_of(b"x")) is None
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_concurrent_writers_and_readers_share_one_client(content_store: S3ContentStore) -> None:
    # boto3 clients are thread-safe; ingests of one store run side by side.
    blobs = [payload(200 + i, PART + 1000 * i) for i in range(4)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with content_store.ingest(f"w{i}") as w:
                w.write(blobs[i])
                info = w.commit(expected=digest_of(blobs[i]))
            with content_store.open(info.digest) as f:
                assert f.read() == blobs[i]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(content_store.list_digests()) == {digest_of(b) for b in blobs}


def test_conditional_writes_retry_a_409_then_give_up_clearly(content_store: S3ContentStore) -> None:
    # The retry policy alone (S3 answers 409 when another write on the key is in flight; a
    # real server cannot be made to do that on demand).
    from blobchain.storage.content import s3 as s3mod

    answers = [s3mod._CONFLICT, s3mod._CONFLICT, None]
    assert content_store._settled("k", lambda: answers.pop(0)) is True
    assert content_store._settled("k", lambda: s3mod._EXISTS) is False
    calls = []
    with pytest.raises(Unavailable, match="conflicting write on k"):
        content_store._settled("k", lambda: calls.append(1) or s3mod._CONFLICT)
    assert len(calls) == s3mod._CONFLICT_ATTEMPTS
