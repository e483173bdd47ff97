"""Talking to Redis the same way everywhere in the distributed store: errors mapped to
blobchain's, clients described without secrets, the server clock in Lua."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis
import redis.exceptions

from blobchain.layers.errors import FailedPrecondition, Unavailable, register

__all__ = ["LUA_NOW", "RedisAuthError", "describe_redis", "redis_errors", "text"]


@register
class RedisAuthError(FailedPrecondition):
    """Redis refused our credentials or ACL; retrying will not help until the config is fixed."""

    code = "redis_auth"


# Server clock in ms as Lua local `now`, so every worker and client agrees on when something
# timed is due (a claim, a GC lease, a delivery).
LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


def text(v: Any) -> str | None:
    """A reply as ``str`` (redis-py gives bytes unless the client decodes), None kept."""
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


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
