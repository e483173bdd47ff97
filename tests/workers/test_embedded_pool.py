"""The embedded executor starts its build processes only when two or more layers need building
(start-up: a tiny chain, or one with everything built, pays no process spawn)."""

from __future__ import annotations

from pathlib import Path

from blobchain.client.api import Client
from blobchain.config.settings import Settings


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


def test_two_builds_use_the_pool_and_give_the_same_blobs(tmp_path: Path) -> None:
    snaps = _snapshots(tmp_path, 2)
    with Client(Settings(store=str(tmp_path / "a")), jobs=2) as c:
        pooled = _build(c, snaps)
        assert c.executor._pool is not None  # type: ignore[attr-defined]
    with Client(Settings(store=str(tmp_path / "b")), jobs=2, in_process=True) as c:
        assert _build(c, snaps) == pooled


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
