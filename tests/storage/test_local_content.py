"""LocalContentStore: the conformance suite plus layout, durability and failure behaviour."""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobchain.layers.errors import DigestMismatch, FailedPrecondition, InvalidArgument, StoreFull
from blobchain.layers.records import DIFF_ID_LABEL
from blobchain.storage.content.local import LocalContentStore

from . import expect_line, ingest_past_file_size_limit, spawn_python, tmpfs
from .contracts import ContentStoreContract, digest_of, payload


@pytest.fixture
def content_store(tmp_path: Path) -> Iterator[LocalContentStore]:
    store = LocalContentStore(tmp_path / "layout")
    yield store
    store.close()


def _damage_local(store: object, digest: str, data: bytes) -> None:
    """Rewrite the blob file in place, as a disk error or a careless editor would."""
    assert isinstance(store, LocalContentStore)
    path = store.blob_path(digest)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
    path.chmod(0o444)


class TestLocalContentStore(ContentStoreContract):
    @pytest.fixture
    def damage_blob(self) -> object:
        return _damage_local


def _commit(store: LocalContentStore, data: bytes, **kw: object) -> str:
    with store.ingest("t") as w:
        w.write(data)
        return w.commit(**kw).digest  # type: ignore[arg-type]


def _ingest_files(store: LocalContentStore) -> list[str]:
    return sorted(os.listdir(store.ingest_dir))


def test_layout_created(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path / "l")
    assert json.loads((tmp_path / "l" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert (tmp_path / "l" / "blobs" / "sha256").is_dir()
    assert store.ingest_dir == tmp_path / "l" / ".blobchain" / "ingest"
    assert not (tmp_path / "l" / "index.json").exists()  # the exporter's to write


def test_existing_layout_files_untouched(tmp_path: Path) -> None:
    root = tmp_path / "l"
    root.mkdir()
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}\n')
    index = b'{"schemaVersion":2,"manifests":[]}'
    (root / "index.json").write_bytes(index)
    store = LocalContentStore(root)
    _commit(store, b"blob")
    assert (root / "oci-layout").read_text() == '{"imageLayoutVersion": "1.0.0"}\n'
    assert (root / "index.json").read_bytes() == index


def test_blob_file_is_read_only_at_its_digest_path(content_store: LocalContentStore) -> None:
    digest = _commit(content_store, b"content")
    path = content_store.root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    assert content_store.blob_path(digest) == path
    assert path.read_bytes() == b"content"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert _ingest_files(content_store) == []


def test_blob_path_rejects_crafted_digest(content_store: LocalContentStore) -> None:
    with pytest.raises(InvalidArgument):
        content_store.blob_path("sha256:../../../../etc/passwd")


def test_commit_never_replaces_existing_blob(content_store: LocalContentStore) -> None:
    data = payload(7, 10_000)
    digest = _commit(content_store, data)
    before = content_store.blob_path(digest).stat()
    _commit(content_store, data, expected=digest)
    after = content_store.blob_path(digest).stat()
    assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
    assert after.st_nlink == 1  # our temp link is gone
    assert _ingest_files(content_store) == []


def test_ingest_writes_under_state_dir(content_store: LocalContentStore) -> None:
    w = content_store.ingest("layer/with:odd@chars")
    w.write(b"in flight")
    (name,) = _ingest_files(content_store)
    assert "/" not in name and name.startswith("layer_with")
    assert list(content_store.list_digests()) == []
    w.commit()
    assert _ingest_files(content_store) == []


def test_labels_persist_across_instances(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path / "l")
    diff_id = digest_of(b"diff")
    digest = _commit(store, b"blob", labels={DIFF_ID_LABEL: diff_id})
    store.close()
    reopened = LocalContentStore(tmp_path / "l")
    info = reopened.info(digest)
    assert info is not None and dict(info.labels) == {DIFF_ID_LABEL: diff_id}


def test_sweep_respects_age_and_breaks_swept_ingest(content_store: LocalContentStore) -> None:
    w = content_store.ingest("slow")
    w.write(b"slow writer")
    assert content_store.sweep(3600) == 0
    assert len(_ingest_files(content_store)) == 1
    assert content_store.sweep(0) == 1
    assert _ingest_files(content_store) == []
    with pytest.raises(FailedPrecondition):
        w.commit()
    assert list(content_store.list_digests()) == []


# --- full filesystem ------------------------------------------------------------------------------


def test_store_full_on_tiny_tmpfs(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        store = LocalContentStore(mnt)
        try:
            big = payload(8, 2 << 20)
            with pytest.raises(StoreFull, match="full"), store.ingest("big") as w:
                for i in range(0, len(big), 65536):
                    w.write(big[i : i + 65536])
                w.commit()
            assert list(store.list_digests()) == []
            assert _ingest_files(store) == []
            # The space came back: a small blob fits now.
            small = payload(9, 100_000)
            assert _commit(store, small) == digest_of(small)
        finally:
            store.close()


def test_store_full_on_file_size_limit(tmp_path: Path) -> None:
    ingest_past_file_size_limit(tmp_path / "l", 256 * 1024, 32 * 65536)
    store = LocalContentStore(tmp_path / "l")
    assert list(store.list_digests()) == []
    assert _ingest_files(store) == []


# --- crashes and processes ----------------------------------------------------------------------

_CRASH_CHILD = """
import sys, time
from blobchain.storage.content.local import LocalContentStore
store = LocalContentStore(sys.argv[1])
w = store.ingest("doomed")
for _ in range(64):
    w.write(b"y" * 65536)
print("writing", flush=True)
time.sleep(600)
"""


def test_sigkill_mid_ingest_leaves_no_blob_and_a_sweepable_temp(tmp_path: Path) -> None:
    proc = spawn_python(_CRASH_CHILD, str(tmp_path / "l"))
    expect_line(proc, "writing")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = LocalContentStore(tmp_path / "l")
    assert list(store.list_digests()) == []
    assert len(_ingest_files(store)) == 1
    assert store.sweep(3600) == 0  # too young
    assert store.sweep(0) == 1
    assert _ingest_files(store) == []


_RACE_CHILD = """
import sys, hashlib
from blobchain.storage.content.local import LocalContentStore
store = LocalContentStore(sys.argv[1])
size = int(sys.argv[2])
out = bytearray(); block = hashlib.sha256(b"race").digest()
while len(out) < size:
    block = hashlib.sha256(block).digest(); out += block
data = bytes(out[:size])
print("ready", flush=True)
sys.stdin.readline()
w = store.ingest("race")
for i in range(0, size, 65536):
    w.write(data[i:i + 65536])
info = w.commit(size=size, expected="sha256:" + hashlib.sha256(data).hexdigest(), labels={"by": sys.argv[3]})
print(info.digest, info.size, flush=True)
"""


def test_processes_race_on_same_digest(tmp_path: Path) -> None:
    root, size = tmp_path / "l", 3 << 20
    LocalContentStore(root).close()
    procs = [spawn_python(_RACE_CHILD, str(root), str(size), str(i)) for i in range(6)]
    for p in procs:
        expect_line(p, "ready")
    for p in procs:  # release them together
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(out.split())
    (digest, got_size) = results[0]
    assert all(r == [digest, got_size] for r in results)
    assert int(got_size) == size
    store = LocalContentStore(root)
    assert list(store.list_digests()) == [digest]
    with store.open(digest) as f:
        assert digest_of(f.read()) == digest
    assert store.blob_path(digest).stat().st_nlink == 1
    assert _ingest_files(store) == []
    info = store.info(digest)
    assert info is not None and info.labels["by"] in {str(i) for i in range(6)}


def test_quick_verify_sees_a_rewrite_that_kept_size_and_mtime(content_store: LocalContentStore) -> None:
    """The fingerprint recorded at publish includes the ctime, which a rewrite always changes
    (``touch -r`` can restore the mtime, nothing restores the ctime)."""
    data = payload(21, 100_000)
    digest = _commit(content_store, data)
    assert content_store.verify(digest, quick=True) is not None
    path = content_store.blob_path(digest)
    st = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(50_000)
        f.write(bytes([data[50_000] ^ 1]))
    path.chmod(0o444)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(DigestMismatch):
        content_store.verify(digest, quick=True)
    assert content_store.info(digest) is None


def test_recommit_does_not_launder_a_damaged_copy(content_store: LocalContentStore) -> None:
    """Committing the same digest again keeps the existing file (and refreshes its age) but does
    not make a damaged one trusted: the quick check still reads it."""
    data = payload(22, 50_000)
    digest = _commit(content_store, data)
    path = content_store.blob_path(digest)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(b"\0")
    path.chmod(0o444)
    # A racing writer that had the good bytes commits; the link finds the damaged file there.
    _commit(content_store, data)
    with pytest.raises(DigestMismatch):
        content_store.verify(digest, quick=True)


def test_a_fresh_blob_passes_a_quick_verify_without_being_read(
    content_store: LocalContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the fingerprint was taken before the ingest's temp name was unlinked, which
    # changes the inode's ctime, so every export re-read (and re-hashed) each layer it had just
    # built before writing the manifest: ~1 s of a 1 GiB export.
    data = payload(7, 3 << 20)
    with content_store.ingest("fresh") as ing:
        ing.write(data)
        info = ing.commit()
    reads: list[str] = []
    import blobchain.storage.content.local as local

    real = local.drain_verified
    monkeypatch.setattr(local, "drain_verified", lambda store, d, **kw: reads.append(d) or real(store, d, **kw))
    assert content_store.verify(info.digest, quick=True) == info
    assert reads == []
    # A change to the file is still caught: the fingerprint moves, the blob is read in full.
    os.utime(content_store.blob_path(info.digest))
    assert content_store.verify(info.digest, quick=True) is not None
    assert reads == [info.digest]


def test_plain_ingest_starts_writeback_of_each_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without O_DIRECT a large ingest asks the kernel to start writing each step as it goes
    (so the commit's fsync waits for the tail only); the bytes and digest are what was written."""
    import blobchain.storage.content.direct as direct

    calls: list[tuple[int, bool]] = []
    real = direct.start_writeback

    def spy(fd: int, offset: int) -> bool:
        ok = real(fd, offset)
        calls.append((offset, ok))
        return ok

    monkeypatch.setattr(direct, "STEP", 64 << 10)
    monkeypatch.setattr(direct, "start_writeback", spy)
    store = LocalContentStore(tmp_path / "l", direct_writes=False)
    data = payload(7, (1 << 20) + 100)
    with store.ingest("wb") as w:
        for off in range(0, len(data), 16 << 10):
            w.write(data[off : off + (16 << 10)])
        digest = w.commit().digest
    store.close()
    assert digest == digest_of(data)
    assert store.blob_path(digest).read_bytes() == data
    assert [off for off, _ in calls] == list(range(0, 1 << 20, 64 << 10))
    if os.uname().sysname == "Linux":
        assert all(ok for _, ok in calls)


def test_plain_ingest_stops_asking_for_writeback_once_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import blobchain.storage.content.direct as direct

    calls: list[int] = []

    def refused(fd: int, offset: int) -> bool:
        calls.append(offset)
        return False

    monkeypatch.setattr(direct, "STEP", 64 << 10)
    monkeypatch.setattr(direct, "start_writeback", refused)
    store = LocalContentStore(tmp_path / "l", direct_writes=False)
    data = payload(7, 1 << 20)
    with store.ingest("wb") as w:
        for off in range(0, len(data), 16 << 10):
            w.write(data[off : off + (16 << 10)])
        digest = w.commit().digest
    store.close()
    assert calls == [0]
    assert store.blob_path(digest).read_bytes() == data
