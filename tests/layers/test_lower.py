"""layer_source: a ref's upper and lower assembled from its chain's specs (pure, given an opener)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from blobchain.layers.errors import InvalidArgument
from blobchain.layers.lower import is_windows, layer_source
from blobchain.layers.overlay import LowerView
from blobchain.layers.records import RefSpec
from blobchain.layers.snapshot import Snapshot, open_snapshot


def _chain(tmp_path: Path, kinds: list[str], layer_type: str = "linux") -> list[RefSpec]:
    specs, parent = [], None
    for i, kind in enumerate(kinds):
        d = tmp_path / f"s{i}"
        d.mkdir()
        specs.append(RefSpec(f"r{i}", str(d), parent=parent, kind=kind, layer_type=layer_type))
        parent = f"r{i}"
    return specs


def _opener(opened: list[str]) -> Callable[[str], Snapshot]:
    def open_(path: str) -> Snapshot:
        opened.append(Path(path).name)
        return open_snapshot(path)

    return open_


def test_a_base_has_no_lower(tmp_path: Path) -> None:
    opened: list[str] = []
    src = layer_source(_chain(tmp_path, ["rootfs"]), _opener(opened))
    assert src.lower is None and src.kind == "rootfs" and not src.windows
    assert opened == ["s0"]


def test_a_rootfs_diffs_against_its_parent_alone(tmp_path: Path) -> None:
    opened: list[str] = []
    src = layer_source(_chain(tmp_path, ["rootfs", "rootfs", "rootfs"]), _opener(opened))
    assert isinstance(src.lower, Snapshot)
    assert opened == ["s2", "s1"]  # the grandparent is not even opened


def test_uppers_merge_down_to_the_nearest_rootfs(tmp_path: Path) -> None:
    opened: list[str] = []
    src = layer_source(_chain(tmp_path, ["rootfs", "rootfs", "upper", "upper", "upper"]), _opener(opened))
    assert isinstance(src.lower, LowerView) and src.kind == "upper"
    assert opened == ["s4", "s3", "s2", "s1"]  # the ref, then its uppers down to the rootfs
    assert len(src.lower.layers) == 3


def test_windows_anywhere_in_the_chain(tmp_path: Path) -> None:
    chain = _chain(tmp_path, ["rootfs", "rootfs"])
    assert not is_windows(chain)
    chain[0] = RefSpec(chain[0].ref_id, chain[0].snapshot, layer_type="windows")
    assert is_windows(chain)
    assert layer_source(chain, open_snapshot).windows


def test_an_empty_chain_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        layer_source([], open_snapshot)
