"""The only place that chooses implementations: settings in, :class:`Deps` out.

Embedded mode (the default): the OCI layout at ``settings.store`` is the content store, with
SQLite metadata and GC leases and file claims beside it in ``.blobchain/``. Distributed mode (a broker URL is
set): S3 content and Redis metadata, GC leases and claims. boto3 and redis are imported only here, lazily.
"""

from __future__ import annotations

import os

from blobchain.config.settings import Settings
from blobchain.layers.errors import InvalidSetting, StoreNotFound, from_os_error
from blobchain.workers.deps import Deps

__all__ = ["open_deps", "redis_client"]


def open_deps(settings: Settings, *, create: bool = True) -> Deps:
    """The stores ``settings`` name. ``create=False`` (reading commands) refuses to create an
    embedded store that does not exist yet (StoreNotFound) instead of making an empty one."""
    common = {
        "roots": settings.roots or None,
        "threads": settings.threads,
        "lease_ttl_s": settings.lease_ttl_s,
    }
    if not settings.distributed:
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
            **common,
        )

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
    return Deps(
        content=content,
        metadata=RedisMetadataStore(client, settings.key_prefix),
        leases=RedisLeaseManager(client, settings.key_prefix),
        claims=RedisClaimService(client, settings.key_prefix),
        **common,
    )


def redis_client(settings: Settings, url: str):  # type: ignore[no-untyped-def]
    import redis

    kwargs = {"socket_timeout": 30, "socket_connect_timeout": 5, "health_check_interval": 25}
    if settings.redis_tls_ca and url.startswith("rediss://"):
        kwargs["ssl_ca_certs"] = settings.redis_tls_ca
    return redis.Redis.from_url(url, **kwargs)
