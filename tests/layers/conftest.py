"""Shared fixtures for the engine tests: trees built with :mod:`fsgen` and opened as snapshots."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import services

# tests/ holds shared helpers (fsgen); pytest's rootdir-relative imports do not put it on the path
# for this package-less folder.
_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import fsgen  # noqa: E402

from blobchain.layers.snapshot import Snapshot, open_snapshot  # noqa: E402

needs_root = services.needs_root("chown, mknod, security.capability, trusted.* xattrs")


@pytest.fixture
def snapshots(tmp_path: Path) -> Iterator[Callable[..., Snapshot]]:
    """``snapshots(spec, name="s")``: build ``spec`` under tmp_path/name and open it.

    Every snapshot opened this way is closed after the test."""
    opened: list[Snapshot] = []
    counter = iter(range(1_000_000))

    def make(spec: fsgen.Spec, name: str | None = None, **kw: object) -> Snapshot:
        root = fsgen.build(tmp_path / (name or f"s{next(counter)}"), spec, **kw)  # type: ignore[arg-type]
        snap = open_snapshot(root)
        opened.append(snap)
        return snap

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def pair(
    snapshots: Callable[..., Snapshot],
) -> Callable[[tuple[fsgen.Spec, fsgen.Spec]], tuple[Snapshot, Snapshot]]:
    """``pair((lower_spec, upper_spec))`` -> (lower, upper) snapshots."""

    def make(p: tuple[fsgen.Spec, fsgen.Spec]) -> tuple[Snapshot, Snapshot]:
        return snapshots(p[0], "lower"), snapshots(p[1], "upper")

    return make
