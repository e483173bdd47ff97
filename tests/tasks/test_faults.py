"""Faults with real processes: a worker SIGKILLed mid-upload, a ref that keeps killing its
worker, S3 down for a while, Redis restarted mid-run."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsgen
import psutil
import pytest

from blobchain.client.api import Client, chain_specs
from blobchain.config.settings import Settings
from blobchain.layers.errors import BlobchainError, Unavailable
from blobchain.layers.records import LayerOptions
from blobchain.tasks.app import make_app
from blobchain.tasks.layer_tasks import PROGRESS, RefTimedOut
from blobchain.tasks.poison import PoisonRef
from blobchain.tasks.timing import timing

from .conftest import built_counts, embedded_chain, new_settings, run_chain, s3_get, s3_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# Random letters of a 6-letter alphabet: libdeflate at level 9 (the default gzip strategy)
# deflates them at ~14 MB/s per core (random hex, used before, ~80 MB/s: too fast to catch).
_SLOW_LETTERS = bytes(b"acgtAC"[i % 6] for i in range(256))


def _random_file(path: Path, size: int) -> None:
    """``size`` bytes that gzip level 9 compresses slowly (random letters of a 6-letter
    alphabet: ~14 MB/s per core with libdeflate 9, ~5 MB/s with zlib-ng 9): the fault tests
    must catch a build mid-way. Plain random bytes are not slow, since incompressible blocks
    are stored at memory speed, and random hex is no longer slow either with libdeflate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n).translate(_SLOW_LETTERS))
            left -= n


def _big_chain(snapdir: Path, size: int = 96 << 20) -> list[Path]:
    s0 = fsgen.build(snapdir / "base", {b"etc/hostname": fsgen.File(b"base\n")})
    s1 = fsgen.build(snapdir / "big", {b"etc/hostname": fsgen.File(b"big\n")})
    _random_file(s1 / "data" / "blob.bin", size)
    return [s0, s1]


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _submit(client: Client, chain: list[Path], **kw: Any) -> Any:
    specs = client.register_chain(chain)
    lease_cm = client.lease()
    lease = lease_cm.__enter__()
    return client.compute_blob_chain(specs[-1].ref_id, lease=lease, **kw), lease_cm


def _meta(app: Any, task_id: str) -> dict[str, Any]:
    return app.backend.get_task_meta(task_id)


def _check_store(settings: Settings, s3_client: Any, digests: set[str]) -> None:
    """What a user sees in the bucket once the chain is done: every object under blobs/ is whole
    (re-hashed) and one of ``digests``, and no upload remains. The test sweeps nothing itself:
    the worker that took a killed worker's ref over swept its uploads."""
    base = f"{settings.s3_prefix}blobs/sha256/"
    keys = s3_keys(s3_client, settings.s3_bucket, base)
    assert sorted(keys) == sorted(base + d[7:] for d in digests)
    for key in keys:
        data = s3_get(s3_client, settings.s3_bucket, key)
        assert hashlib.sha256(data).hexdigest() == key[len(base) :]
    assert s3_keys(s3_client, settings.s3_bucket, f"{settings.s3_prefix}uploads/") == []
    ups = s3_client.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    assert not ups.get("Uploads")


def test_worker_killed_mid_upload_chain_completes_on_another(
    make_settings: Callable[..., Settings], snapdir: Path, workers: Any, s3_client: Any, tmp_path: Path
) -> None:
    # Limits short enough that the dead worker's message comes back within a minute (VT = 42 s
    # here), long enough that worker b redoes the 96 MiB gzip -9 build on a loaded host. b's
    # janitor takes the ref over first, once a's lease and beat expire: a poll of 1 s makes
    # that beat 3 s instead of the default 30 s (the default-limits takeover has its own test).
    settings = make_settings(time_limit_s=24, soft_time_limit_s=20, lease_ttl_s=3.0, takeover_poll_s=1.0)
    chain = _big_chain(snapdir)
    app = make_app(settings)
    a = workers(settings, "a", concurrency=1)
    a.wait_ready(app)
    with Client(settings) as client:
        job, lease_cm = _submit(client, chain, compression="gzip", level=9)
        big_ref = job.ref_id
        tid = job.task_ids[big_ref]

        def mid_upload() -> bool:
            meta = _meta(app, tid)
            if meta.get("status") != PROGRESS or not meta["result"].get("bytes"):
                return False
            ups = s3_client.list_multipart_uploads(
                Bucket=settings.s3_bucket, Prefix=f"{settings.s3_prefix}uploads/"
            )
            return bool(ups.get("Uploads"))

        _until(mid_upload, 60, "the big layer to be mid-upload")
        assert meta_pid_in(_meta(app, tid), a.pids())
        a.kill()
        b = workers(settings, "b", concurrency=1)
        b.wait_ready(app)
        got = job.wait(180)
        lease_cm.__exit__(None, None, None)
        records = list(client.deps.metadata.list_refs())

    want = embedded_chain(tmp_path / "embedded", chain, compression="gzip", level=9)
    assert got.to_dict() == want.to_dict()
    assert sorted(r.ref_id for r in records) == sorted(r.ref_id for r in got.records)
    assert all(r.blob is not None and not r.variants for r in records)
    _check_store(settings, s3_client, {b.digest for b in got.layer_blobs()})
    variant = LayerOptions(compression="gzip", level=9).variant_key()
    # Counted when a diff starts: the big layer's diff ran on a (killed mid-upload), then on b.
    want_counts = {f"{r.ref_id}#{variant}": 2 if r.ref_id == big_ref else 1 for r in got.records}
    assert built_counts(settings) == want_counts
    assert b.alive()


def meta_pid_in(meta: dict[str, Any], pids: set[int]) -> bool:
    return int(meta["result"].get("pid", -1)) in pids


def test_ref_that_keeps_killing_its_worker_fails_as_poison(
    make_settings: Callable[..., Settings], snapdir: Path, workers: Any, s3_client: Any
) -> None:
    # Each time the ref's build runs, its pool process is SIGKILLed (as the OOM killer would).
    settings = make_settings(max_attempts=2, lease_ttl_s=2.0)
    chain = _big_chain(snapdir, 48 << 20)
    app = make_app(settings)
    w = workers(settings, "poison", concurrency=1)
    w.wait_ready(app)
    killed: list[int] = []
    with Client(settings) as client:
        job, lease_cm = _submit(client, chain, compression="gzip", level=9)
        tid = job.task_ids[job.ref_id]
        deadline = time.monotonic() + 180
        while not job.done() and time.monotonic() < deadline:
            meta = _meta(app, tid)
            if meta.get("status") == PROGRESS:
                pid = int(meta["result"].get("pid", -1))
                if pid not in killed and pid in w.pids() and pid != w.pid and psutil.pid_exists(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)
        with pytest.raises(PoisonRef) as info:
            job.wait(10)
        lease_cm.__exit__(None, None, None)
        assert info.value.details["crashes"] == settings.max_attempts
        assert len(killed) == settings.max_attempts
        assert client.status(job.ref_id).blob is None
        assert w.alive()
        # The worker keeps serving: a good chain goes through.
        good = fsgen.build(snapdir / "good", {b"f": fsgen.File(b"fine")})
        res = run_chain(settings, [good])
        assert res.records[0].blob is not None
        # ...and the poison ref stays failed on resubmission, without killing anything.
        again, lease_cm = _submit(client, chain, compression="gzip", level=9)
        with pytest.raises(PoisonRef):
            again.wait(60)
        lease_cm.__exit__(None, None, None)
    assert len(killed) == settings.max_attempts


def test_s3_down_fails_clearly_then_resubmission_completes(
    redis_service: Any, private_s3: Any, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    settings = new_settings(redis_service, private_s3, snapdir)
    chain = [
        fsgen.build(snapdir / "s0", {b"a": fsgen.File(b"a" * 1000)}),
        fsgen.build(snapdir / "s1", {b"a": fsgen.File(b"a" * 1000), b"b": fsgen.File(b"b")}),
    ]
    app = make_app(settings)
    w = workers(settings, "s3down", concurrency=2)
    w.wait_ready(app)
    with private_s3.down():
        with pytest.raises(Unavailable) as info:
            run_chain(settings, chain, timeout=300)
        assert "S3" in info.value.message
        with Client(settings) as client:
            assert all(client.status(s.ref_id).blob is None for s in client.register_chain(chain))
    got = run_chain(settings, chain, timeout=120)
    want = embedded_chain(tmp_path / "embedded", chain)
    assert got.to_dict() == want.to_dict()
    assert w.alive()


def test_redis_down_and_back_empty_gives_an_error_or_the_right_result(
    private_redis: Any, s3_service: Any, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    settings = new_settings(private_redis, s3_service, snapdir)
    chain = _big_chain(snapdir, 64 << 20)
    want = embedded_chain(tmp_path / "embedded", chain, compression="gzip", level=9)
    app = make_app(settings)
    w = workers(settings, "rr", concurrency=2)
    w.wait_ready(app)
    with Client(settings) as client:
        job, lease_cm = _submit(client, chain, compression="gzip", level=9)
        tid = job.task_ids[job.ref_id]
        _until(lambda: _meta(app, tid).get("status") == PROGRESS, 60, "the build to be running")
        # Down long enough for the worker to notice (it holds unacked messages then), then
        # back, empty (this Redis has no persistence).
        with private_redis.down():
            _until(lambda: "Connection to broker lost" in w.log(), 60, "the worker to notice")
        try:
            got = job.wait(120)
        except BlobchainError as e:
            # A clear, named error (state lost or Redis unavailable), never a hang.
            assert e.code in ("unavailable", "ref_not_found", "missing_lease", "lease_lost"), e
        else:
            assert got.to_dict() == want.to_dict()
        with contextlib.suppress(BlobchainError):
            lease_cm.__exit__(None, None, None)
    # Redis is back (empty): register again and resubmit; the workers reconnected.
    got = run_chain(settings, chain, timeout=180, compression="gzip", level=9)
    assert got.to_dict() == want.to_dict()
    assert w.alive()


def test_sigterm_lets_the_layer_in_flight_finish(
    make_settings: Callable[..., Settings], snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    # `blobchain worker` remaps SIGTERM to the soft shutdown: the running build gets
    # worker_soft_shutdown_timeout (here 12 s, the soft limit) to finish, then the worker stops.
    # The worker holds for that whole time even once the build is done (~3.5 s on a loaded
    # host), so the window is what the test waits: 12 s keeps over 3x the build's time.
    settings = make_settings(soft_time_limit_s=12, time_limit_s=15)
    chain = _big_chain(snapdir, 64 << 20)
    app = make_app(settings)
    a = workers(settings, "term", cli=True, concurrency=1)
    a.wait_ready(app)
    with Client(settings) as client:
        job, lease_cm = _submit(client, chain, compression="gzip", level=9)
        tid = job.task_ids[job.ref_id]
        _until(lambda: _meta(app, tid).get("status") == PROGRESS, 60, "the build to be running")
        a.stop(signal.SIGTERM, timeout=60)
        assert "Soft Shutdown" in a.log()
        assert _meta(app, tid).get("status") == "SUCCESS"
        b = workers(settings, "after", concurrency=1)
        b.wait_ready(app)
        got = job.wait(120)
        lease_cm.__exit__(None, None, None)
    want = embedded_chain(tmp_path / "embedded", chain, compression="gzip", level=9)
    assert got.to_dict() == want.to_dict()
    variant = LayerOptions(compression="gzip", level=9).variant_key()
    assert built_counts(settings) == {f"{r.ref_id}#{variant}": 1 for r in got.records}


def test_sigterm_stops_an_idle_worker_without_waiting_the_soft_window(
    make_settings: Callable[..., Settings], workers: Any
) -> None:
    # With nothing running there is nothing to let finish: `docker stop` of an idle worker (a
    # fleet scaled down) must not wait the soft shutdown's 30 s before the worker exits.
    settings = make_settings(soft_time_limit_s=60, time_limit_s=90)
    assert timing(settings).soft_shutdown_s == 30
    app = make_app(settings)
    w = workers(settings, "idle", cli=True, concurrency=1)
    w.wait_ready(app)
    t0 = time.monotonic()
    code = w.stop(signal.SIGTERM, timeout=25)
    waited = time.monotonic() - t0
    assert code is not None, f"the idle worker was still up {waited:.0f} s after SIGTERM:\n{w.log_tail()}"
    assert code == 0, w.log_tail()
    assert "Soft Shutdown" not in w.log()


def test_a_layer_over_the_time_limit_fails_with_ref_timed_out(
    make_settings: Callable[..., Settings], snapdir: Path, workers: Any, s3_client: Any
) -> None:
    settings = make_settings(soft_time_limit_s=1, time_limit_s=3)
    # The big snapshot alone: a tiny base could miss a 1 s limit too on a loaded host.
    chain = _big_chain(snapdir, 96 << 20)[1:]
    app = make_app(settings)
    w = workers(settings, "slow", concurrency=1)
    w.wait_ready(app)
    with pytest.raises(RefTimedOut) as info:
        run_chain(settings, chain, timeout=120, compression="gzip", level=9)
    assert "time limit" in info.value.message
    with Client(settings) as client:
        assert client.status(chain_specs(chain)[-1].ref_id).blob is None
    _check_store(settings, s3_client, set())
    assert w.alive()
