"""Distributed integrity (issue 6, defect 1): an S3 object overwritten with other bytes is found on
the next ``submit`` (with or without ``--oci``), quarantined under ``quarantine/`` and rebuilt by
a real worker; ``blobchain verify`` checks the bucket."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import fsgen
import pytest

from blobchain.config.settings import Settings
from blobchain.tasks.app import make_app

from .conftest import VENV_BIN, clean_env, s3_get, s3_keys

pytestmark = pytest.mark.integration


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "blobchain"), *args],
        capture_output=True,
        text=True,
        env=clean_env(settings),
        timeout=300,
    )


def _submit(settings: Settings, paths: list[Path], *extra: str) -> dict[str, Any]:
    r = _cli(settings, "submit", *map(str, paths), "--quiet", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_an_overwritten_s3_blob_is_quarantined_and_rebuilt(
    settings: Settings, snapdir: Path, workers: Any, s3_client: Any, tmp_path: Path
) -> None:
    s0 = fsgen.build(snapdir / "s0", {b"etc/hostname": fsgen.File(b"base\n")})
    s1 = fsgen.build(snapdir / "s1", {b"etc/hostname": fsgen.File(b"app\n"), b"app/bin": fsgen.File(b"x" * 70_000)})
    w = workers(settings, "integrity")
    w.wait_ready(make_app(settings))
    first = _submit(settings, [s0, s1])
    digest = first["layers"][1]["digest"]
    bucket, key = settings.s3_bucket, f"{settings.s3_prefix}blobs/sha256/{digest[7:]}"
    quarantine = f"{settings.s3_prefix}quarantine/sha256/"

    def intact() -> bool:
        return hashlib.sha256(s3_get(s3_client, bucket, key)).hexdigest() == digest[7:]

    # Another client overwrites the object: without --oci, submit must not answer from it.
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"not the layer")
    again = _submit(settings, [s0, s1])
    assert again["layers"] == first["layers"]
    assert intact()
    (bad,) = s3_keys(s3_client, bucket, quarantine)
    assert bad.startswith(quarantine + digest[7:]) and s3_get(s3_client, bucket, bad) == b"not the layer"

    # verify checks the bucket: all intact now.
    r = _cli(settings, "verify", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["corrupt"] == 0 and report["checked"] >= 2
    assert any(q.endswith(bad) for q in report["quarantine"])

    # Damaged again: verify reports it (exit 7) and changes nothing; --repair quarantines it and
    # marks the ref; the next submit --oci rebuilds it and writes a layout that verifies.
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"damaged again")
    r = _cli(settings, "verify", "--json")
    assert r.returncode == 7, r.stderr
    (entry,) = [b for b in json.loads(r.stdout)["blobs"] if b["status"] != "ok"]
    assert entry["digest"] == digest and entry["refs"] == [first["layers"][1]["ref"]]
    assert s3_get(s3_client, bucket, key) == b"damaged again"
    r = _cli(settings, "verify", "--repair")
    assert r.returncode == 7 and "quarantined" in r.stdout, r.stdout + r.stderr
    assert len(s3_keys(s3_client, bucket, quarantine)) == 2
    status = _cli(settings, "status", first["layers"][1]["ref"], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["damaged"] == [digest]
    oci = tmp_path / "oci"
    third = _submit(settings, [s0, s1], "--oci", str(oci))
    assert third["layers"] == first["layers"]
    assert intact()
    status = _cli(settings, "status", first["layers"][1]["ref"], "--json")
    assert "damaged" not in json.loads(status.stdout)
    local = _cli(settings, "verify", "--oci", str(oci))
    assert local.returncode == 0, local.stdout + local.stderr
    assert w.alive()
