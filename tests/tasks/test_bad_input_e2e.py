"""Bad input and outages in the middle of a worker's build, end to end (real worker processes,
real Redis, a SeaweedFS of this module's own):

- a file that vanishes mid-walk fails the ref with ``file_changed``; nothing is stored, the
  worker keeps serving, and a resubmission after the file is back completes;
- S3 killed *during* the layer's upload (the multipart upload has begun): the chain fails with a
  named ``unavailable`` error within a bounded number of retries and a bounded time, nothing
  partial is visible, and once S3 is back a resubmission completes, byte for byte as embedded.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsgen
import pytest

from blobchain.client.api import Client
from blobchain.layers.errors import FileChanged, Unavailable
from blobchain.layers.records import LayerOptions
from blobchain.tasks.app import make_app
from blobchain.tasks.layer_tasks import PROGRESS, UNAVAILABLE_RETRIES

from .conftest import built_counts, embedded_chain, new_settings, run_chain, s3_get, s3_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_SIXTEEN = bytes.maketrans(bytes(range(256)), b"abcdefghijklmnop" * 16)
GZIP9 = {"compression": "gzip", "level": 9}


def text_file(path: Path, size: int, seed: int = 0) -> None:
    """Compressible but slow to compress at gzip -9, so a build is visibly under way for seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(rng.randbytes(1 << 20).translate(_SIXTEEN))


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _submit(client: Client, chain: list[Path], **kw: Any) -> tuple[Any, Any]:
    specs = client.register_chain(chain)
    lease_cm = client.lease()
    return client.compute_blob_chain(specs[-1].ref_id, lease=lease_cm.__enter__(), **kw), lease_cm


def _progress_bytes(app: Any, task_id: str) -> int:
    meta = app.backend.get_task_meta(task_id)
    return int(meta["result"].get("bytes", 0)) if meta.get("status") == PROGRESS else 0


def _blobs_whole(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    """Every object under blobs/ matches its name; returns the digests."""
    base = f"{prefix}blobs/sha256/"
    keys = s3_keys(s3_client, bucket, base)
    for key in keys:
        assert hashlib.sha256(s3_get(s3_client, bucket, key)).hexdigest() == key[len(base) :]
    return ["sha256:" + k[len(base) :] for k in keys]


def test_file_vanishing_mid_walk_on_a_worker_is_file_changed(
    redis_service: Any, s3_service: Any, s3_client: Any, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    settings = new_settings(redis_service, s3_service, snapdir)
    base = fsgen.build(snapdir / "s0", {b"etc/hostname": fsgen.File(b"base\n")})
    files = {b"etc/hostname": fsgen.File(b"x\n"), b"aa/zz-victim": fsgen.File(b"v" * 10)}
    snap = fsgen.build(snapdir / "s1", files)
    text_file(snap / "aa" / "big.txt", 32 << 20)  # walked before aa/zz-victim (listed with it)
    app = make_app(settings)
    w = workers(settings, "vanish", concurrency=1)
    w.wait_ready(app)
    with Client(settings) as client:
        job, lease_cm = _submit(client, [base, snap], **GZIP9)
        tid = job.task_ids[job.ref_id]
        _until(lambda: _progress_bytes(app, tid) >= 4 << 20, 120, "the walk to be inside aa/big.txt")
        (snap / "aa" / "zz-victim").unlink()
        with pytest.raises(FileChanged) as info:
            job.wait(120)
        lease_cm.__exit__(None, None, None)
        assert "zz-victim" in info.value.message
        assert client.status(job.ref_id).blob is None
    digests = _blobs_whole(s3_client, settings.s3_bucket, settings.s3_prefix)
    assert len(digests) == 1  # the base layer only
    assert w.alive()
    (snap / "aa" / "zz-victim").write_bytes(b"v" * 10)
    got = run_chain(settings, [base, snap], **GZIP9)
    assert got.to_dict() == embedded_chain(tmp_path / "embedded", [base, snap], **GZIP9).to_dict()
    assert w.alive()


def test_s3_killed_during_the_upload_fails_within_bounds_then_resubmission_completes(
    redis_service: Any, private_s3: Any, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    settings = new_settings(redis_service, private_s3, snapdir)
    s3 = private_s3.client()
    base = fsgen.build(snapdir / "base", {b"etc/hostname": fsgen.File(b"base\n")})
    big = fsgen.build(snapdir / "big", {b"etc/hostname": fsgen.File(b"big\n")})
    text_file(big / "data" / "log.txt", 40 << 20)  # about 22 MiB at gzip -9: several 8 MiB parts
    chain = [base, big]
    app = make_app(settings)
    w = workers(settings, "s3kill", concurrency=1)
    w.wait_ready(app)
    with Client(settings) as client:
        job, lease_cm = _submit(client, chain, **GZIP9)
        big_ref = job.ref_id
        tid = job.task_ids[big_ref]

        def uploading() -> bool:
            if not _progress_bytes(app, tid):
                return False
            ups = s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
            return bool(ups.get("Uploads"))

        _until(uploading, 120, "the big layer's multipart upload to have begun")
        private_s3.kill()  # mid-upload: parts sent, more to come
        killed_at = time.monotonic()
        try:
            with pytest.raises(Unavailable) as info:
                job.wait(600)
            failed_after_s = time.monotonic() - killed_at
            lease_cm.__exit__(None, None, None)
        finally:
            private_s3.start()
        assert "S3" in info.value.message or "s3" in info.value.message.lower(), info.value.message
        assert client.status(big_ref).blob is None
    # Bounded: the task gave up after its retry budget (a retry is a log line of the worker), and
    # the diff itself ran once (each retry stops at the first S3 call, before any new diff).
    retries = w.log_path.read_text(errors="replace").count("Retry in")
    print(f"S3 killed mid-upload: failed after {failed_after_s:.1f} s, {retries} task retries")
    assert retries <= UNAVAILABLE_RETRIES
    variant = LayerOptions(**GZIP9).variant_key()
    assert 1 <= built_counts(settings).get(f"{big_ref}#{variant}", 0) <= 1 + UNAVAILABLE_RETRIES
    assert failed_after_s < 300, f"the outage took {failed_after_s:.0f} s to surface"
    # Nothing partial is visible, and the same chain completes once S3 is back.
    digests = _blobs_whole(s3, settings.s3_bucket, settings.s3_prefix)
    got = run_chain(settings, chain, timeout=300, **GZIP9)
    assert got.to_dict() == embedded_chain(tmp_path / "embedded", chain, **GZIP9).to_dict()
    assert set(digests) <= {b.digest for b in got.layer_blobs()}
    assert set(_blobs_whole(s3, settings.s3_bucket, settings.s3_prefix)) == {b.digest for b in got.layer_blobs()}
    assert w.alive()
