"""Distributed GC leases in Redis, on the server clock.

``P gcleases``: ZSET lease id -> expiry (ms); ``P gclease:<id>``: the set of its digests, expiring
with the lease. Scripts touch keys computed from the prefix, so this targets a single Redis
node, not Redis Cluster.
"""

from __future__ import annotations

import redis

from blobchain.storage.leases import LeaseBase
from blobchain.storage.redis_util import LUA_NOW, describe_redis, redis_errors, text

__all__ = ["RedisLeaseManager"]

# KEYS[1] = gc lease zset; ARGV[1] = lease id, ARGV[2] = ttl ms, ARGV[3] = lease set key.
_CREATE_LEASE = (
    LUA_NOW
    + """
local exp = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], exp, ARGV[1])
if redis.call('EXISTS', ARGV[3]) == 1 then
  redis.call('PEXPIREAT', ARGV[3], exp)
end
return exp
"""
)

# KEYS[1] = gc lease zset, KEYS[2] = lease set; ARGV[1] = lease id, ARGV[2] = digest.
_ADD_RESOURCE = (
    LUA_NOW
    + """
local exp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not exp) or tonumber(exp) <= now then
  return 0
end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIREAT', KEYS[2], exp)
return 1
"""
)

# KEYS[1] = gc lease zset; ARGV[1] = lease set key prefix. Drops expired leases, returns live digests.
_LIVE = (
    LUA_NOW
    + """
local dead = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE')
for _, id in ipairs(dead) do
  redis.call('DEL', ARGV[1] .. id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], '(' .. now, '+inf', 'BYSCORE')) do
  for _, d in ipairs(redis.call('SMEMBERS', ARGV[1] .. id)) do
    table.insert(out, d)
  end
end
return out
"""
)


class RedisLeaseManager(LeaseBase):
    """:class:`~blobchain.storage.leases.LeaseManager` on one Redis node (client passed in)."""

    def __init__(self, client: redis.Redis, prefix: str = "blobchain:") -> None:
        self.client = client
        self.prefix = prefix
        self._create_lease = client.register_script(_CREATE_LEASE)
        self._add_resource = client.register_script(_ADD_RESOURCE)
        self._live_script = client.register_script(_LIVE)

    @property
    def _gcleases(self) -> str:
        return f"{self.prefix}gcleases"

    def _gclease(self, lease_id: str) -> str:
        return f"{self.prefix}gclease:{lease_id}"

    def _create(self, lease_id: str, ttl_s: float) -> None:
        with redis_errors(self.client, f"create lease {lease_id}"):
            self._create_lease(
                keys=[self._gcleases], args=[lease_id, round(ttl_s * 1000), self._gclease(lease_id)]
            )

    def _add(self, lease_id: str, digest: str) -> bool:
        with redis_errors(self.client, f"add {digest} to lease {lease_id}"):
            ok = self._add_resource(keys=[self._gcleases, self._gclease(lease_id)], args=[lease_id, digest])
        return bool(int(ok))

    def _delete(self, lease_id: str) -> None:
        with redis_errors(self.client, f"delete lease {lease_id}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(self._gcleases, lease_id)
            pipe.delete(self._gclease(lease_id))
            pipe.execute()

    def _live(self) -> set[str]:
        with redis_errors(self.client, "read live leases"):
            out = self._live_script(keys=[self._gcleases], args=[f"{self.prefix}gclease:"])
        return {text(d) or "" for d in out}

    def __repr__(self) -> str:
        return f"RedisLeaseManager({describe_redis(self.client)!r}, prefix={self.prefix!r})"
