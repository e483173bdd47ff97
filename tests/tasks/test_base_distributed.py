"""``submit --base`` in distributed mode: real Celery worker processes, Redis, SeaweedFS.

The client unpacks the base once into a cache inside the snapshot roots (its blobs fetched
into S3 through the normal ingest), the workers diff the first snapshot against that tree,
the base's refs are never built (no ``stats:built`` counter for them), chain IDs continue from
the base's diffIDs, and umoci's unpack of the exported image equals our top snapshot."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import services

from blobchain.client.cli import main
from blobchain.config.settings import Settings
from blobchain.layers.identity import chain_ids
from blobchain.tasks.app import make_app

from .conftest import built_counts, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _json_cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)  # type: ignore[no-any-return]


def _whole_seconds(root: Path) -> None:
    for d, dirs, files in os.walk(root, topdown=False):
        for name in [*dirs, *files]:
            p = os.path.join(d, name)
            t = os.lstat(p).st_mtime_ns // 10**9 * 10**9
            os.utime(p, ns=(t, t), follow_symlinks=False)


def _tree(root: Path) -> dict[str, tuple[int, int, bytes | str | None]]:
    out: dict[str, tuple[int, int, bytes | str | None]] = {}
    for d, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = os.path.join(d, name)
            st = os.lstat(p)
            body: bytes | str | None = None
            if os.path.islink(p):
                body = os.readlink(p)
            elif os.path.isfile(p):
                body = Path(p).read_bytes()
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_mtime_ns, body)
    return out


@services.needs_root("unpacks with owners, as umoci")
def test_submit_on_a_base_with_real_workers(
    settings: Settings, snapdir: Path, workers: Any, tmp_path: Path, capsys, monkeypatch
) -> None:
    umoci = services.require_tool("umoci", "umoci")
    # the base: a two-layer image in a local layout, built embedded
    b0 = tmp_path / "b0"
    (b0 / "etc").mkdir(parents=True)
    (b0 / "etc/os-release").write_text("ID=base\n")
    (b0 / "bin").mkdir()
    (b0 / "bin/sh").write_bytes(os.urandom(32 << 10))
    b1 = tmp_path / "b1"
    subprocess.run(["cp", "-a", f"{b0}/.", str(b1)], check=True)
    (b1 / "etc/motd").write_text("hello\n")
    for s in (b0, b1):
        _whole_seconds(s)
    base = tmp_path / "base-oci"
    embedded = _json_cli(
        capsys,
        "export",
        str(b0),
        str(b1),
        "--oci",
        str(base),
        "--tag",
        "1",
        "-q",
        "--json",
        "--env",
        "FROM=base",
    )
    # our snapshots, inside the workers' snapshot root: the base's top plus changes
    o1 = snapdir / "o1"
    subprocess.run(["cp", "-a", f"{b1}/.", str(o1)], check=True)
    (o1 / "srv").mkdir()
    (o1 / "srv/app").write_bytes(b"app v1")
    (o1 / "etc/motd").unlink()
    o2 = snapdir / "o2"
    subprocess.run(["cp", "-a", f"{o1}/.", str(o2)], check=True)
    (o2 / "srv/app").write_bytes(b"app v2")
    for s in (o1, o2):
        _whole_seconds(s)

    for k, v in settings_env(settings).items():
        monkeypatch.setenv(k, v)
    app = make_app(settings)
    ws = [workers(settings, "ba"), workers(settings, "bb")]
    for w in ws:
        w.wait_ready(app)
    cache = snapdir / "base-cache"
    out = tmp_path / "oci"
    data = _json_cli(
        capsys, "submit", str(o1), str(o2), "--base", f"oci:{base}:1", "--base-cache", str(cache),
        "--oci", str(out), "--tag", "app", "--json", "-q", "--cmd", '["/srv/app"]',
    )  # fmt: skip

    layers = data["layers"]
    base_layers = embedded["layers"]
    assert [la["digest"] for la in layers[:2]] == [la["digest"] for la in base_layers]
    diff_ids = [la["diff_id"] for la in layers]
    assert [la["chain_id"] for la in layers] == chain_ids(diff_ids)
    # the workers built our two refs only: the base's refs were never diffed or recompressed
    built = built_counts(settings)
    ours = {la["ref"] for la in layers[2:]}
    assert {k.split("#")[0] for k in built} == ours, built
    # the base was unpacked once into the cache, its blobs fetched into S3 (the store)
    assert data["base"]["unpacked"] is True
    assert Path(data["base"]["top_snapshot"]).parent == cache
    # the image: config inherits the base's Env, and umoci unpacks our top snapshot
    bundle = tmp_path / "bundle"
    subprocess.run([umoci, "unpack", "--image", f"{out}:app", str(bundle)], check=True, capture_output=True)
    assert _tree(bundle / "rootfs") == _tree(o2)
    index = json.loads((out / "index.json").read_text())
    man = json.loads((out / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    cfg = json.loads((out / "blobs/sha256" / man["config"]["digest"][7:]).read_bytes())
    assert cfg["config"]["Env"] == ["FROM=base"] and cfg["config"]["Cmd"] == ["/srv/app"]
    assert cfg["rootfs"]["diff_ids"] == diff_ids
    assert all(w.alive() for w in ws)
