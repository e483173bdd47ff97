"""write_layer's overlapped pipeline: same bytes and digests as a plain pass, sink errors."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import pytest

from blobchain.layers.compress import open_decompressor
from blobchain.layers.layer import LayerSource, write_layer
from blobchain.layers.records import Compression, LayerOptions
from blobchain.layers.snapshot import open_snapshot


def _helper_threads() -> list[str]:
    names = ("diffid-sha256", "blob-sink", "gzip")
    return [t.name for t in threading.enumerate() if t.name.startswith(names)]


@pytest.fixture
def big_snapshot(tmp_path: Path) -> Path:
    root = tmp_path / "snap"
    root.mkdir()
    (root / "weights.bin").write_bytes(os.urandom(9 << 20 | 12345))  # many chunks, an odd tail
    (root / "small").write_bytes(b"x" * 100)
    return root


@pytest.mark.parametrize("comp", [Compression.UNCOMPRESSED, Compression.GZIP, Compression.ZSTD])
def test_overlapped_pipeline_gives_the_plain_digests(big_snapshot: Path, comp: Compression) -> None:
    blob = bytearray()
    stats = write_layer(LayerSource(open_snapshot(big_snapshot)), LayerOptions(compression=comp), blob.extend)
    tar = open_decompressor(io.BytesIO(bytes(blob)), comp).read()
    assert stats.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert stats.tar_size == len(tar)
    assert (big_snapshot / "weights.bin").read_bytes() in tar
    assert not _helper_threads()


def test_a_failing_sink_raises_its_first_error_and_stops_the_threads(big_snapshot: Path) -> None:
    calls = 0

    def sink(data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            raise OSError(28, f"no space (call {calls})")

    with pytest.raises(OSError, match=r"call 3\)"):
        write_layer(LayerSource(open_snapshot(big_snapshot)), LayerOptions(compression=Compression.UNCOMPRESSED), sink)
    assert calls == 3  # nothing is written after the first failure
    assert not _helper_threads()
