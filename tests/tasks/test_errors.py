"""Bad inputs through the distributed client: the same named error as embedded mode, no blob
written, and the workers keep serving. One worker process serves the whole module."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsgen
import pytest
import services

from blobchain.client.api import Client, chain_specs
from blobchain.config.settings import Settings
from blobchain.layers.errors import (
    BlobchainError,
    ConflictingParent,
    FileChanged,
    InvalidLevel,
    MissingParent,
    ParentCycle,
    SnapshotNotFound,
    SnapshotOutsideRoots,
    UnknownCompression,
    UnreadableFile,
)
from blobchain.layers.records import RefSpec
from blobchain.tasks.app import make_app
from blobchain.workers.errors import NoBlobs

from .conftest import VENV_BIN, WorkerProcess, new_settings, s3_get, s3_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Root without DAC override reads files by their mode bits like any user: a mode-000 file is
# then really unreadable (we run as root, where chmod 000 alone stops nothing).
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.fixture(scope="module")
def snaps() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bc-err-snaps-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def dsettings(redis_service: Any, s3_service: Any, snaps: Path) -> Settings:
    return new_settings(redis_service, s3_service, snaps)


@pytest.fixture(scope="module")
def worker(dsettings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(dsettings, "errors", tmp_path_factory.mktemp("errlogs"), concurrency=2).start()
    try:
        w.wait_ready(make_app(dsettings))
        yield w
    finally:
        w.kill()


@pytest.fixture
def client(dsettings: Settings, worker: WorkerProcess) -> Iterator[Client]:
    with Client(dsettings) as c:
        yield c
    assert worker.alive(), worker.log_tail()


@pytest.fixture
def embedded(tmp_path: Path, snaps: Path) -> Iterator[Client]:
    with Client(Settings(store=str(tmp_path / "store"), roots=(str(snaps),)), in_process=True) as c:
        yield c


def _compute(client: Client, snapshots: list[Path], **kw: Any) -> Any:
    specs = client.register_chain(snapshots)
    with client.lease() as lease:
        return client.compute_blob_chain(specs[-1].ref_id, lease=lease, **kw).wait(120)


def _error(fn: Any) -> BlobchainError:
    with pytest.raises(BlobchainError) as info:
        fn()
    return info.value


def _blob_count(s3_client: Any, settings: Settings) -> int:
    return len(s3_keys(s3_client, settings.s3_bucket, f"{settings.s3_prefix}blobs/"))


def _no_blob(client: Client, snapshots: list[Path]) -> None:
    ref = chain_specs(snapshots)[-1].ref_id
    rec = client.deps.metadata.get(ref)
    assert rec is None or rec.blob is None


def test_missing_snapshot(
    client: Client, embedded: Client, snaps: Path, s3_client: Any, dsettings: Settings
) -> None:
    before = _blob_count(s3_client, dsettings)
    chain = [snaps / "does-not-exist"]
    got = _error(lambda: _compute(client, chain))
    want = _error(lambda: _compute(embedded, chain))
    assert type(got) is type(want) is SnapshotNotFound
    assert got.details.get("snapshot") == str(chain[0])
    _no_blob(client, chain)
    assert _blob_count(s3_client, dsettings) == before


def test_snapshot_outside_roots(client: Client, embedded: Client, tmp_path: Path) -> None:
    outside = fsgen.build(tmp_path / "outside", {b"f": fsgen.File(b"x")})
    got = _error(lambda: _compute(client, [outside]))
    want = _error(lambda: _compute(embedded, [outside]))
    assert type(got) is type(want) is SnapshotOutsideRoots


def test_worker_rechecks_roots(client: Client, tmp_path: Path) -> None:
    # A record written behind the client's back: the worker refuses the path itself.
    outside = fsgen.build(tmp_path / "outside2", {b"f": fsgen.File(b"x")})
    spec = RefSpec(ref_id="sneaky-outside", snapshot=str(outside))
    client.deps.metadata.register(spec)
    with client.lease() as lease:
        job = client.compute_blob_chain(spec.ref_id, lease=lease)
        err = _error(lambda: job.wait(60))
    assert isinstance(err, SnapshotOutsideRoots)
    assert client.status(spec.ref_id).blob is None


def test_symlink_pointing_outside_is_stored_as_a_link(
    client: Client, embedded: Client, snaps: Path, s3_client: Any, dsettings: Settings
) -> None:
    snap = fsgen.build(
        snaps / "links",
        {
            b"etc/passwd-link": fsgen.Symlink(b"/etc/passwd"),
            b"up": fsgen.Symlink(b"../../../.."),
            b"f": fsgen.File(b"data"),
        },
    )
    got = _compute(client, [snap])
    want = _compute(embedded, [snap])
    assert got.to_dict() == want.to_dict()
    blob = got.layer_blobs()[0]
    data = s3_get(s3_client, dsettings.s3_bucket, f"{dsettings.s3_prefix}blobs/sha256/{blob.digest[7:]}")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        links = {m.name: m.linkname for m in tar.getmembers() if m.issym()}
    assert links == {"etc/passwd-link": "/etc/passwd", "up": "../../../.."}


def test_missing_parent(client: Client, embedded: Client, snaps: Path) -> None:
    snap = fsgen.build(snaps / "orphan", {b"f": fsgen.File(b"x")})
    spec = RefSpec(ref_id="orphan-child", snapshot=str(snap), parent="no-such-parent")
    got = _error(lambda: client.register([spec]))
    want = _error(lambda: embedded.register([spec]))
    assert type(got) is type(want) is MissingParent
    assert client.deps.metadata.get("orphan-child") is None


def test_parent_cycle(client: Client, embedded: Client, snaps: Path) -> None:
    snap = fsgen.build(snaps / "cyc", {b"f": fsgen.File(b"x")})
    specs = [
        RefSpec(ref_id="cyc-a", snapshot=str(snap), parent="cyc-b"),
        RefSpec(ref_id="cyc-b", snapshot=str(snap), parent="cyc-a"),
    ]
    got = _error(lambda: client.register(specs))
    want = _error(lambda: embedded.register(specs))
    assert type(got) is type(want) is ParentCycle
    assert client.deps.metadata.get("cyc-a") is None and client.deps.metadata.get("cyc-b") is None


def test_one_ref_with_two_parents(client: Client, embedded: Client, snaps: Path) -> None:
    snap = fsgen.build(snaps / "two", {b"f": fsgen.File(b"x")})
    base = [RefSpec(ref_id="two-p1", snapshot=str(snap)), RefSpec(ref_id="two-p2", snapshot=str(snap))]
    for c in (client, embedded):
        c.register(base)
    child = RefSpec(ref_id="two-child", snapshot=str(snap), parent="two-p1")
    other = RefSpec(ref_id="two-child", snapshot=str(snap), parent="two-p2")
    got = _error(lambda: client.register([child, other]))
    want = _error(lambda: embedded.register([child, other]))
    assert type(got) is type(want) is ConflictingParent
    client.register([child])
    embedded.register([child])
    got = _error(lambda: client.register([other]))
    want = _error(lambda: embedded.register([other]))
    assert type(got) is type(want) is ConflictingParent
    assert client.status("two-child").parent == "two-p1"


@pytest.mark.parametrize(
    ("opts", "cls"),
    [({"compression": "lz4"}, UnknownCompression), ({"compression": "gzip", "level": 12}, InvalidLevel)],
)
def test_bad_options(client: Client, embedded: Client, snaps: Path, opts: dict[str, Any], cls: type) -> None:
    snap = snaps / "opts"
    if not snap.exists():
        fsgen.build(snap, {b"f": fsgen.File(b"x")})
    got = _error(lambda: _compute(client, [snap], **opts))
    want = _error(lambda: _compute(embedded, [snap], **opts))
    assert type(got) is type(want) is cls
    _no_blob(client, [snap])


def test_no_blobs_without_create(client: Client, embedded: Client, snaps: Path) -> None:
    snap = fsgen.build(snaps / "nocreate", {b"f": fsgen.File(b"x")})

    def run(c: Client) -> None:
        specs = c.register_chain([snap])
        with c.lease() as lease:
            c.compute_blob_chain(specs[-1].ref_id, lease=lease, create_if_needed=False).wait(60)

    got = _error(lambda: run(client))
    want = _error(lambda: run(embedded))
    assert type(got) is type(want) is NoBlobs


@services.needs_tool("setpriv", "util-linux")
@services.needs_root("to start a worker without DAC override")
def test_unreadable_file(redis_service: Any, s3_service: Any, snaps: Path, tmp_path: Path) -> None:
    snap = fsgen.build(
        snaps / "unreadable", {b"ok": fsgen.File(b"ok"), b"secret": fsgen.File(b"s", mode=0o000)}
    )
    # Settings of its own (another key prefix, so another queue): only the no-DAC worker serves.
    settings = new_settings(redis_service, s3_service, snaps)
    w = WorkerProcess(settings, "nodac", tmp_path, concurrency=1, wrap=NO_DAC)
    w.start()
    try:
        w.wait_ready(make_app(settings))
        with Client(settings) as client:
            err = _error(lambda: _compute(client, [snap]))
        assert isinstance(err, UnreadableFile), err
    finally:
        w.kill()
    # Embedded mode without DAC override: the CLI reports the same named error.
    out = tmp_path / "oci"
    out.mkdir()
    r = subprocess.run(
        [*NO_DAC, str(VENV_BIN / "blobchain"), "export", str(snap), "--oci", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("BLOBCHAIN_")},
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "(unreadable_file)" in r.stderr


@contextlib.contextmanager
def _appending(path: Path) -> Iterator[None]:
    """A process appending to ``path`` without pause for the duration of the block."""
    code = (
        "import os,sys\n"
        "fd=os.open(sys.argv[1],os.O_WRONLY|os.O_APPEND)\n"
        "while True:\n"
        "    os.write(fd,b'x'*64)\n"
        "    if os.fstat(fd).st_size>(256<<20): os.ftruncate(fd,64<<20)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    try:
        start = path.stat().st_size
        deadline = time.monotonic() + 10
        while path.stat().st_size == start and time.monotonic() < deadline:
            time.sleep(0.01)
        yield
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_file_changing_during_the_walk(client: Client, embedded: Client, snaps: Path) -> None:
    snap = fsgen.build(snaps / "growing", {b"a": fsgen.File(b"a"), b"log": fsgen.File(b"x" * (64 << 20))})
    with _appending(snap / "log"):
        got = _error(lambda: _compute(client, [snap]))
        want = _error(lambda: _compute(embedded, [snap]))
    assert type(got) is type(want) is FileChanged
    _no_blob(client, [snap])


def test_workers_keep_serving(client: Client, embedded: Client, snaps: Path, worker: WorkerProcess) -> None:
    snap0 = fsgen.build(snaps / "good0", {b"f": fsgen.File(b"good")})
    snap1 = fsgen.build(snaps / "good1", {b"f": fsgen.File(b"better"), b"g": fsgen.File(b"new")})
    got = _compute(client, [snap0, snap1])
    want = _compute(embedded, [snap0, snap1])
    assert got.to_dict() == want.to_dict()
    assert worker.alive()
