"""Single-flight claims in Redis: ``SET <prefix>lease:<key> <token> NX PX`` plus token-checked Lua.

One :class:`RedisClaim` object per acquisition (no shared, thread-local state: a heartbeat thread
refreshes the same object the worker releases). The key naming (:func:`claim_key`) is shared with
:class:`blobchain.storage.metadata.redis.RedisMetadataStore`, whose writes are fenced by the token.

The claim only saves work (Redis is one node, claims are timed): correctness comes from
content-addressed blobs, conditional creates and the fenced metadata writes.

A claim may carry a *delivery* (:meth:`RedisClaimService.tracking`): what to send again if its
holder dies (the task's message, the holder's host and pid). Acquire, refresh and release keep
``<prefix>deliveries`` (token -> delivery JSON) and ``<prefix>deliveries:due`` (token -> the
claim's expiry, Redis server clock) in the same atomic step as the claim itself, so a delivery
is due exactly when its claim expired without a release: its holder died or was cut off.
:meth:`RedisClaimService.take_due` hands each such delivery to one caller (the takeover janitor).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from blobchain.layers.errors import InvalidArgument
from blobchain.storage.claims import ClaimLost
from blobchain.storage.claims.heartbeat import Heartbeat
from blobchain.storage.redis_util import LUA_NOW, describe_redis, redis_errors
from blobchain.storage.redis_util import text as _text

__all__ = ["Due", "HolderInfo", "RedisClaim", "RedisClaimService", "TrackedClaims", "claim_key"]

log = logging.getLogger(__name__)


def claim_key(prefix: str, key: str) -> str:
    """The Redis key holding the claim token for ``key`` (shared with the metadata fencing).
    Spelled ``lease:`` as before: running workers and stored data agree on it."""
    return f"{prefix}lease:{key}"


# Refresh resets the TTL of a claim we still hold. A claim that expired (or was released) is
# lost even if nobody took it yet: someone may have taken, finished and released it meanwhile.
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# Tracked claims: KEYS[1] = claim, KEYS[2] = deliveries hash, KEYS[3] = due zset, KEYS[4] = their
# first-found-expired times, KEYS[5] (acquire only) = the acquisitions counter;
# ARGV[1] = token, ARGV[2] = ttl ms, ARGV[3] = delivery JSON.
_ACQUIRE_TRACKED = (
    LUA_NOW
    + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
-- builds started per (ref, variant), for operators and the tests' "no duplicate work"
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], 2592000)
return 1
"""
)

_REFRESH_TRACKED = (
    LUA_NOW
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[3], 'XX', now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""
)

# A released claim's delivery is finished with (its task goes on: success, failure or retry).
_RELEASE_TRACKED = """
local n = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  n = redis.call('DEL', KEYS[1])
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return n
"""

# KEYS[1] = deliveries hash, KEYS[2] = due zset, KEYS[3] = hash token -> when its claim was first
# found expired with its worker still beating; ARGV[1] = claim key prefix, ARGV[2] = how long a
# claim holds (ms), ARGV[3] = limit, ARGV[4] = worker key prefix, ARGV[5] = recheck delay (ms).
# Returns token, delivery pairs whose claim is gone and whose worker is gone too. A due delivery
# whose ref is held by someone else (a duplicate took it) is looked at again when that claim is
# due: its own task still has to finish (it will find the blob). A due delivery whose worker beat
# after the claim expired lost only its pool process: that worker puts the message back itself
# (reject on worker lost), so the delivery is dropped, not sent twice.
_CLAIM_DUE = (
    LUA_NOW
    + """
local out = {}
local due = redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]), 'WITHSCORES')
for i = 1, #due, 2 do
  local tok, at = due[i], tonumber(due[i + 1])
  local e = redis.call('HGET', KEYS[1], tok)
  if not e then
    redis.call('ZREM', KEYS[2], tok)
    redis.call('HDEL', KEYS[3], tok)
  else
    local d = cjson.decode(e)
    local lk = ARGV[1] .. d['key']
    local left = redis.call('PTTL', lk)
    local beat = redis.call('GET', ARGV[4] .. tostring(d['host']))
    if left > 0 then
      redis.call('ZADD', KEYS[2], now + left, tok)
    elseif left == -1 then
      redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), tok)
    elseif beat then
      -- when the claim was first found expired: rechecks move the score, not this
      redis.call('HSETNX', KEYS[3], tok, at)
      if tonumber(beat) > tonumber(redis.call('HGET', KEYS[3], tok)) then
        redis.call('HDEL', KEYS[1], tok)
        redis.call('HDEL', KEYS[3], tok)
        redis.call('ZREM', KEYS[2], tok)
      else
        redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), tok)
      end
    else
      redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), tok)
      redis.call('HDEL', KEYS[3], tok)
      table.insert(out, tok)
      table.insert(out, e)
    end
  end
end
return out
"""
)

# KEYS[1] = a worker's liveness key; ARGV[1] = ttl ms. The value is the server time of the beat.
_BEAT = (
    LUA_NOW
    + """
redis.call('SET', KEYS[1], now, 'PX', ARGV[1])
return now
"""
)


def _ttl_ms(ttl_s: float) -> int:
    if not ttl_s > 0:
        raise InvalidArgument(f"claim ttl must be > 0 (got {ttl_s})", ttl_s=ttl_s)
    return max(1, round(ttl_s * 1000))



@dataclass(frozen=True)
class Due:
    """A delivery whose claim expired without a release (taken by one caller)."""

    token: str
    delivery: dict[str, Any]


@dataclass(frozen=True)
class HolderInfo:
    """Who holds a claim now: its token, the delivery it carries (if tracked), ms left."""

    token: str
    ttl_ms: int
    delivery: dict[str, Any] | None


class RedisClaim:
    """One acquisition of a claim. Thread-safe: refresh from a heartbeat, release from the worker."""

    def __init__(
        self, service: RedisClaimService, key: str, token: str, ttl_s: float, *, tracked: bool = False
    ) -> None:
        self._service = service
        self._key = key
        self._token = token
        self._ttl_s = ttl_s
        self._tracked = tracked

    @property
    def key(self) -> str:
        return self._key

    @property
    def token(self) -> str:
        return self._token

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    @property
    def redis_key(self) -> str:
        return self._service.redis_key(self._key)

    def refresh(self) -> None:
        """Reset the claim to its full TTL; ClaimLost if it expired, was released or was taken over."""
        with redis_errors(self._service.client, f"refresh claim {self._key}"):
            if self._tracked:
                ok = self._service._refresh_tracked(
                    keys=self._service.tracked_keys(self._key), args=[self._token, _ttl_ms(self._ttl_s)]
                )
            else:
                ok = self._service._refresh(keys=[self.redis_key], args=[self._token, _ttl_ms(self._ttl_s)])
        if not int(ok):
            raise ClaimLost(f"claim on {self._key!r} expired, was released or was taken over", key=self._key)

    def release(self) -> None:
        """Delete the claim if we still hold it. Releasing a lost claim is a no-op (never the new holder's)."""
        with redis_errors(self._service.client, f"release claim {self._key}"):
            if self._tracked:
                n = self._service._release_tracked(keys=self._service.tracked_keys(self._key), args=[self._token])
            else:
                n = self._service._release(keys=[self.redis_key], args=[self._token])
        if not int(n):
            log.info("claim on %r was no longer ours at release", self._key)

    def heartbeat(self, interval_s: float | None = None) -> Heartbeat:
        """A :class:`Heartbeat` refreshing this claim every ttl/3 (or ``interval_s``)."""
        return Heartbeat(self, interval_s if interval_s is not None else self._ttl_s / 3, ttl_s=self._ttl_s)

    def __enter__(self) -> RedisClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RedisClaim(key={self._key!r}, ttl_s={self._ttl_s})"


class RedisClaimService:
    """:class:`blobchain.storage.claims.ClaimService` on one Redis node (redis-py client passed in)."""

    def __init__(self, client: redis.Redis, prefix: str = "blobchain:") -> None:
        self.client = client
        self.prefix = prefix
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self._acquire_tracked = client.register_script(_ACQUIRE_TRACKED)
        self._refresh_tracked = client.register_script(_REFRESH_TRACKED)
        self._release_tracked = client.register_script(_RELEASE_TRACKED)
        self._claim_due = client.register_script(_CLAIM_DUE)
        self._beat = client.register_script(_BEAT)

    def redis_key(self, key: str) -> str:
        return claim_key(self.prefix, key)

    @property
    def deliveries_key(self) -> str:
        return f"{self.prefix}deliveries"

    @property
    def due_key(self) -> str:
        return f"{self.prefix}deliveries:due"

    def tracked_keys(self, key: str) -> list[str]:
        return [self.redis_key(key), self.deliveries_key, self.due_key, self.due_key + ":expired"]

    def tracking(self, delivery: dict[str, Any]) -> TrackedClaims:
        """This service, with every claim it grants carrying ``delivery`` (JSON-serializable;
        the claim key is added as ``key``)."""
        return TrackedClaims(self, delivery)

    def try_acquire_tracked(self, key: str, ttl_s: float, delivery: dict[str, Any]) -> RedisClaim | None:
        token = uuid.uuid4().hex
        body = json.dumps({**delivery, "key": key}, separators=(",", ":"), sort_keys=True)
        with redis_errors(self.client, f"acquire claim {key}"):
            keys = [*self.tracked_keys(key), f"{self.prefix}stats:leased:{key}"]
            ok = self._acquire_tracked(keys=keys, args=[token, _ttl_ms(ttl_s), body])
        return RedisClaim(self, key, token, ttl_s, tracked=True) if int(ok) else None

    def worker_key(self, node: str) -> str:
        return f"{self.prefix}worker:{node}"

    def beat(self, node: str, ttl_s: float) -> None:
        """Say that worker ``node``'s main process is alive (for ``ttl_s``)."""
        with redis_errors(self.client, f"beat worker {node}"):
            self._beat(keys=[self.worker_key(node)], args=[_ttl_ms(ttl_s)])

    def worker_alive(self, node: str) -> bool:
        with redis_errors(self.client, f"read worker {node}"):
            return bool(self.client.exists(self.worker_key(node)))

    def take_due(self, hold_s: float, recheck_s: float = 1.0, limit: int = 100) -> list[Due]:
        """Deliveries whose claim expired without a release while their worker is gone (no
        :meth:`beat`), each handed to one caller: the claim holds for ``hold_s`` (a caller that
        dies meanwhile leaves it due again). While the worker's last beat is older than the
        claim's expiry, the delivery is looked at again after ``recheck_s``."""
        with redis_errors(self.client, "claim due deliveries"):
            flat = self._claim_due(
                keys=[self.deliveries_key, self.due_key, self.due_key + ":expired"],
                args=[
                    self.prefix + "lease:",
                    _ttl_ms(hold_s),
                    limit,
                    self.prefix + "worker:",
                    _ttl_ms(recheck_s),
                ],
            )
        out = []
        for i in range(0, len(flat) - 1, 2):
            try:
                out.append(Due(_text(flat[i]) or "", json.loads(_text(flat[i + 1]) or "{}")))
            except ValueError:
                log.warning("dropping an unreadable delivery %r", flat[i])
                self.forget(_text(flat[i]) or "")
        return out

    def forget(self, token: str) -> None:
        """Drop a delivery (sent again, or its task is finished)."""
        with redis_errors(self.client, "forget delivery"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(self.deliveries_key, token)
            pipe.zrem(self.due_key, token)
            pipe.hdel(self.due_key + ":expired", token)
            pipe.execute()

    def holder_info(self, key: str) -> HolderInfo | None:
        """The claim's holder, the delivery it carries and the time it has left (one round trip)."""
        rkey = self.redis_key(key)
        with redis_errors(self.client, f"read claim {key}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.get(rkey)
            pipe.pttl(rkey)
            token, ttl = pipe.execute()
            token = _text(token)
            if token is None:
                return None
            raw = self.client.hget(self.deliveries_key, token)
        delivery = None
        if raw is not None:
            with contextlib.suppress(ValueError):
                delivery = json.loads(_text(raw) or "")
        return HolderInfo(token, max(0, int(ttl)), delivery)

    def try_acquire(self, key: str, ttl_s: float) -> RedisClaim | None:
        """Take the claim if free (never blocks); None if another token holds it."""
        token = uuid.uuid4().hex
        rkey = self.redis_key(key)
        with redis_errors(self.client, f"acquire claim {key}"):
            if self.client.set(rkey, token, nx=True, px=_ttl_ms(ttl_s)):
                return RedisClaim(self, key, token, ttl_s)
            # redis-py retries a command whose reply was lost; the retried SET NX then sees our
            # own token. Treat that as acquired rather than leave the key held until its TTL.
            if _text(self.client.get(rkey)) == token:
                return RedisClaim(self, key, token, ttl_s)
        return None

    def holder(self, key: str) -> str | None:
        with redis_errors(self.client, f"read claim {key}"):
            return _text(self.client.get(self.redis_key(key)))

    def __repr__(self) -> str:
        return f"RedisClaimService({describe_redis(self.client)!r}, prefix={self.prefix!r})"


class TrackedClaims:
    """A :class:`~blobchain.storage.claims.ClaimService` view of a RedisClaimService whose claims
    carry one delivery (see the module docstring)."""

    def __init__(self, service: RedisClaimService, delivery: dict[str, Any]) -> None:
        self.service = service
        self.delivery = delivery

    @property
    def client(self) -> redis.Redis:
        return self.service.client

    def try_acquire(self, key: str, ttl_s: float) -> RedisClaim | None:
        return self.service.try_acquire_tracked(key, ttl_s, self.delivery)

    def holder(self, key: str) -> str | None:
        return self.service.holder(key)

    def __repr__(self) -> str:
        return f"TrackedClaims({self.service!r})"
