"""LocalClaimService: the conformance suite plus cross-process exclusion and takeover."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from blobchain.layers.errors import InvalidArgument
from blobchain.storage.claims import ClaimLost
from blobchain.storage.claims.local import LocalClaimService

from . import expect_line, spawn_python
from .contracts import ClaimServiceContract


@pytest.fixture
def claim_service(tmp_path: Path) -> LocalClaimService:
    return LocalClaimService(tmp_path / "state")


class TestLocalClaimService(ClaimServiceContract):
    pass


def test_lock_file_holds_the_token(tmp_path: Path) -> None:
    svc = LocalClaimService(tmp_path)
    lease = svc.try_acquire("ref:gzip-6", 30)
    assert lease is not None
    path = tmp_path / "locks" / (hashlib.sha256(b"ref:gzip-6").hexdigest() + ".lock")
    assert path.read_text() == lease.token
    lease.release()
    assert path.read_text() == ""


def test_two_services_on_one_dir_exclude_each_other(tmp_path: Path) -> None:
    a, b = LocalClaimService(tmp_path), LocalClaimService(tmp_path)
    lease = a.try_acquire("k", 30)
    assert lease is not None
    assert b.try_acquire("k", 30) is None
    assert b.holder("k") == lease.token
    lease.release()
    again = b.try_acquire("k", 30)
    assert again is not None
    again.release()


def test_ttl_must_be_positive(claim_service: LocalClaimService) -> None:
    with pytest.raises(InvalidArgument):
        claim_service.try_acquire("k", 0)
    with pytest.raises(InvalidArgument):
        claim_service.try_acquire("", 30)


def test_refresh_detects_a_replaced_lock_file(tmp_path: Path) -> None:
    svc = LocalClaimService(tmp_path)
    lease = svc.try_acquire("k", 30)
    assert lease is not None
    (path,) = (tmp_path / "locks").iterdir()
    os.unlink(path)  # e.g. someone cleaned the state dir
    with pytest.raises(ClaimLost):
        lease.refresh()
    other = svc.try_acquire("k", 30)  # a new file, a new holder
    assert other is not None and svc.holder("k") == other.token
    lease.release()  # must not disturb the new holder
    assert svc.holder("k") == other.token
    other.release()


_HOLDER_CHILD = """
import sys, time
from blobchain.storage.claims.local import LocalClaimService
lease = LocalClaimService(sys.argv[1]).try_acquire(sys.argv[2], 30)
print("token", lease.token if lease else "none", flush=True)
time.sleep(600)
"""


def test_other_process_excluded_then_takeover_after_sigkill(tmp_path: Path) -> None:
    svc = LocalClaimService(tmp_path)
    proc = spawn_python(_HOLDER_CHILD, str(tmp_path), "ref-1")
    try:
        child_token = expect_line(proc, "token")
        assert len(child_token) == 32
        assert svc.try_acquire("ref-1", 30) is None
        assert svc.holder("ref-1") == child_token
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The kernel dropped the dead holder's lock: its leftover token is not reported, and the
    # next caller takes over at once (no TTL to wait out).
    assert svc.holder("ref-1") is None
    lease = svc.try_acquire("ref-1", 30)
    assert lease is not None and lease.token != child_token
    assert svc.holder("ref-1") == lease.token
    lease.refresh()
    lease.release()


def test_child_process_cannot_take_a_held_lease(tmp_path: Path) -> None:
    svc = LocalClaimService(tmp_path)
    lease = svc.try_acquire("ref-2", 30)
    assert lease is not None
    proc = spawn_python(_HOLDER_CHILD, str(tmp_path), "ref-2")
    try:
        assert expect_line(proc, "token") == "none"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert svc.holder("ref-2") == lease.token
    lease.release()
