"""The embedded executor starts its build processes only when two or more layers need building
and they are not small (start-up: a tiny chain, or one with everything built, pays no process
spawn)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blobchain.client.api import Client
from blobchain.config.factory import DepsOpener, open_deps
from blobchain.config.settings import Settings
from blobchain.workers import embedded
from blobchain.workers.embedded import EmbeddedExecutor


def _snapshots(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        d = tmp_path / f"s{i}"
        d.mkdir()
        for j in range(i + 1):
            (d / f"f{j}").write_bytes(b"x" * (j + 1))
        out.append(d)
    return out


def _build(client: Client, snaps: list[Path]) -> tuple[str, ...]:
    specs = client.register_chain(snaps)
    with client.lease() as lease:
        result = client.compute_blob_chain(specs[-1].ref_id, lease=lease).wait(120)
    return tuple(r.blob.digest for r in result.records if r.blob)


def test_one_build_or_none_runs_without_the_pool(tmp_path: Path) -> None:
    snaps = _snapshots(tmp_path, 2)
    settings = Settings(store=str(tmp_path / "store"))
    with Client(settings, jobs=2) as c:
        one = _build(c, snaps[:1])  # a lone build
        assert c.executor._pool is None  # type: ignore[attr-defined]
        both = _build(c, snaps)  # one more layer to build: still alone
        assert c.executor._pool is None  # type: ignore[attr-defined]
        assert both[0] == one[0]
    with Client(settings, jobs=2) as c:
        assert _build(c, snaps) == both  # everything built: answered here
        assert c.executor._pool is None  # type: ignore[attr-defined]


def _client(settings: Settings, **kw: int) -> Client:
    """A client whose embedded executor takes ``kw`` (the small-build thresholds)."""
    ex = EmbeddedExecutor(open_deps(settings), opener=DepsOpener(settings), jobs=2, **kw)
    return Client(settings, executor=ex, deps=ex.deps)


def test_two_builds_that_are_not_small_use_the_pool_and_give_the_same_blobs(tmp_path: Path) -> None:
    snaps = _snapshots(tmp_path, 2)
    with _client(Settings(store=str(tmp_path / "a")), small_entries=0, small_bytes=0) as c:
        pooled = _build(c, snaps)
        assert c.executor._pool is not None  # type: ignore[attr-defined]
    with Client(Settings(store=str(tmp_path / "b")), jobs=2) as c:
        assert _build(c, snaps) == pooled  # small: built in this process, the same bytes
        assert c.executor._pool is None  # type: ignore[attr-defined]
    with Client(Settings(store=str(tmp_path / "c")), jobs=2, in_process=True) as c:
        assert _build(c, snaps) == pooled


@pytest.mark.parametrize("compression", ["gzip", "zstd", "uncompressed"])
def test_small_builds_run_here_and_match_pool_builds(tmp_path: Path, compression: str) -> None:
    # Three layers (files added, changed, removed): built here, and in the pool, same records.
    snaps = _snapshots(tmp_path, 3)
    (snaps[2] / "f0").unlink()
    (snaps[2] / "f1").write_bytes(b"changed")
    os.symlink("f2", snaps[2] / "link")
    results = []
    for name, kw in (("here", {}), ("pool", {"small_entries": 0, "small_bytes": 0})):
        with _client(Settings(store=str(tmp_path / name)), **kw) as c:
            specs = c.register_chain(snaps)
            with c.lease() as lease:
                res = c.compute_blob_chain(specs[-1].ref_id, compression=compression, lease=lease).wait(120)
            assert (c.executor._pool is None) == (name == "here")  # type: ignore[attr-defined]
            results.append([(r.blob, r.chain_id, r.blob_chain_id) for r in res.records])
    assert results[0] == results[1]


def test_a_chain_over_the_entry_or_byte_budget_uses_the_pool(tmp_path: Path) -> None:
    snaps = _snapshots(tmp_path, 2)  # 1 + 2 entries; 1 + 3 bytes
    for kw, pooled in (
        ({"small_entries": 4, "small_bytes": 5}, False),  # s0 once, s1 (its lower s0 counted once)
        ({"small_entries": 2, "small_bytes": 1 << 20}, True),
        ({"small_entries": 1 << 20, "small_bytes": 3}, True),
    ):
        with _client(Settings(store=str(tmp_path / f"st-{len(os.listdir(tmp_path))}")), **kw) as c:
            _build(c, snaps)
            assert (c.executor._pool is not None) == pooled, kw  # type: ignore[attr-defined]


def test_the_size_probe_stays_inside_the_roots_and_follows_no_symlink(tmp_path: Path) -> None:
    # A big tree outside the snapshot, reached through a symlink: not counted (the engine would
    # not read it either), so the chain is still small.
    big = tmp_path / "elsewhere"
    big.mkdir()
    for i in range(50):
        (big / f"x{i}").write_bytes(b"y" * 1000)
    snaps = _snapshots(tmp_path, 2)
    os.symlink(big, snaps[1] / "out")
    budget = embedded._Budget(10, 100)
    assert embedded._fits(str(snaps[1]), None, budget)
    assert (budget.entries, budget.nbytes) == (10 - 3, 100 - 3)
    # A snapshot outside the roots is not small (its build fails with the engine's error).
    assert not embedded._fits(str(snaps[1]), (str(tmp_path / "nowhere"),), embedded._Budget(10, 100))


def test_a_missing_snapshot_is_not_small(tmp_path: Path) -> None:
    snaps = _snapshots(tmp_path, 2)
    assert not embedded._fits(str(tmp_path / "gone"), None, embedded._Budget(10, 100))
    assert embedded._fits(str(snaps[0]), None, embedded._Budget(10, 100))


def test_a_lone_build_at_a_high_zstd_level_uses_the_pool(tmp_path: Path) -> None:
    # One libzstd call can run for seconds there; only a pool child can be killed on Ctrl-C.
    snaps = _snapshots(tmp_path, 1)
    with Client(Settings(store=str(tmp_path / "store")), jobs=2) as c:
        specs = c.register_chain(snaps)
        with c.lease() as lease:
            c.compute_blob_chain(specs[-1].ref_id, compression="zstd", level=12, lease=lease).wait(120)
        assert c.executor._pool is not None  # type: ignore[attr-defined]


def test_the_cli_imports_no_registry_client_or_distributed_stack() -> None:
    # Start-up of `blobchain export`: httpx (the registry client) loads only for a push, and
    # Celery, kombu, boto3, redis only in distributed mode.
    import subprocess
    import sys

    code = (
        "import sys, blobchain.client.cli; "
        "print(sorted(m for m in ('httpx', 'celery', 'kombu', 'boto3', 'botocore', 'redis') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pool_children_open_the_stores_from_the_plain_defaults(tmp_path: Path) -> None:
    # What the CLI hands over when nothing is configured: config.defaults.Defaults, pickled to
    # each build process (which then imports no pydantic-settings either).
    from blobchain.config.defaults import Defaults

    snaps = _snapshots(tmp_path, 2)
    settings = Defaults(store=str(tmp_path / "store"))
    ex = EmbeddedExecutor(open_deps(settings), opener=DepsOpener(settings), jobs=2, small_entries=0, small_bytes=0)
    with Client(settings, executor=ex, deps=ex.deps) as c:
        pooled = _build(c, snaps)
        assert c.executor._pool is not None  # type: ignore[attr-defined]
    with Client(Settings(store=str(tmp_path / "other")), in_process=True) as c:
        assert _build(c, snaps) == pooled


_DEAD_WRITER = """
import sys
from blobchain.config.factory import DepsOpener, open_deps
from blobchain.config.settings import Settings
from blobchain.workers.embedded import EmbeddedExecutor
settings = Settings(store=sys.argv[1])
ex = EmbeddedExecutor(open_deps(settings), opener=DepsOpener(settings), jobs=2)
ex._ensure_pool()
# As a child SIGKILLed in the middle of putting a progress event leaves it: the events queue's
# write lock held, never to be released.
ex._events._wlock.acquire()
ex.close()
print("closed", flush=True)
"""


def test_exit_does_not_hang_on_events_a_killed_child_left_locked(tmp_path: Path) -> None:
    """Regression (a CI hang of test_a_killed_build_process_is_a_one_line_error_not_a_traceback):
    the CLI printed its error, then hung at exit joining the events queue's feeder thread, which
    waited for the write lock the killed child still held."""
    argv = [sys.executable, "-c", _DEAD_WRITER, str(tmp_path / "store")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["closed"]
