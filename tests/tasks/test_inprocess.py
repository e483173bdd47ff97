"""The adapter with an in-process worker (threads pool): waiting on a ref another worker holds,
the wait budget, progress events, cached resubmission, cancellation."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsgen
import pytest

from blobchain.client.api import Client
from blobchain.config.factory import open_deps
from blobchain.config.settings import Settings
from blobchain.layers.errors import BlobchainError, Cancelled, Unavailable
from blobchain.layers.records import LayerOptions
from blobchain.tasks.app import make_app
from blobchain.tasks.submit import CeleryExecutor
from blobchain.workers.errors import InProgress
from blobchain.workers.executor import BUILT, CACHED, RUNNING, WAITING
from blobchain.workers.refjob import flight_key

from .conftest import built_counts, inproc_worker, run_chain

pytestmark = pytest.mark.integration


@pytest.fixture
def chain(snapdir: Path) -> list[Path]:
    s0 = fsgen.build(snapdir / "s0", {b"a": fsgen.File(b"a" * 5000), b"d/": fsgen.Dir()})
    s1 = fsgen.build(snapdir / "s1", {b"a": fsgen.File(b"a" * 5000), b"d/b": fsgen.File(b"b" * 3000)})
    return [s0, s1]


@pytest.fixture
def worker(settings: Settings) -> Iterator[Any]:
    with inproc_worker(make_app(settings)) as w:
        yield w


def _until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_held_ref_waits_without_failing_then_builds_once(
    settings: Settings, chain: list[Path], worker: Any
) -> None:
    opts = LayerOptions()
    with Client(settings) as client:
        specs = client.register_chain(chain)
        top = specs[-1].ref_id
        # Another "worker" holds the top ref's lease.
        held = open_deps(settings).claims.try_acquire(flight_key(top, opts), 120)
        assert held is not None
        with client.lease() as lease:
            job = client.compute_blob_chain(top, lease=lease)
            seen = []  # one read: a retry may flip WAITING to RUNNING between two reads
            _until(
                lambda: seen.append(job.progress()[top]) or seen[-1].state == WAITING,
                60,
                "the top ref to wait",
            )
            err = seen[-1].error
            assert err is not None and err["code"] == "in_progress"
            assert not job.done()
            held.release()
            result = job.wait(60)
    assert [r.ref_id for r in result.records] == [s.ref_id for s in specs]
    assert built_counts(settings) == {f"{s.ref_id}#{opts.variant_key()}": 1 for s in specs}


def test_the_wait_budget_bounds_the_wait(make_settings: Any, chain: list[Path]) -> None:
    settings = make_settings(wait_budget_s=0.5)
    with inproc_worker(make_app(settings)), Client(settings) as client:
        specs = client.register_chain(chain)
        held = open_deps(settings).claims.try_acquire(flight_key(specs[0].ref_id, LayerOptions()), 120)
        assert held is not None
        try:
            with client.lease() as lease, pytest.raises(InProgress) as info:
                client.compute_blob_chain(specs[-1].ref_id, lease=lease).wait(60)
        finally:
            held.release()
    assert specs[0].ref_id in info.value.message
    assert client.deps.metadata.get(specs[0].ref_id).blob is None


def test_progress_events_then_a_cached_resubmission(
    settings: Settings, chain: list[Path], snapdir: Path, worker: Any
) -> None:
    big = fsgen.build(
        snapdir / "big", {b"a": fsgen.File(b"a" * 5000), b"z": fsgen.File(os.urandom(24 << 20))}
    )
    with Client(settings) as client:
        specs = client.register_chain([*chain, big])
        with client.lease() as lease:
            job = client.compute_blob_chain(specs[-1].ref_id, lease=lease, compression="gzip", level=9)
            events = list(job.events(timeout=60))
            result = job.wait(10)
        assert job.done()
        final = job.progress()
        assert {r: e.state for r, e in final.items()} == {s.ref_id: BUILT for s in specs}
        assert all(e.bytes == b.size for e, b in zip(final.values(), result.layer_blobs(), strict=True))
        # The big layer (~1 s of gzip -9) outlasts the poller's 0.5 s ceiling, so it is seen running.
        assert any(e.state == RUNNING for e in events if e.ref_id == specs[-1].ref_id)
        # Each ref's own stream ends finished; refs interleave, so look per ref.
        last = {e.ref_id: e.state for e in events}
        assert last == {s.ref_id: BUILT for s in specs}

        again = run_chain(settings, [*chain, big], compression="gzip", level=9)
        assert again.to_dict() == result.to_dict()
        with client.lease() as lease:
            job = client.compute_blob_chain(specs[-1].ref_id, lease=lease, compression="gzip", level=9)
            job.wait(60)
        assert {e.state for e in job.progress().values()} == {CACHED}


def test_closing_with_cancel_stops_following(settings: Settings, chain: list[Path], worker: Any) -> None:
    ex = CeleryExecutor(settings, open_deps(settings))
    client = Client(settings, executor=ex)
    specs = client.register_chain(chain)
    held = open_deps(settings).claims.try_acquire(flight_key(specs[-1].ref_id, LayerOptions()), 120)
    assert held is not None
    try:
        job = ex.submit(specs[-1].ref_id, LayerOptions())
        ex.close(cancel=True)
        with pytest.raises(BlobchainError) as info:
            job.wait(30)
        assert isinstance(info.value, Cancelled)
    finally:
        held.release()


def test_an_unreachable_broker_is_a_clear_unavailable_error(
    make_settings: Any, redis_service: Any, chain: list[Path]
) -> None:
    import services

    dead = f"redis://127.0.0.1:{services.free_port()}/1"
    settings = make_settings(broker_url=dead, result_url=dead, lock_url=redis_service.url_for(3))
    with Client(settings) as client:
        specs = client.register_chain(chain)
        with client.lease() as lease, pytest.raises(Unavailable) as info:
            client.compute_blob_chain(specs[-1].ref_id, lease=lease)
    assert "127.0.0.1" in info.value.message
