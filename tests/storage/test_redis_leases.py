"""RedisLeaseManager against a real redis-server: the lease contract, key layout, outages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from services import RedisService

from blobchain.layers.errors import Unavailable
from blobchain.storage.leases.redis import RedisLeaseManager

from .contracts import LeaseManagerContract, digest_of

pytestmark = pytest.mark.integration


@pytest.fixture
def lease_manager(redis_client: Any, redis_prefix: str) -> RedisLeaseManager:
    return RedisLeaseManager(redis_client, redis_prefix)


class TestRedisLeaseManager(LeaseManagerContract):
    pass


def test_keys_stay_under_the_prefix(lease_manager: RedisLeaseManager, redis_client: Any) -> None:
    p = lease_manager.prefix
    lease_manager.create_lease("l", 60)
    lease_manager.add_resource("l", digest_of(b"x"))
    keys = sorted(k.decode() for k in redis_client.keys("*"))
    assert keys == sorted([f"{p}gcleases", f"{p}gclease:l"])
    # The lease set expires with its lease (no leak if nobody calls live_digests again).
    assert 0 < redis_client.pttl(f"{p}gclease:l") <= 60_000


def _every_operation(leases: RedisLeaseManager) -> list[Callable[[], object]]:
    return [
        lambda: leases.create_lease("l", 60),
        lambda: leases.add_resource("l", digest_of(b"x")),
        lambda: leases.delete_lease("l"),
        lambda: leases.live_digests(),
    ]


def test_redis_down_is_unavailable_then_recovers(private_redis: RedisService) -> None:
    leases = RedisLeaseManager(private_redis.client())
    with private_redis.down():
        for op in _every_operation(leases):
            with pytest.raises(Unavailable) as ei:
                op()
            assert ei.value.retryable
            assert f"127.0.0.1:{private_redis.port}" in str(ei.value)
    # Restarted without persistence: the Lua scripts must be loaded again (NOSCRIPT).
    leases.create_lease("l", 60)
    leases.add_resource("l", digest_of(b"x"))
    assert leases.live_digests() == {digest_of(b"x")}
