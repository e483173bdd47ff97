"""Fixtures for the Celery adapter tests: distributed settings on the session's real Redis and
SeaweedFS (a unique key prefix and S3 prefix per test), worker processes started by the test,
an in-process worker, and the embedded reference run.

Redis DBs used here: 1 (broker), 2 (results), 3 (leases, records, counters). Tests never flush
them: every test has its own ``global_keyprefix``/``key_prefix``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from blobchain.client.api import Client
from blobchain.config.settings import Settings
from blobchain.workers.executor import ChainResult

BROKER_DB, RESULT_DB, LOCK_DB = 1, 2, 3
HOST = socket.gethostname()
VENV_BIN = Path(sys.executable).parent


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as ``BLOBCHAIN_*`` variables, for worker processes."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, tuple):
            value = os.pathsep.join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"BLOBCHAIN_{name.upper()}"] = str(value)
    return env


def clean_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BLOBCHAIN_") or k.startswith("BLOBCHAIN_TEST_")
    }
    env.update(settings_env(settings))
    env.update(extra)
    return env


@pytest.fixture
def snapdir() -> Iterator[Path]:
    """A snapshot root readable by any user (pytest's tmp dirs are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="bc-snaps-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def new_settings(redis_service: Any, s3_service: Any, snapdir: Path, **overrides: Any) -> Settings:
    """Distributed settings on the test services, with a key prefix and S3 prefix of their own."""
    tag = uuid.uuid4().hex[:10]
    base: dict[str, Any] = {
        "broker_url": redis_service.url_for(BROKER_DB),
        "result_url": redis_service.url_for(RESULT_DB),
        "lock_url": redis_service.url_for(LOCK_DB),
        "key_prefix": f"bct:{tag}:",
        "s3_endpoint": s3_service.endpoint,
        "s3_region": s3_service.region,
        "s3_bucket": s3_service.bucket,
        "s3_prefix": f"tasks-{tag}/",
        "s3_access_key": s3_service.access_key,
        "s3_secret_key": s3_service.secret_key,
        "roots": (str(snapdir),),
        "soft_time_limit_s": 50,
        "time_limit_s": 60,
        "lease_ttl_s": 5.0,
        "max_attempts": 3,
        "wait_budget_s": 300.0,
        "jobs": 2,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def make_settings(redis_service: Any, s3_service: Any, snapdir: Path) -> Callable[..., Settings]:
    """``make_settings(**overrides)``: distributed settings for this test (one prefix per call)."""

    def make(**overrides: Any) -> Settings:
        return new_settings(redis_service, s3_service, snapdir, **overrides)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


class WorkerProcess:
    """A real worker process (``celery -A blobchain.tasks.app worker`` or ``blobchain worker``),
    in its own process group so the test can kill it and its pool children together."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        logdir: Path,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        cli: bool = False,
        extra_env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.nodename = f"{name}@{HOST}"
        self.log_path = logdir / f"worker-{name}.log"
        self.concurrency = concurrency
        self.pool = pool
        self.cli = cli
        self.extra_env = extra_env or {}
        self.wrap = wrap or []
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        if self.cli:
            return [
                *self.wrap,
                str(VENV_BIN / "blobchain"),
                "worker",
                "-c",
                str(self.concurrency),
                "-n",
                self.nodename,
            ]
        return [
            *self.wrap,
            sys.executable, "-m", "celery", "-A", "blobchain.tasks.app", "worker",
            "-Q", "blobchain", "-P", self.pool, "-c", str(self.concurrency), "-n", self.nodename,
            "-E", "--without-mingle", "--without-gossip", "-l", "INFO",
        ]  # fmt: skip

    def start(self) -> WorkerProcess:
        env = clean_env(self.settings, **self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",
                start_new_session=True,
            )
        return self

    def wait_ready(self, app: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                if app.control.ping(destination=[self.nodename], timeout=0.5):
                    return
            time.sleep(0.2)
        raise AssertionError(f"worker {self.name} not ready after {timeout}s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> set[int]:
        """The main process and its pool children."""
        try:
            p = psutil.Process(self.pid)
            return {self.pid} | {c.pid for c in p.children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children): a crash."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send ``sig`` to the main process and wait; SIGKILL the group if it does not exit."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def log(self) -> str:
        """The whole log. Not a tail: the tracebacks that follow a line a test waits for (one
        broker loss logs ~16 KB of them) pushed that line out of a 20 KB tail between two polls."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 20000) -> str:
        """The log's end, for a failure message."""
        return self.log()[-n:]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``workers(settings, name, **kw)``: start a worker process; all are killed after the test."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, name: str, **kw: Any) -> WorkerProcess:
        w = WorkerProcess(settings, f"{name}-{uuid.uuid4().hex[:6]}", tmp_path, **kw).start()
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.kill()


@contextlib.contextmanager
def inproc_worker(app: Any, *, concurrency: int = 4) -> Iterator[Any]:
    """An in-process worker (threads pool) on ``app``; tasks run in this process."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        app,
        pool="threads",
        concurrency=concurrency,
        perform_ping_check=False,
        shutdown_timeout=60,
        loglevel="WARNING",
    ) as w:
        yield w


def embedded_chain(store: Path, snapshots: list[Path], **opts: Any) -> ChainResult:
    """The reference: the same chain computed in embedded mode (local store, in-process)."""
    with Client(Settings(store=str(store)), in_process=True) as client:
        specs = client.register_chain(snapshots)
        with client.lease() as lease:
            return client.compute_blob_chain(specs[-1].ref_id, lease=lease, **opts).wait(120)


def run_chain(settings: Settings, snapshots: list[Path], timeout: float = 120, **opts: Any) -> ChainResult:
    """Register ``snapshots`` as a chain and compute it through the distributed client."""
    with Client(settings) as client:
        specs = client.register_chain(snapshots)
        with client.lease() as lease:
            return client.compute_blob_chain(specs[-1].ref_id, lease=lease, **opts).wait(timeout)


def s3_keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    token = None
    while True:
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        page = s3_client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents") or ()]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def s3_get(s3_client: Any, bucket: str, key: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()


def redis_for(settings: Settings) -> Any:
    from blobchain.config.factory import redis_client

    return redis_client(settings, settings.redis_urls()[2])


def built_counts(settings: Settings) -> dict[str, int]:
    """``stats:built:<ref>#<variant>`` counters written by the build task (real diffs)."""
    r = redis_for(settings)
    try:
        prefix = f"{settings.key_prefix}stats:built:"
        return {k.decode()[len(prefix) :]: int(r.get(k)) for k in r.scan_iter(match=prefix + "*", count=1000)}
    finally:
        r.close()
