"""DirectFileWriter and the local store's direct ingests: the same bytes as plain writes, on
every size around the step, with errors and aborts that publish nothing."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from blobchain.layers.errors import StoreFull
from blobchain.storage.content.direct import STEP, DirectFileWriter
from blobchain.storage.content.local import LocalContentStore

from . import ingest_past_file_size_limit, tmpfs
from .contracts import digest_of

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _supports_direct(d: Path) -> bool:
    """Whether the filesystem at ``d`` takes O_DIRECT (asked apart from the code under test)."""
    try:
        fd = os.open(d / "probe", os.O_WRONLY | os.O_CREAT | _O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(d / "probe")
    return bool(_O_DIRECT)


def _fd_flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags line in fdinfo")


def _write_in_pieces(w: DirectFileWriter, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    mv = memoryview(data)
    while mv:
        n = min(len(mv), rng.choice([1, 511, 4096, 65536, 1 << 20, 3 << 20, STEP + 7]))
        w.write(mv[:n])
        mv = mv[n:]


@pytest.mark.parametrize(
    "size", [0, 1, 4095, STEP - 1, STEP, STEP + 1, 2 * STEP, 2 * STEP + 4097, 3 * STEP - 12345]
)
@pytest.mark.parametrize("direct", [True, False])
def test_file_holds_exactly_what_was_written(tmp_path: Path, size: int, direct: bool) -> None:
    data = _random(size, size)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        w = DirectFileWriter(fd, direct=direct)
        assert w.direct == (direct and _supports_direct(tmp_path))
        _write_in_pieces(w, data, seed=size)
        w.finish()
        if size % STEP:
            assert not _fd_flags(fd) & _O_DIRECT  # the unaligned tail went through the page cache
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_direct_mode_is_on_while_steps_are_written(tmp_path: Path) -> None:
    if not _supports_direct(tmp_path):
        pytest.fail(f"{tmp_path} does not take O_DIRECT: this test needs a filesystem that does (ext4, xfs)")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        w = DirectFileWriter(fd)
        w.write(_random(STEP + 10, 1))
        assert _fd_flags(fd) & _O_DIRECT
        w.finish()
        assert w.direct
    finally:
        os.close(fd)


def test_abandon_stops_and_writes_no_tail(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        w = DirectFileWriter(fd)
        w.write(_random(STEP + 100, 2))
        w.abandon()
        assert os.fstat(fd).st_size == STEP  # the full step was written; the 100 bytes were not
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct_writes", [True, False])
def test_local_ingest_of_a_multi_step_blob(tmp_path: Path, direct_writes: bool) -> None:
    store = LocalContentStore(tmp_path / "l", direct_writes=direct_writes)
    try:
        data = _random(2 * STEP + 333, 3)
        with store.ingest("big") as w:
            _write_in_pieces(w, data, seed=4)  # type: ignore[arg-type]
            info = w.commit(size=len(data), expected=digest_of(data))
        assert store.blob_path(info.digest).read_bytes() == data
        assert sorted(os.listdir(store.ingest_dir)) == []
    finally:
        store.close()


def test_store_full_during_a_direct_step(tmp_path: Path) -> None:
    # The tmpfs is smaller than two steps: the second direct write fails with ENOSPC on the writer
    # thread, and the next write reports it as StoreFull; nothing is published or left behind.
    with tmpfs(tmp_path / "mnt", "12m") as mnt:
        store = LocalContentStore(mnt)
        try:
            big = _random(4 * STEP, 5)
            with pytest.raises(StoreFull, match="full") as caught, store.ingest("big") as w:
                for i in range(0, len(big), 1 << 20):
                    w.write(big[i : i + (1 << 20)])
                w.commit()
            assert caught.value.details.get("errno") == errno.ENOSPC
            assert list(store.list_digests()) == []
            assert sorted(os.listdir(store.ingest_dir)) == []
            small = _random(100_000, 6)
            with store.ingest("small") as w:
                w.write(small)
                assert w.commit().digest == digest_of(small)
        finally:
            store.close()


def test_file_size_limit_during_a_direct_step(tmp_path: Path) -> None:
    ingest_past_file_size_limit(tmp_path / "l", STEP + 4096, 4 * STEP)
    store = LocalContentStore(tmp_path / "l")
    try:
        assert list(store.list_digests()) == []
        assert sorted(os.listdir(store.ingest_dir)) == []
    finally:
        store.close()
