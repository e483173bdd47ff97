"""Distributed push: a chain built by two worker processes into SeaweedFS, pushed straight from
S3 to a real registry. The client holds no blob on local disk (no blob-sized file is open in it,
none appears in the temp dir), and a dropped connection resumes with a ranged read from S3."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from blobchain.client.api import Client
from blobchain.config.settings import Settings
from blobchain.layers.imageconfig import ImageOptions
from blobchain.registry import TransportOptions
from blobchain.tasks.app import make_app

from .conftest import run_chain

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "registry"))
import regservice
from services import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class _DiskWatch:
    """Samples, while a push runs: regular files this process has open, and files that appear
    at the top of the temp dir; keeps the largest size seen of each."""

    def __init__(self) -> None:
        self.largest_open = 0
        self.largest_tmp = 0
        self._stop = threading.Event()
        self._before = set(os.listdir(tempfile.gettempdir()))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        tmp = tempfile.gettempdir()
        while not self._stop.is_set():
            for f in me.open_files():
                with contextlib.suppress(OSError):
                    self.largest_open = max(self.largest_open, os.stat(f.path).st_size)
            for name in set(os.listdir(tmp)) - self._before:
                try:
                    st = os.stat(os.path.join(tmp, name))
                except OSError:
                    continue
                if not os.path.isdir(os.path.join(tmp, name)):
                    self.largest_tmp = max(self.largest_tmp, st.st_size)
            time.sleep(0.02)

    def __enter__(self) -> _DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_chain_built_by_two_workers_is_pushed_from_s3_without_a_local_copy(
    settings: Settings, snapdir: Path, workers: Any, tmp_path: Path
) -> None:
    snaps = []
    prev: Path | None = None
    for i in range(3):
        snap = snapdir / f"s{i}"
        snap.mkdir()
        if prev is not None:
            for p in prev.iterdir():
                os.link(p, snap / p.name)
        (snap / f"layer{i}.bin").write_bytes(os.urandom(6 << 20))
        snaps.append(snap)
        prev = snap
    app = make_app(settings)
    ws = [workers(settings, "pa"), workers(settings, "pb")]
    for w in ws:
        w.wait_ready(app)
    result = run_chain(settings, snaps, compression="uncompressed")
    smallest = min(b.size for b in result.layer_blobs())
    assert smallest > 6 << 20

    image = ImageOptions(cmd=("/bin/true",))
    with regservice.registry(tmp_path / "registry") as reg:
        proxy = regservice.FaultProxy(reg.port, drop_before_patch=4)
        opts = TransportOptions(insecure=True, monolithic_max=1 << 20, chunk_size=2 << 20, jobs=2)
        target = f"{proxy.address}/dist/app:v1"
        try:
            with Client(settings) as client, _DiskWatch() as watch:
                res = client.push(result, target, image=image, options=opts)
            with Client(settings) as client:
                again = client.push(result, target, image=image, options=opts)
        finally:
            proxy.close()

        # no blob-sized file: nothing the client had open, nothing new in the temp dir
        assert watch.largest_open < smallest and watch.largest_tmp < smallest
        assert proxy.drops == 1 and sum(b.resumed for b in res.blobs) == 1
        assert {b.action for b in again.blobs} == {"exists"} and again.sent == 0
        # the same manifest digest as an export of the same chain with the same options
        with Client(settings) as client:
            exported = client.export(result, tmp_path / "oci", tag="v1", image=image)
        assert res.digest == exported.digest
        require_tool("skopeo", "skopeo")
        info = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{reg.address}/dist/app:v1"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(info.stdout)["Digest"] == res.digest
    assert all(w.alive() for w in ws)
