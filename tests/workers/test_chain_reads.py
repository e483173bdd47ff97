"""A ref's build reads its chain once: its metadata round trips do not grow with the chain's
depth. Counted with a wrapper around the real stores (SQLite, and Redis where each call is a
round trip)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blobchain.layers.records import LayerOptions, RefSpec
from blobchain.storage.claims import ClaimService
from blobchain.storage.claims.local import LocalClaimService
from blobchain.storage.claims.redis import RedisClaimService
from blobchain.storage.content.local import LocalContentStore
from blobchain.storage.deps import Deps
from blobchain.storage.leases.sqlite import SqliteLeaseManager
from blobchain.storage.metadata import MetadataStore
from blobchain.storage.metadata.redis import RedisMetadataStore
from blobchain.storage.metadata.sqlite import SqliteMetadataStore
from blobchain.workers.refjob import build_ref


class Counting:
    """Forwards every call to the real store and counts it by method name."""

    def __init__(self, inner: MetadataStore) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return call


def _chain(tmp_path: Path, depth: int, kind: str) -> list[RefSpec]:
    specs: list[RefSpec] = []
    parent = None
    for i in range(depth):
        snap = tmp_path / f"d{depth}" / f"s{i}"
        snap.mkdir(parents=True)
        (snap / f"f{i}").write_text(f"layer {i}\n")
        ref = f"d{depth}-r{i}"
        specs.append(RefSpec(ref, str(snap), parent=parent, kind=kind if i else "rootfs"))
        parent = ref
    return specs


Stores = tuple[MetadataStore, ClaimService]


def _build_top_counting(tmp_path: Path, stores: Stores, depth: int, kind: str) -> Counter[str]:
    metadata, claims = stores
    for spec in _chain(tmp_path, depth, kind):
        metadata.register(spec)
    state = tmp_path / f"state{depth}"
    content = LocalContentStore(tmp_path / f"layout{depth}")
    counting = Counting(metadata)
    deps = Deps(
        content=content,
        metadata=counting,  # type: ignore[arg-type]  # a transparent proxy of a MetadataStore
        leases=SqliteLeaseManager(state / "leases.db"),
        claims=claims,
        threads=1,
    )
    try:
        outcome = build_ref(f"d{depth}-r{depth - 1}", LayerOptions(), deps)
    finally:
        content.close()
    assert outcome.action == "built"
    return counting.calls


@pytest.fixture(params=["sqlite", "redis"])
def open_stores(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[int], Stores]:
    """The metadata store and the claim service its writes are fenced on, per chain depth."""
    if request.param == "sqlite":
        return lambda depth: (
            SqliteMetadataStore(tmp_path / f"meta{depth}.db"),
            LocalClaimService(str(tmp_path / f"claims{depth}")),
        )
    client, prefix = request.getfixturevalue("redis_client"), request.getfixturevalue("redis_prefix")
    return lambda depth: (
        RedisMetadataStore(client, f"{prefix}d{depth}:"),
        RedisClaimService(client, f"{prefix}d{depth}:"),
    )


@pytest.mark.parametrize("kind", ["rootfs", "upper"])
def test_a_builds_metadata_reads_do_not_grow_with_depth(
    tmp_path: Path, open_stores: Callable[[int], Stores], kind: str
) -> None:
    counts = {depth: _build_top_counting(tmp_path, open_stores(depth), depth, kind) for depth in (1, 4, 24)}
    assert counts[1] == counts[4] == counts[24], counts
    assert counts[24]["chain_specs"] == 1  # the chain is read once per build
    assert sum(counts[24].values()) <= 6, counts[24]
