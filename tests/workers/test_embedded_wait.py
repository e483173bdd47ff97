"""The embedded executor while another process (another CLI run) holds a ref's lease: it waits
with backoff, reports WAITING, builds once the holder lets go, and gives up after the budget."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blobchain.client.api import Client
from blobchain.config.factory import open_deps
from blobchain.config.settings import Settings
from blobchain.layers.records import LayerOptions
from blobchain.workers.errors import InProgress
from blobchain.workers.executor import BUILT, WAITING
from blobchain.workers.refjob import flight_key


@contextlib.contextmanager
def _held_ref(tmp_path: Path, wait_budget_s: float) -> Iterator[tuple[Client, str, Any]]:
    """An in-process client, a registered one-layer ref, and that ref's lease held through a
    second opening of the store (standing for another process building it)."""
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "f").write_bytes(b"held")
    settings = Settings(store=str(tmp_path / "store"), wait_budget_s=wait_budget_s)
    client = Client(settings, in_process=True)
    ex = client.executor
    try:
        ref = client.register_chain([str(snap)])[-1].ref_id
        held = open_deps(settings).claims.try_acquire(flight_key(ref, LayerOptions()), 120)
        assert held is not None
        try:
            yield client, ref, held
        finally:
            held.release()  # idempotent: a test may have released it already
    finally:
        ex.close()


def test_waits_for_the_holder_then_builds(tmp_path: Path) -> None:
    with _held_ref(tmp_path, 60) as (client, ref, held), client.lease() as lease:
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


def test_gives_up_after_the_wait_budget(tmp_path: Path) -> None:
    with _held_ref(tmp_path, 0.5) as (client, ref, _):
        started = time.monotonic()
        with client.lease() as lease, pytest.raises(InProgress):
            client.compute_blob_chain(ref, lease=lease).wait(60)
        assert time.monotonic() - started < 30  # bounded by the budget, not the lease TTL
        assert client.status(ref).blob is None
