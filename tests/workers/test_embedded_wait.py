"""The embedded executor while another process (another CLI run) holds a ref's lease: it waits
with backoff, reports WAITING, builds once the holder lets go, and gives up after the budget."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from blobchain.client.api import Client
from blobchain.config.factory import open_deps
from blobchain.config.settings import Settings
from blobchain.layers.errors import InProgress
from blobchain.layers.records import LayerOptions
from blobchain.workers.embedded import EmbeddedExecutor
from blobchain.workers.executor import BUILT, WAITING
from blobchain.workers.refjob import flight_key


def _snapshot(tmp_path: Path) -> Path:
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "f").write_bytes(b"held")
    return snap


def test_waits_for_the_holder_then_builds(tmp_path: Path) -> None:
    settings = Settings(store=str(tmp_path / "store"), wait_budget_s=60)
    ex = EmbeddedExecutor(settings, in_process=True)
    client = Client(settings, executor=ex)
    try:
        ref = client.register_chain([str(_snapshot(tmp_path))])[-1].ref_id
        # A second opening of the store stands for another process holding the ref.
        held = open_deps(settings).locks.try_acquire(flight_key(ref, LayerOptions()), 120)
        assert held is not None
        with client.lease() as lease:
            job = client.compute_blob_chain(ref, lease=lease)
            states = []
            deadline = time.monotonic() + 30
            while WAITING not in states:
                assert time.monotonic() < deadline, states
                states.append(job.progress()[ref].state)
                time.sleep(0.01)
            assert not job.done()
            held.release()
            result = job.wait(60)
        assert result.records[-1].blob is not None
        assert job.progress()[ref].state == BUILT
    finally:
        ex.close()


def test_gives_up_after_the_wait_budget(tmp_path: Path) -> None:
    settings = Settings(store=str(tmp_path / "store"), wait_budget_s=0.5)
    ex = EmbeddedExecutor(settings, in_process=True)
    client = Client(settings, executor=ex)
    try:
        ref = client.register_chain([str(_snapshot(tmp_path))])[-1].ref_id
        held = open_deps(settings).locks.try_acquire(flight_key(ref, LayerOptions()), 120)
        assert held is not None
        try:
            started = time.monotonic()
            with client.lease() as lease, pytest.raises(InProgress):
                client.compute_blob_chain(ref, lease=lease).wait(60)
            assert time.monotonic() - started < 30  # bounded by the budget, not the lease TTL
        finally:
            held.release()
        assert client.status(ref).blob is None
    finally:
        ex.close()
