"""How the embedded executor splits the cores between the builds it runs at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobchain.config.settings import Settings
from blobchain.layers.compress import threads_for_share
from blobchain.layers.records import Compression, LayerOptions
from blobchain.workers.embedded import EmbeddedExecutor


def test_zstd_gets_its_share_and_gzip_all_cores() -> None:
    assert threads_for_share(Compression.ZSTD, 2) == 2
    assert threads_for_share(Compression.ZSTD, 0) == 1  # more builds than cores
    assert threads_for_share(Compression.GZIP, 1) is None
    assert threads_for_share(Compression.UNCOMPRESSED, 1) is None


@pytest.mark.parametrize(
    ("cpus", "jobs", "refs", "comp", "want"),
    [
        (4, 2, 5, "zstd", 2),  # two builds at once: half the cores each
        (4, 2, 1, "zstd", 4),  # one layer: all of them
        (2, 4, 3, "zstd", 1),  # more builds than cores: one worker each
        (4, 2, 5, "gzip", None),  # gzip keeps every core
    ],
)
def test_threads_per_build(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cpus: int,
    jobs: int,
    refs: int,
    comp: str,
    want: int | None,
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    ex = EmbeddedExecutor(Settings(store=str(tmp_path / "store")), jobs=jobs, in_process=True)
    try:
        assert ex._threads_per_build(LayerOptions(compression=comp), refs) == want
    finally:
        ex.close()


def test_configured_threads_win(tmp_path: Path) -> None:
    ex = EmbeddedExecutor(Settings(store=str(tmp_path / "store"), threads=3), jobs=2, in_process=True)
    try:
        # None: the Deps already carry threads=3 from the settings.
        assert ex._threads_per_build(LayerOptions(compression="zstd"), 5) is None
        assert ex.deps.threads == 3
    finally:
        ex.close()
