"""write_tar: Go-identical streams, bodies checked against the walk, flat memory."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blobchain.layers.errors import BlobchainError, FileChanged, InvalidArgument
from blobchain.layers.tarentry import TYPE_DIR, TYPE_REG, TYPE_SYMLINK, TarEntry
from blobchain.layers.tarheader import encode_header
from blobchain.layers.tarwriter import CHUNK_SIZE, write_tar

GOLDEN = Path(__file__).parent / "golden"
EMPTY_SHA256 = "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"


class DirSnapshot:
    """Stand-in for layers.snapshot.Snapshot: ``open_file`` over a plain directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.opened: list[bytes] = []

    def open_file(self, rel: bytes) -> int:
        self.opened.append(rel)
        return os.open(os.path.join(bytes(self.root), rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


class NoBodies:
    def open_file(self, rel: bytes) -> int:
        raise AssertionError(f"no body should be opened, got {rel!r}")


class Collect:
    """A ``write`` that keeps every chunk (and checks it is immutable bytes)."""

    def __init__(self, hook: Callable[[int], None] | None = None) -> None:
        self.chunks: list[bytes] = []
        self.hook = hook

    def __call__(self, data: bytes) -> None:
        assert type(data) is bytes
        self.chunks.append(data)
        if self.hook is not None:
            self.hook(len(self.chunks))

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def file_entry(root: Path, rel: str, **kw: Any) -> TarEntry:
    st = os.lstat(root / rel)
    return TarEntry(
        name=rel.encode(),
        typeflag=TYPE_REG,
        mode=0o644,
        size=st.st_size,
        mtime=int(st.st_mtime),
        source=rel.encode(),
        ino=st.st_ino,
        dev=st.st_dev,
        mtime_ns=st.st_mtime_ns,
        **kw,
    )


def entries_from_golden(case: dict[str, Any], root: Path) -> list[TarEntry]:
    out = []
    for i, e in enumerate(case["entries"]):
        source = None
        if e.get("body_hex"):
            source = b"body%d" % i
            (root / source.decode()).write_bytes(bytes.fromhex(e["body_hex"]))
        out.append(
            TarEntry(
                name=bytes.fromhex(e["name_hex"]),
                typeflag=e["typeflag"].encode(),
                mode=e["mode"],
                uid=e["uid"],
                gid=e["gid"],
                size=e["size"],
                mtime=e["mtime"],
                linkname=bytes.fromhex(e["linkname_hex"]),
                devmajor=e["devmajor"],
                devminor=e["devminor"],
                pax={k: bytes.fromhex(v) for k, v in e["pax_hex"].items()},
                source=source,
            )
        )
    return out


STREAMS = {c["id"]: c for c in json.loads((GOLDEN / "streams.json").read_text())["cases"]}


# --- bytes ------------------------------------------------------------------------------------


def test_empty_stream_is_two_zero_blocks() -> None:
    out = Collect()
    calls: list[tuple[int, int]] = []
    n = write_tar([], NoBodies(), out, lambda f, b: calls.append((f, b)))
    assert n == 1024
    assert out.data == bytes(1024)
    assert hashlib.sha256(out.data).hexdigest() == EMPTY_SHA256
    assert calls == [(0, 1024)]


@pytest.mark.parametrize("case_id", sorted(STREAMS))
def test_stream_matches_go(case_id: str, tmp_path: Path) -> None:
    case = STREAMS[case_id]
    out = Collect()
    n = write_tar(entries_from_golden(case, tmp_path), DirSnapshot(tmp_path), out)
    assert out.data == bytes.fromhex(case["tar_hex"])
    assert n == len(out.data)
    assert hashlib.sha256(out.data).hexdigest() == case["sha256"]


def test_stream_matches_go_with_the_real_snapshot(tmp_path: Path) -> None:
    from blobchain.layers.snapshot import open_snapshot

    case = STREAMS["layer"]
    entries = entries_from_golden(case, tmp_path)
    out = Collect()
    with open_snapshot(tmp_path) as snap:
        write_tar(entries, snap, out)
    assert out.data == bytes.fromhex(case["tar_hex"])


@pytest.mark.parametrize(
    "size", [1, 511, 512, 513, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 7]
)
def test_bodies_are_streamed_and_padded(tmp_path: Path, size: int) -> None:
    body = os.urandom(size)
    (tmp_path / "f").write_bytes(body)
    (tmp_path / "g").write_bytes(b"tail")
    entries = [file_entry(tmp_path, "f"), TarEntry(name=b"d/", typeflag=TYPE_DIR), file_entry(tmp_path, "g")]
    out = Collect()
    n = write_tar(entries, DirSnapshot(tmp_path), out)
    padded = size + (-size % 512)
    assert n == len(out.data) == 512 + padded + 512 + 512 + 512 + 1024
    assert out.data[512 : 512 + size] == body
    assert out.data[512 + size : 512 + padded] == bytes(padded - size)
    assert out.data.endswith(bytes(1024))
    with tarfile.open(fileobj=io.BytesIO(out.data)) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["f", "d", "g"]
        assert tf.extractfile(members[0]).read() == body  # type: ignore[union-attr]
        assert tf.extractfile(members[2]).read() == b"tail"  # type: ignore[union-attr]


def test_header_only_types_never_open_a_body() -> None:
    entries = [
        TarEntry(name=b"d/", typeflag=TYPE_DIR, size=0),
        TarEntry(name=b"l", typeflag=TYPE_SYMLINK, linkname=b"x", size=10, source=b"x"),
        TarEntry(name=b"e", typeflag=TYPE_REG, size=0, source=b"e"),
    ]
    out = Collect()
    assert write_tar(entries, NoBodies(), out) == 3 * 512 + 1024


def test_small_pieces_are_batched(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"f{i}").write_bytes(b"x" * (i * 17))
    entries = []
    for i in range(3000):
        e = file_entry(tmp_path, f"f{i % 40}")
        e.name = b"n%d" % i
        entries.append(e)
    out = Collect()
    n = write_tar(entries, DirSnapshot(tmp_path), out)
    assert n == len(out.data) > 2 * CHUNK_SIZE
    assert len(out.chunks) <= n // CHUNK_SIZE + 2
    assert max(len(c) for c in out.chunks) < 2 * CHUNK_SIZE


def test_progress_is_rate_limited_and_ends_with_the_totals(tmp_path: Path) -> None:
    with open(tmp_path / "big", "wb") as f:
        f.truncate(9 * CHUNK_SIZE)
    entries = [TarEntry(name=b"d%d/" % i, typeflag=TYPE_DIR) for i in range(1000)]
    entries.append(file_entry(tmp_path, "big"))
    calls: list[tuple[int, int]] = []
    n = write_tar(entries, DirSnapshot(tmp_path), Collect(), lambda f, b: calls.append((f, b)))
    assert calls[-1] == (1001, n)
    assert len(calls) <= 1000 // 64 + 9 * CHUNK_SIZE // (4 << 20) + 3
    assert len(calls) >= 1000 // 64  # it does report along the way
    assert calls == sorted(calls)
    assert any(f == 1000 for f, _ in calls[:-1])  # reported while the big body streamed


# --- the body must be the walked file ---------------------------------------------------------


def test_vanished_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    e = file_entry(tmp_path, "f")
    (tmp_path / "f").unlink()
    with pytest.raises(FileChanged):
        write_tar([e], DirSnapshot(tmp_path), Collect())


def test_replaced_file_same_size(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    e = file_entry(tmp_path, "f")
    (tmp_path / "new").write_bytes(b"DATA")
    os.utime(tmp_path / "new", ns=(e.mtime_ns, e.mtime_ns))
    os.replace(tmp_path / "new", tmp_path / "f")
    with pytest.raises(FileChanged, match="inode"):
        write_tar([e], DirSnapshot(tmp_path), Collect())


@pytest.mark.parametrize("new", [b"data+more", b"da"])
def test_resized_since_the_walk(tmp_path: Path, new: bytes) -> None:
    (tmp_path / "f").write_bytes(b"data")
    e = file_entry(tmp_path, "f")
    with open(tmp_path / "f", "r+b") as f:  # same inode
        f.truncate(0)
        f.write(new)
    os.utime(tmp_path / "f", ns=(e.mtime_ns, e.mtime_ns))
    with pytest.raises(FileChanged, match="size"):
        write_tar([e], DirSnapshot(tmp_path), Collect())


def test_mtime_changed_since_the_walk(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    e = file_entry(tmp_path, "f")
    os.utime(tmp_path / "f", ns=(e.mtime_ns + 1, e.mtime_ns + 1))
    with pytest.raises(FileChanged, match="mtime"):
        write_tar([e], DirSnapshot(tmp_path), Collect())


def test_not_a_regular_file_any_more(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    e = file_entry(
        tmp_path,
        "f",
    )
    (tmp_path / "f").unlink()
    (tmp_path / "f").mkdir()
    e.ino = e.dev = e.mtime_ns = 0  # nothing recorded: the type check alone must catch it
    with pytest.raises(FileChanged, match="regular"):
        write_tar([e], DirSnapshot(tmp_path), Collect())


def _body_race(tmp_path: Path, act: Callable[[Path], None], match: str) -> None:
    """Run ``act`` on the file after the writer has fstat'ed it, from inside ``write``."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(4 * CHUNK_SIZE))
    e = file_entry(tmp_path, "f")

    def hook(n_calls: int) -> None:
        if n_calls == 2:  # header batch flushed, first 1 MiB chunk written
            act(path)

    with pytest.raises(FileChanged, match=match):
        write_tar([e], DirSnapshot(tmp_path), Collect(hook))


def test_file_grows_while_read(tmp_path: Path) -> None:
    def grow(p: Path) -> None:
        with open(p, "ab") as f:
            f.write(b"more")

    _body_race(tmp_path, grow, "grew")


def test_file_shrinks_while_read(tmp_path: Path) -> None:
    _body_race(tmp_path, lambda p: os.truncate(p, CHUNK_SIZE + 5), "early")


def test_file_rewritten_in_place_while_read(tmp_path: Path) -> None:
    def rewrite(p: Path) -> None:
        st = os.stat(p)
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, b"X", 0)  # already sent: only the after-read fstat can see it
        finally:
            os.close(fd)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with mtime put back

    _body_race(tmp_path, rewrite, "while being read")


def test_symlinked_source_is_refused_by_the_real_snapshot(tmp_path: Path) -> None:
    from blobchain.layers.snapshot import open_snapshot

    (tmp_path / "target").write_bytes(b"secret")
    (tmp_path / "f").symlink_to("target")
    e = TarEntry(name=b"f", typeflag=TYPE_REG, size=6, source=b"f")
    out = Collect()
    with open_snapshot(tmp_path) as snap, pytest.raises(BlobchainError):
        write_tar([e], snap, out)
    assert b"secret" not in out.data


def test_body_without_source_is_a_bug() -> None:
    with pytest.raises(InvalidArgument):
        write_tar([TarEntry(name=b"f", typeflag=TYPE_REG, size=3)], NoBodies(), Collect())


# --- memory -------------------------------------------------------------------------------------


def test_large_file_streams_with_flat_memory(tmp_path: Path) -> None:
    size = 384 * CHUNK_SIZE + 123  # sparse: no disk, but every byte is read and hashed
    with open(tmp_path / "big", "wb") as f:
        f.truncate(size)
    e = file_entry(tmp_path, "big")
    digest = hashlib.sha256()
    largest = 0

    def write(data: bytes) -> None:
        nonlocal largest
        largest = max(largest, len(data))
        digest.update(data)

    tracemalloc.start()
    try:
        n = write_tar([e], DirSnapshot(tmp_path), write)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * CHUNK_SIZE  # vs a 384 MiB body
    assert largest <= 2 * CHUNK_SIZE
    assert n == 512 + size + (-size % 512) + 1024

    want = hashlib.sha256(encode_header(e))
    zeros = bytes(CHUNK_SIZE)
    left = size + (-size % 512) + 1024
    while left:
        step = min(left, CHUNK_SIZE)
        want.update(zeros[:step])
        left -= step
    assert digest.hexdigest() == want.hexdigest()


def test_big_bodies_arrive_as_whole_stream_aligned_chunks(tmp_path: Path) -> None:
    """After a big body's first (short) read, every write ends on a CHUNK_SIZE boundary of the
    stream, so a block compressor downstream gets whole blocks it can keep without a copy."""
    small = os.urandom(1000)
    big = os.urandom(5 * CHUNK_SIZE + 12345)
    (tmp_path / "a").write_bytes(small)
    (tmp_path / "b").write_bytes(big)
    out = Collect()
    write_tar([file_entry(tmp_path, "a"), file_entry(tmp_path, "b")], DirSnapshot(tmp_path), out)
    ends, pos = [], 0
    for c in out.chunks:
        pos += len(c)
        ends.append(pos)
    body_start = 512 + 1024 + 512  # a's header and padded body, b's header
    whole = [c for c in out.chunks if len(c) == CHUNK_SIZE]
    assert len(whole) >= 4  # the big body's middle: whole chunks, each a bytes object
    assert all(type(c) is bytes for c in whole)
    aligned = [e for e in ends if body_start < e <= body_start + len(big) - CHUNK_SIZE]
    assert aligned and all(e % CHUNK_SIZE == 0 for e in aligned)
    assert out.data[body_start : body_start + len(big)] == big
