"""RedisClaimService against a real redis-server: the conformance suite, expiry and takeover,
the heartbeat, exclusivity across processes, and outages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from services import RedisService

from blobchain.layers.errors import InvalidArgument, Unavailable
from blobchain.storage.claims import ClaimLost
from blobchain.storage.claims.redis import Heartbeat, RedisClaimService, claim_key

from . import expect_line, spawn_python
from .contracts import ClaimServiceContract

pytestmark = pytest.mark.integration


@pytest.fixture
def claim_service(redis_client: Any, redis_prefix: str) -> RedisClaimService:
    return RedisClaimService(redis_client, redis_prefix)


class TestRedisClaimService(ClaimServiceContract):
    pass


def wait_for(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_lease_is_a_set_nx_px_key(claim_service: RedisClaimService, redis_client: Any) -> None:
    lease = claim_service.try_acquire("ref/x", 5)
    assert lease is not None
    key = claim_key(claim_service.prefix, "ref/x")
    assert lease.redis_key == key
    assert redis_client.get(key).decode() == lease.token
    assert 0 < redis_client.pttl(key) <= 5000
    lease.release()
    assert redis_client.exists(key) == 0


def test_invalid_ttl_rejected(claim_service: RedisClaimService) -> None:
    for ttl in (0, -1, float("nan")):
        with pytest.raises(InvalidArgument):
            claim_service.try_acquire("k", ttl)


def test_expired_lease_is_taken_over(claim_service: RedisClaimService, redis_client: Any) -> None:
    old = claim_service.try_acquire("k", 30)
    assert old is not None
    assert claim_service.try_acquire("k", 30) is None
    # The holder stalls (or dies) and stops refreshing: its lease runs out (shortened here).
    redis_client.pexpire(old.redis_key, 50)
    wait_for(lambda: claim_service.holder("k") is None)
    new = claim_service.try_acquire("k", 30)
    assert new is not None and new.token != old.token
    with pytest.raises(ClaimLost):
        old.refresh()
    old.release()  # must not free the new holder's lease
    assert claim_service.holder("k") == new.token
    new.refresh()
    new.release()


def test_refresh_after_expiry_without_takeover_is_lost(claim_service: RedisClaimService) -> None:
    lease = claim_service.try_acquire("k", 0.1)
    assert lease is not None
    wait_for(lambda: claim_service.holder("k") is None)
    with pytest.raises(ClaimLost):
        lease.refresh()
    assert claim_service.holder("k") is None  # and refresh did not take it again


def test_refresh_resets_the_ttl(claim_service: RedisClaimService, redis_client: Any) -> None:
    lease = claim_service.try_acquire("k", 60)
    assert lease is not None
    key = lease.redis_key
    redis_client.pexpire(key, 1000)  # as if most of the TTL had passed
    lease.refresh()
    assert 1000 < redis_client.pttl(key) <= 60_000  # reset to the full TTL, not extended by it
    lease.release()


def test_heartbeat_keeps_the_lease(claim_service: RedisClaimService, redis_client: Any) -> None:
    lease = claim_service.try_acquire("k", 60)
    assert lease is not None
    key = lease.redis_key
    redis_client.pexpire(key, 2000)  # as if most of the TTL had passed
    with lease.heartbeat(interval_s=0.05) as hb:
        wait_for(lambda: redis_client.pttl(key) > 2000)  # refreshed from the thread
        hb.check()
        assert not hb.lost
    lease.release()


def test_heartbeat_notices_a_takeover(claim_service: RedisClaimService, redis_client: Any) -> None:
    lease = claim_service.try_acquire("k", 30)
    assert lease is not None
    with Heartbeat(lease, 0.05) as hb:
        redis_client.set(lease.redis_key, "someone-else")  # what an expiry + takeover leaves
        wait_for(lambda: hb.lost)
        with pytest.raises(ClaimLost):
            hb.check()
    assert isinstance(hb.error, ClaimLost)
    assert claim_service.holder("k") == "someone-else"


def test_heartbeat_reports_an_outage_longer_than_the_ttl(private_redis: RedisService) -> None:
    locks = RedisClaimService(private_redis.client())
    lease = locks.try_acquire("k", 1.0)
    assert lease is not None
    with lease.heartbeat(interval_s=0.05) as hb:
        private_redis.stop()
        try:
            # Refreshes fail; once a whole TTL passed without one, the lease counts as lost.
            wait_for(lambda: hb.lost)
        finally:
            private_redis.start()
    assert isinstance(hb.error, Unavailable)
    with pytest.raises(ClaimLost):
        hb.check()


def test_redis_down_is_unavailable_then_recovers(private_redis: RedisService) -> None:
    locks = RedisClaimService(private_redis.client())
    lease = locks.try_acquire("k", 30)
    assert lease is not None
    with private_redis.down():
        for op in (
            lambda: locks.try_acquire("other", 30),
            lambda: locks.holder("k"),
            lease.refresh,
            lease.release,
        ):
            with pytest.raises(Unavailable) as ei:
                op()
            assert ei.value.retryable and f"127.0.0.1:{private_redis.port}" in str(ei.value)
    # The restart lost every lease (no persistence): the old holder learns it on its next refresh.
    with pytest.raises(ClaimLost):
        lease.refresh()
    again = locks.try_acquire("k", 30)
    assert again is not None
    assert locks.holder("k") == again.token


_CHILD = """
import sys
import redis
from blobchain.storage.claims.redis import RedisClaimService
url, prefix = sys.argv[1], sys.argv[2]
locks = RedisClaimService(redis.Redis.from_url(url), prefix)
print("ready", flush=True)
sys.stdin.readline()
lease = locks.try_acquire("contended", 30)
print("got", lease.token if lease else "-", flush=True)
"""


def test_one_winner_across_processes(claim_service: RedisClaimService, redis_url: str) -> None:
    procs = [spawn_python(_CHILD, redis_url, claim_service.prefix) for _ in range(4)]
    try:
        for p in procs:
            expect_line(p, "ready")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        got = [expect_line(p, "got") for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    winners = [t for t in got if t != "-"]
    assert len(winners) == 1
    assert claim_service.holder("contended") == winners[0]
