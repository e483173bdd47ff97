"""How the embedded executor and a Celery worker split the cores between the builds they run at
once."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobchain.client.api import Client
from blobchain.config.factory import DepsOpener, open_deps
from blobchain.config.settings import Settings
from blobchain.layers.compress import threads_for_share
from blobchain.layers.records import Compression, LayerOptions
from blobchain.tasks import layer_tasks, startup
from blobchain.tasks.startup import WorkerContext
from blobchain.workers.embedded import EmbeddedExecutor


def _embedded(settings: Settings, jobs: int) -> EmbeddedExecutor:
    return EmbeddedExecutor(open_deps(settings), opener=DepsOpener(settings), jobs=jobs, in_process=True)


def test_zstd_gets_its_share_and_gzip_all_cores() -> None:
    assert threads_for_share(Compression.ZSTD, 2) == 2
    assert threads_for_share(Compression.ZSTD, 0) == 1  # more builds than cores
    assert threads_for_share(Compression.GZIP, 1) is None
    assert threads_for_share(Compression.UNCOMPRESSED, 1) is None


@pytest.mark.parametrize(
    ("cpus", "jobs", "refs", "comp", "want"),
    [
        (4, 2, 5, "zstd", 2),  # two builds at once: half the cores each
        (4, 2, 1, "zstd", None),  # one layer: all of them (None: every core)
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
    ex = _embedded(Settings(store=str(tmp_path / "store")), jobs)
    try:
        assert ex.deps.sharing_cores(LayerOptions(compression=comp), ex._builds_at_once(refs)).threads == want
    finally:
        ex.close()


def test_configured_threads_win(tmp_path: Path) -> None:
    ex = _embedded(Settings(store=str(tmp_path / "store"), threads=3), 2)
    try:
        # The Deps carry threads=3 from the settings, whatever the sharing.
        assert ex.deps.sharing_cores(LayerOptions(compression="zstd"), ex._builds_at_once(5)).threads == 3
        assert ex.deps.threads == 3
    finally:
        ex.close()


def _context(tmp_path: Path, **kw: object) -> WorkerContext:
    settings = Settings(store=str(tmp_path / "store"), **kw)
    # Embedded stores: only the Deps are used here (no delivery to track, no counters).
    return WorkerContext(settings, open_deps(settings), None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pool", "comp", "want"),
    [
        (2, "zstd", 2),  # 4 cores, 2 builds at once
        (8, "zstd", 1),
        (2, "gzip", None),  # all cores
        (1, "zstd", None),  # one build at a time: all cores
        (None, "zstd", None),  # pool size unknown
    ],
)
def test_a_worker_build_takes_its_share_of_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: int | None, comp: str, want: int | None
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(startup, "_pool_size", pool)
    ctx = _context(tmp_path)
    deps = layer_tasks.build_deps(ctx, LayerOptions(compression=comp))
    assert deps.threads == want
    assert deps.content is ctx.deps.content


def test_configured_threads_win_in_a_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "_pool_size", 2)
    ctx = _context(tmp_path, threads=3)
    assert layer_tasks.build_deps(ctx, LayerOptions(compression="zstd")).threads == 3


def test_the_worker_notes_its_pool_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import Celery
    from celery.worker import WorkController

    monkeypatch.setattr(startup, "_pool_size", None)
    app = Celery("core-share", broker="memory://", backend="cache+memory://")
    WorkController(app=app, concurrency=3, pool_cls="solo", without_mingle=True, without_gossip=True)
    assert startup.pool_size() == 3


def test_refs_that_already_have_the_blob_do_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"base")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_bytes(b"top")
    seen: list[int | None] = []
    settings = Settings(store=str(tmp_path / "store"))
    ex = _embedded(settings, 2)
    real = ex._builds_at_once
    monkeypatch.setattr(ex, "_builds_at_once", lambda n: seen.append(n) or real(n))
    try:
        client = Client(settings, executor=ex, deps=ex.deps)
        specs = client.register_chain([str(tmp_path / "a")])
        with client.lease() as lease:
            client.compute_blob_chain(specs[-1].ref_id, lease=lease, compression="zstd").wait(60)
        specs = client.register_chain([str(tmp_path / "a"), str(tmp_path / "b")])
        with client.lease() as lease:
            client.compute_blob_chain(specs[-1].ref_id, lease=lease, compression="zstd").wait(60)
    finally:
        ex.close()
    assert seen == [1, 1]  # the second run builds only the new top layer: all 4 cores for it
