"""The only place that chooses implementations: settings in, :class:`Deps` out.

Called at the edge only: by the client (and so the CLI), and by the Celery worker's start-up
(``tasks.startup``). Executors and tasks receive the ``Deps`` (or, for processes they start, a
picklable :class:`DepsOpener`); nothing below this module reads settings to open stores.

Embedded mode (the default): the OCI layout at ``settings.store`` is the content store, with
SQLite metadata and GC leases and file claims beside it in ``.blobchain/``. Distributed mode (a broker URL is
set): S3 content and Redis metadata, GC leases and claims. boto3 and redis are imported only here, lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blobchain.config.defaults import Defaults
from blobchain.layers.errors import InvalidSetting, StoreNotFound, from_os_error
from blobchain.storage.deps import Deps

if TYPE_CHECKING:
    import redis

    from blobchain.config.defaults import AnySettings
    from blobchain.config.settings import Settings
    from blobchain.storage.claims.redis import RedisClaimService

__all__ = ["DepsOpener", "DistributedStores", "open_deps", "open_distributed", "redis_client"]


@dataclass(frozen=True)
class DistributedStores:
    """What a Celery worker's process opens: the ``Deps`` its builds use, plus the Redis side
    the task adapter needs itself (tracked claims for takeover, attempt and work counters)."""

    deps: Deps
    claims: RedisClaimService
    redis: redis.Redis


def open_deps(settings: AnySettings, *, create: bool = True) -> Deps:
    """The stores ``settings`` name. ``create=False`` (reading commands) refuses to create an
    embedded store that does not exist yet (StoreNotFound) instead of making an empty one."""
    if not isinstance(settings, Defaults) and settings.distributed:
        return open_distributed(settings).deps
    from blobchain.storage.claims.local import LocalClaimService
    from blobchain.storage.content.local import LocalContentStore
    from blobchain.storage.leases.sqlite import SqliteLeaseManager
    from blobchain.storage.metadata.sqlite import SqliteMetadataStore

    state = os.path.join(settings.store, ".blobchain")
    if not create and not os.path.isfile(os.path.join(state, "metadata.db")):
        raise StoreNotFound(f"no blobchain store at {settings.store}", path=settings.store)
    try:
        content = LocalContentStore(settings.store)
    except OSError as e:
        raise from_os_error(e, f"opening the store {settings.store}") from e
    db = os.path.join(state, "metadata.db")
    return Deps(
        content=content,
        metadata=SqliteMetadataStore(db),
        leases=SqliteLeaseManager(db),
        claims=LocalClaimService(state),
        roots=settings.roots or None,
        threads=settings.threads,
        lease_ttl_s=settings.lease_ttl_s,
    )


def open_distributed(settings: Settings) -> DistributedStores:
    """S3 content, Redis metadata, GC leases and claims (``settings`` must be distributed)."""
    from blobchain.storage.claims.redis import RedisClaimService
    from blobchain.storage.content.s3 import S3ContentStore, make_s3_client
    from blobchain.storage.leases.redis import RedisLeaseManager
    from blobchain.storage.metadata.redis import RedisMetadataStore

    if not settings.s3_endpoint:
        raise InvalidSetting("distributed mode needs BLOBCHAIN_S3_ENDPOINT", setting="BLOBCHAIN_S3_ENDPOINT")
    s3 = make_s3_client(
        settings.s3_endpoint,
        settings.s3_region,
        settings.secret("s3_access_key"),
        settings.secret("s3_secret_key"),
        verify_tls=settings.s3_verify_tls,
        ca_bundle=settings.s3_ca_bundle,
    )
    content = S3ContentStore(s3, settings.s3_bucket, settings.s3_prefix)
    client = redis_client(settings, settings.redis_urls()[2])
    claims = RedisClaimService(client, settings.key_prefix)
    deps = Deps(
        content=content,
        metadata=RedisMetadataStore(client, settings.key_prefix),
        leases=RedisLeaseManager(client, settings.key_prefix),
        claims=claims,
        roots=settings.roots or None,
        threads=settings.threads,
        lease_ttl_s=settings.lease_ttl_s,
    )
    return DistributedStores(deps, claims, client)


@dataclass(frozen=True)
class DepsOpener:
    """Opens the stores ``settings`` name in whichever process calls it: what an executor hands
    to the processes it starts (picklable: the settings travel, never an open connection)."""

    settings: AnySettings

    def __call__(self) -> Deps:
        return open_deps(self.settings)


def redis_client(settings: Settings, url: str) -> redis.Redis:
    import redis

    kwargs: dict[str, Any] = {"socket_timeout": 30, "socket_connect_timeout": 5, "health_check_interval": 25}
    if settings.redis_tls_ca and url.startswith("rediss://"):
        kwargs["ssl_ca_certs"] = settings.redis_tls_ca
    return redis.Redis.from_url(url, **kwargs)
