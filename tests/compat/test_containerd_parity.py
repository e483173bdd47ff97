"""Byte parity with containerd 1.6.20's ``ctr snapshots diff`` (uncompressed tar).

Every generated pair is committed to a private containerd (native snapshotter) and diffed there;
our tar comes from ``write_tar(tar_entries(diff(lower, upper)))``. containerd's whiteout mtimes
(wall clock in 1.6) are rewritten to 0 to match ``whiteout_epoch=0``; nothing else is touched.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from pathlib import Path

import fsgen
import pytest

from blobchain.layers.changes import diff
from blobchain.layers.entries import tar_entries
from blobchain.layers.records import EMPTY_LAYER_DIFF_ID
from blobchain.layers.snapshot import Snapshot, open_snapshot
from blobchain.layers.tarwriter import write_tar

from .containerd import Containerd, first_difference

pytestmark = pytest.mark.compat


def _ours(lower: Path | None, upper: Path, write: object) -> int:
    with open_snapshot(upper) as up:
        low: Snapshot | None = open_snapshot(lower) if lower is not None else None
        try:
            return write_tar(tar_entries(diff(low, up), up), up, write)  # type: ignore[arg-type]
        finally:
            if low is not None:
                low.close()


def ours_bytes(lower: Path | None, upper: Path) -> bytes:
    buf = bytearray()
    _ours(lower, upper, buf.extend)
    return bytes(buf)


def assert_parity(ours: bytes, theirs: bytes) -> None:
    report = first_difference(ours, theirs)
    assert report is None, report


def _commit_pair(ctrd: Containerd, base: Path, pair: tuple[fsgen.Spec, fsgen.Spec]) -> tuple[Path, Path, str]:
    lower, upper = fsgen.build_pair(base, pair)
    lkey = ctrd.commit_state(lower)
    ukey = ctrd.commit_state(upper, parent=lkey)
    return lower, upper, ukey


@pytest.mark.parametrize("name", sorted(fsgen.PAIRS))
def test_focused_pairs(ctrd: Containerd, tmp_path: Path, name: str) -> None:
    lower, upper, key = _commit_pair(ctrd, tmp_path, fsgen.PAIRS[name])
    assert_parity(ours_bytes(lower, upper), ctrd.diff_bytes(key))


def test_kitchen_sink(ctrd: Containerd, tmp_path: Path) -> None:
    lower, upper, key = _commit_pair(ctrd, tmp_path, fsgen.kitchen_sink())
    theirs = ctrd.diff_bytes(key)
    assert_parity(ours_bytes(lower, upper), theirs)
    assert len(theirs) > 10_000  # a real layer, not two empty ones


def test_kitchen_sink_reversed(ctrd: Containerd, tmp_path: Path) -> None:
    """The reverse changeset: deletions of every kind, type changes back, links dissolving."""
    lo, up = fsgen.kitchen_sink()
    lower, upper, key = _commit_pair(ctrd, tmp_path, (up, lo))
    assert_parity(ours_bytes(lower, upper), ctrd.diff_bytes(key))


def test_base_layer_and_chain(ctrd: Containerd, tmp_path: Path) -> None:
    """A base layer (no parent: every entry added) and each later layer of a chain."""
    parent_key: str | None = None
    parent_dir: Path | None = None
    for i, spec in enumerate(fsgen.chain()):
        state = fsgen.build(tmp_path / f"s{i}", spec)
        key = ctrd.commit_state(state, parent=parent_key)
        theirs = ctrd.diff_bytes(key)
        report = first_difference(ours_bytes(parent_dir, state), theirs)
        assert report is None, f"layer {i}: {report}"
        parent_key, parent_dir = key, state


def test_empty_diff_digest(ctrd: Containerd, tmp_path: Path) -> None:
    lower, upper, key = _commit_pair(ctrd, tmp_path, fsgen.PAIRS["empty-diff"])
    theirs = ctrd.diff_bytes(key, whiteout_epoch=None)
    ours = ours_bytes(lower, upper)
    assert ours == theirs == bytes(1024)
    assert "sha256:" + hashlib.sha256(ours).hexdigest() == EMPTY_LAYER_DIFF_ID


def test_whiteout_epoch_is_only_difference(ctrd: Containerd, tmp_path: Path) -> None:
    """Un-normalised, containerd's whiteouts carry "now"; ours carry the epoch asked for."""
    lower, upper, key = _commit_pair(ctrd, tmp_path, fsgen.PAIRS["delete-tree"])
    raw = ctrd.diff_bytes(key, whiteout_epoch=None)
    assert int(raw[136:147], 8) > fsgen.T0  # the wall clock, not the files' times
    buf = bytearray()
    with open_snapshot(lower) as lo, open_snapshot(upper) as up:
        write_tar(tar_entries(diff(lo, up), up, whiteout_epoch=1234), up, buf.extend)
    assert_parity(bytes(buf), ctrd.diff_bytes(key, whiteout_epoch=1234))


@pytest.mark.slow
def test_big_sparse_file(ctrd: Containerd, tmp_path: Path) -> None:
    """A sparse file over 8 GiB (PAX size record); both streams are hashed, never held."""
    lower, upper, key = _commit_pair(ctrd, tmp_path, fsgen.big_sparse_pair())
    assert os.stat(upper / "big" / "sparse.img").st_blocks < 1024  # really sparse
    # Ours streams (and hashes) in a thread while containerd's differ runs: the two are
    # independent, and hashlib and the tar writer's reads release the GIL. containerd's blob
    # is read from its content store, not streamed back through ctr (see diff_sha256_from_store).
    h = hashlib.sha256()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ours = pool.submit(_ours, lower, upper, h.update)
        theirs, n_theirs = ctrd.diff_sha256_from_store(key)
        n_ours = ours.result()
    assert (n_ours, "sha256:" + h.hexdigest()) == (n_theirs, theirs)
    assert n_ours > 8 << 30
