"""Byte parity with containerd on generated chains: the round-trip property's ``chains()``
generator (tests/fschains.py) fed to a private containerd.

Each example's states are built for real, committed to containerd one on top of the other, and
each layer's ``ctr snapshots diff`` tar must equal ours (``diff`` -> ``tar_entries`` ->
``write_tar``) byte for byte. Examples are bounded (``$BLOBCHAIN_PARITY_EXAMPLES``, default 15)
to keep CI time reasonable; the seed is printed, and ``$BLOBCHAIN_PARITY_SEED`` replays a run.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import fsgen
import pytest
import services
from fschains import Model, chains
from hypothesis import HealthCheck, given, seed, settings

from blobchain.layers.changes import diff
from blobchain.layers.entries import tar_entries
from blobchain.layers.snapshot import Snapshot, open_snapshot
from blobchain.layers.tarwriter import write_tar

from .containerd import Containerd, first_difference

pytestmark = [pytest.mark.compat, services.needs_root("containerd, mknod, chown, capabilities")]

SEED = int(os.environ.get("BLOBCHAIN_PARITY_SEED") or random.SystemRandom().randrange(2**32))
EXAMPLES = int(os.environ.get("BLOBCHAIN_PARITY_EXAMPLES", "15"))


def _ours(lower: Path | None, upper: Path) -> bytes:
    buf = bytearray()
    with open_snapshot(upper) as up:
        low: Snapshot | None = open_snapshot(lower) if lower is not None else None
        try:
            write_tar(tar_entries(diff(low, up), up), up, buf.extend)
        finally:
            if low is not None:
                low.close()
    return bytes(buf)


@pytest.fixture(scope="module", autouse=True)
def _announce_seed() -> None:
    # Shown with -s or -rA, and in every failure message below.
    print(f"\ncontainerd parity on generated chains: hypothesis seed {SEED} (BLOBCHAIN_PARITY_SEED={SEED})")


@seed(SEED)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
    database=None,  # the seed, not a local database, replays a run
)
@given(states=chains())
def test_generated_chains_match_containerd(ctrd: Containerd, states: list[Model]) -> None:
    with tempfile.TemporaryDirectory(prefix="bc-gen-") as tmp:
        parent_key: str | None = None
        parent_dir: Path | None = None
        for i, m in enumerate(states):
            state = fsgen.build(Path(tmp) / f"s{i}", m.spec())
            key = ctrd.commit_state(state, parent=parent_key)
            report = first_difference(_ours(parent_dir, state), ctrd.diff_bytes(key))
            assert report is None, f"layer {i} of {len(states)} (seed {SEED}): {report}"
            parent_key, parent_dir = key, state
