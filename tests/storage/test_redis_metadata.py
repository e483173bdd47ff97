"""RedisMetadataStore against a real redis-server: the conformance suites, fencing with claim
tokens, atomicity across processes, and outages (Redis stopped or restarted mid-test)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from services import RedisService

from blobchain.layers.errors import Unavailable
from blobchain.layers.records import RefSpec
from blobchain.storage.claims import ClaimLost
from blobchain.storage.claims.redis import RedisClaimService
from blobchain.storage.metadata.redis import RedisMetadataStore
from blobchain.storage.redis_util import RedisAuthError

from . import expect_line, spawn_python
from .contracts import MetadataStoreContract, digest_of, layer_blob

pytestmark = pytest.mark.integration


@pytest.fixture
def metadata_store(redis_client: Any, redis_prefix: str) -> RedisMetadataStore:
    return RedisMetadataStore(redis_client, redis_prefix)


class TestRedisMetadataStore(MetadataStoreContract):
    pass


def wait_for(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --- layout -------------------------------------------------------------------------------------


def test_keys_stay_under_the_prefix(metadata_store: RedisMetadataStore, redis_client: Any) -> None:
    p = metadata_store.prefix
    metadata_store.register(RefSpec("r1", "/s"))
    metadata_store.set_blob("r1", layer_blob(1))
    metadata_store.put_manifest("m", [digest_of(b"m")])
    keys = sorted(k.decode() for k in redis_client.keys("*"))
    assert keys == sorted([f"{p}ref:r1", f"{p}refs", f"{p}manifests"])


def test_prefixes_isolate_stores(redis_client: Any) -> None:
    a = RedisMetadataStore(redis_client, "a:")
    b = RedisMetadataStore(redis_client, "b:")
    a.register(RefSpec("r", "/one"))
    b.register(RefSpec("r", "/two"))  # no conflict: another namespace
    assert [r.spec.snapshot for r in a.list_refs()] == ["/one"]
    assert [r.spec.snapshot for r in b.list_refs()] == ["/two"]


def test_decode_responses_client_works_too(
    redis_service: RedisService, redis_db: int, redis_prefix: str
) -> None:
    client = redis_service.client(redis_db, decode_responses=True)
    store = RedisMetadataStore(client, redis_prefix)
    store.register(RefSpec("r", "/s", parent="p"))
    rec = store.set_blob("r", layer_blob(3))
    assert rec.blob == layer_blob(3)
    assert store.get("r") == rec
    store.put_manifest("m", [digest_of(b"1")])
    assert store.manifest_digests() == {digest_of(b"1")}
    client.close()


# --- fencing ------------------------------------------------------------------------------------


def test_fenced_writes_need_the_current_lease(metadata_store: RedisMetadataStore, redis_client: Any) -> None:
    claims = RedisClaimService(redis_client, metadata_store.prefix)
    metadata_store.register(RefSpec("r", "/s"))
    mine = claims.try_acquire("r", 30)
    assert mine is not None
    rec = metadata_store.set_blob("r", layer_blob(1), token=mine.token)
    assert rec.blob == layer_blob(1)

    # We stall past the TTL (shortened here); another worker takes the lease over.
    redis_client.pexpire(mine.redis_key, 50)
    wait_for(lambda: claims.holder("r") is None)
    thief = claims.try_acquire("r", 30)
    assert thief is not None
    before = metadata_store.get("r")
    with pytest.raises(ClaimLost):
        metadata_store.set_blob("r", layer_blob(1, "zstd-3", diff_seed=1), token=mine.token)
    with pytest.raises(ClaimLost):
        metadata_store.set_chain("r", digest_of(b"c"), digest_of(b"b"), token=mine.token)
    assert metadata_store.get("r") == before  # nothing written

    # The current holder writes, and can commit-and-release in one step.
    rec = metadata_store.set_chain("r", digest_of(b"c"), digest_of(b"b"), token=thief.token, release=True)
    assert rec.chain_id == digest_of(b"c")
    assert claims.holder("r") is None
    with pytest.raises(ClaimLost):  # released: the token fences nothing any more
        metadata_store.set_blob("r", layer_blob(1, "zstd-3", diff_seed=1), token=thief.token)


def test_fencing_on_a_named_lease_key(metadata_store: RedisMetadataStore, redis_client: Any) -> None:
    # Workers lease a flight key (ref + variant), not the bare ref id.
    claims = RedisClaimService(redis_client, metadata_store.prefix)
    metadata_store.register(RefSpec("r", "/s"))
    lease = claims.try_acquire("r/gzip-6", 30)
    assert lease is not None
    with pytest.raises(ClaimLost):  # default lease key is the ref id, which nobody holds
        metadata_store.set_blob("r", layer_blob(1), token=lease.token)
    rec = metadata_store.set_blob("r", layer_blob(1), token=lease.token, claim_key="r/gzip-6", release=True)
    assert rec.blob == layer_blob(1)
    assert claims.holder("r/gzip-6") is None


def test_unfenced_writes_ignore_leases(metadata_store: RedisMetadataStore, redis_client: Any) -> None:
    claims = RedisClaimService(redis_client, metadata_store.prefix)
    metadata_store.register(RefSpec("r", "/s"))
    held = claims.try_acquire("r", 30)
    assert held is not None
    assert metadata_store.set_blob("r", layer_blob(1)).blob == layer_blob(1)
    assert claims.holder("r") == held.token  # and a write without release leaves the lease alone


# --- atomicity across processes -----------------------------------------------------------------

_CHILD = """
import sys
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from blobchain.storage.metadata.redis import RedisMetadataStore
from blobchain.storage.redis_util import RedisAuthError
url, prefix, i = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = RedisMetadataStore(redis.Redis.from_url(url), prefix)
chain = "sha256:" + f"{i:064x}"
print("ready", flush=True)
sys.stdin.readline()
rec = store.set_chain("r", chain, chain)
print("chain", rec.chain_id, flush=True)
"""


def test_processes_racing_set_chain_agree(metadata_store: RedisMetadataStore, redis_url: str) -> None:
    metadata_store.register(RefSpec("r", "/s"))
    procs = [spawn_python(_CHILD, redis_url, metadata_store.prefix, str(i + 1)) for i in range(4)]
    try:
        for p in procs:
            expect_line(p, "ready")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        seen = {expect_line(p, "chain") for p in procs}
    finally:
        for p in procs:
            p.kill()
            p.wait()
    rec = metadata_store.get("r")
    assert rec is not None and seen == {rec.chain_id}
    assert rec.chain_id in {"sha256:" + f"{i:064x}" for i in range(1, 5)}


# --- outages ------------------------------------------------------------------------------------


def _every_operation(store: RedisMetadataStore) -> list[Callable[[], object]]:
    return [
        lambda: store.get("r"),
        lambda: store.register(RefSpec("r", "/s")),
        lambda: store.set_blob("r", layer_blob(1)),
        lambda: store.set_chain("r", digest_of(b"c"), digest_of(b"b")),
        lambda: list(store.list_refs()),
        lambda: store.put_manifest("m", [digest_of(b"m")]),
        lambda: store.manifest_digests(),
    ]


def test_redis_down_is_unavailable_then_recovers(private_redis: RedisService) -> None:
    client = private_redis.client()
    store = RedisMetadataStore(client)
    store.register(RefSpec("r", "/s"))
    with private_redis.down():
        for op in _every_operation(store):
            with pytest.raises(Unavailable) as ei:
                op()
            assert ei.value.retryable
            assert f"127.0.0.1:{private_redis.port}" in str(ei.value)
    # Restarted without persistence: empty, and the Lua scripts must be loaded again (NOSCRIPT).
    assert store.get("r") is None
    store.register(RefSpec("r", "/s"))
    assert store.set_blob("r", layer_blob(1)).blob == layer_blob(1)


def test_redis_restart_mid_run(private_redis: RedisService) -> None:
    client = private_redis.client()
    store = RedisMetadataStore(client)
    store.register(RefSpec("a", "/a"))
    store.set_blob("a", layer_blob(1))  # scripts now cached on the server
    private_redis.restart()
    # Pooled connections are dead and the script cache is empty: the next calls still work.
    store.register(RefSpec("b", "/b", parent="a"))
    rec = store.set_blob("b", layer_blob(2))
    assert rec.blob == layer_blob(2)
    assert [r.ref_id for r in store.list_refs()] == ["b"]


def test_redis_restart_with_persistence_keeps_records(private_redis: RedisService) -> None:
    store = RedisMetadataStore(private_redis.client())
    store.register(RefSpec("a", "/a"))
    store.set_blob("a", layer_blob(1))
    store.set_chain("a", digest_of(b"c"), digest_of(b"b"))
    before = store.get("a")
    private_redis.restart(keep_data=True)
    assert store.get("a") == before
    assert store.set_blob("a", layer_blob(1, "zstd-3", diff_seed=1)).variants == (
        layer_blob(1, "zstd-3", diff_seed=1),
    )


def test_wrong_password_is_a_clear_non_retryable_error(private_redis: RedisService) -> None:
    admin = private_redis.client()
    admin.config_set("requirepass", "the-right-password")
    bad = "wrong-password-4242"
    store = RedisMetadataStore(private_redis.client(password=bad))
    with pytest.raises(RedisAuthError) as ei:
        store.get("r")
    assert not ei.value.retryable
    assert bad not in str(ei.value) and "the-right-password" not in str(ei.value)
    assert bad not in repr(store)
    anonymous = RedisMetadataStore(private_redis.client())
    with pytest.raises(RedisAuthError):
        anonymous.get("r")


def test_errors_name_no_password(private_redis: RedisService) -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{private_redis.port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1, retry=Retry(NoBackoff(), 1))
    store = RedisMetadataStore(client)
    private_redis.stop()
    try:
        with pytest.raises(Unavailable) as ei:
            store.get("r")
    finally:
        private_redis.start()
    assert "hunter2" not in str(ei.value) and "hunter2" not in repr(store)
