"""Single-flight leases in Redis: ``SET <prefix>lease:<key> <token> NX PX`` plus token-checked Lua.

One :class:`RedisLease` object per acquisition (no shared, thread-local state: a heartbeat thread
refreshes the same object the worker releases). The key naming (:func:`lease_key`) is shared with
:class:`blobchain.storage.metadata.redis.RedisMetadataStore`, whose writes are fenced by the token.

The lease only saves work (Redis is one node, leases are timed): correctness comes from
content-addressed blobs, conditional creates and the fenced metadata writes.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import redis
import redis.exceptions

from blobchain.layers.errors import FailedPrecondition, InvalidArgument, LeaseLost, Unavailable
from blobchain.storage.locks.heartbeat import Heartbeat

__all__ = [
    "Heartbeat",
    "RedisAuthError",
    "RedisLease",
    "RedisLockService",
    "describe_redis",
    "lease_key",
    "redis_errors",
]

log = logging.getLogger(__name__)


class RedisAuthError(FailedPrecondition):
    """Redis refused our credentials or ACL; retrying will not help until the config is fixed."""

    code = "redis_auth"


def lease_key(prefix: str, key: str) -> str:
    """The Redis key holding the lease token for ``key`` (shared with the metadata fencing)."""
    return f"{prefix}lease:{key}"


def describe_redis(client: redis.Redis) -> str:
    """``host:port/db`` (or the socket path) of a client, for messages. Never the password."""
    kw = client.connection_pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
    return f"redis://{where}/{kw.get('db', 0)}"


@contextlib.contextmanager
def redis_errors(client: redis.Redis, what: str) -> Iterator[None]:
    """Map redis-py errors to blobchain errors (after redis-py's own retries gave up)."""
    try:
        yield
    except redis.exceptions.AuthenticationError as e:
        raise RedisAuthError(f"redis at {describe_redis(client)} refused authentication ({what}): {e}") from e
    except redis.exceptions.NoPermissionError as e:
        raise RedisAuthError(f"redis at {describe_redis(client)} denied {what} by ACL: {e}") from e
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        # BusyLoadingError (restart replaying data) is a ConnectionError: also retryable.
        raise Unavailable(
            f"redis at {describe_redis(client)} unavailable ({what}): {e}", endpoint=describe_redis(client)
        ) from e


# Refresh resets the TTL of a lease we still hold. A lease that expired (or was released) is
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


def _ttl_ms(ttl_s: float) -> int:
    if not ttl_s > 0:
        raise InvalidArgument(f"lease ttl must be > 0 (got {ttl_s})", ttl_s=ttl_s)
    return max(1, round(ttl_s * 1000))


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisLease:
    """One acquisition of a lease. Thread-safe: refresh from a heartbeat, release from the worker."""

    def __init__(self, service: RedisLockService, key: str, token: str, ttl_s: float) -> None:
        self._service = service
        self._key = key
        self._token = token
        self._ttl_s = ttl_s

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
        """Reset the lease to its full TTL; LeaseLost if it expired, was released or was taken over."""
        with redis_errors(self._service.client, f"refresh lease {self._key}"):
            ok = self._service._refresh(keys=[self.redis_key], args=[self._token, _ttl_ms(self._ttl_s)])
        if not int(ok):
            raise LeaseLost(f"lease on {self._key!r} expired, was released or was taken over", key=self._key)

    def release(self) -> None:
        """Delete the lease if we still hold it. Releasing a lost lease is a no-op (never the new holder's)."""
        with redis_errors(self._service.client, f"release lease {self._key}"):
            n = self._service._release(keys=[self.redis_key], args=[self._token])
        if not int(n):
            log.info("lease on %r was no longer ours at release", self._key)

    def heartbeat(self, interval_s: float | None = None) -> Heartbeat:
        """A :class:`Heartbeat` refreshing this lease every ttl/3 (or ``interval_s``)."""
        return Heartbeat(self, interval_s if interval_s is not None else self._ttl_s / 3, ttl_s=self._ttl_s)

    def __enter__(self) -> RedisLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RedisLease(key={self._key!r}, ttl_s={self._ttl_s})"


class RedisLockService:
    """:class:`blobchain.storage.locks.LockService` on one Redis node (redis-py client passed in)."""

    def __init__(self, client: redis.Redis, prefix: str = "blobchain:") -> None:
        self.client = client
        self.prefix = prefix
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)

    def redis_key(self, key: str) -> str:
        return lease_key(self.prefix, key)

    def try_acquire(self, key: str, ttl_s: float) -> RedisLease | None:
        """Take the lease if free (never blocks); None if another token holds it."""
        token = uuid.uuid4().hex
        rkey = self.redis_key(key)
        with redis_errors(self.client, f"acquire lease {key}"):
            if self.client.set(rkey, token, nx=True, px=_ttl_ms(ttl_s)):
                return RedisLease(self, key, token, ttl_s)
            # redis-py retries a command whose reply was lost; the retried SET NX then sees our
            # own token. Treat that as acquired rather than leave the key held until its TTL.
            if _text(self.client.get(rkey)) == token:
                return RedisLease(self, key, token, ttl_s)
        return None

    def holder(self, key: str) -> str | None:
        with redis_errors(self.client, f"read lease {key}"):
            return _text(self.client.get(self.redis_key(key)))

    def __repr__(self) -> str:
        return f"RedisLockService({describe_redis(self.client)!r}, prefix={self.prefix!r})"
