"""``--base REGISTRY/REPO:TAG`` against a real docker-registry: lazy blobs.

- built on a registry base and pushed back to the same registry: the base's layers are mounted
  (or found present), never downloaded: the registry's access log has no GET of them;
- exported to a local layout: each base blob is downloaded exactly once (the unpack fetches it
  into the store, the export finds it there);
- pushed to another registry: each is downloaded once, then uploaded;
- skopeo reads the pushed image back, and umoci's unpack of it equals our top snapshot.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import fsgen
import pytest
import regservice
import services

from blobchain.client.cli import main

pytestmark = [pytest.mark.integration]
needs_root = services.needs_root("unpacks with owners, as umoci")


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)


def _whole_seconds(root: Path) -> None:
    for d, dirs, files in os.walk(root, topdown=False):
        for name in [*dirs, *files]:
            p = os.path.join(d, name)
            t = os.lstat(p).st_mtime_ns // 10**9 * 10**9
            os.utime(p, ns=(t, t), follow_symlinks=False)


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
    return dst


def comparable(root: Path) -> dict[bytes, tuple[object, ...]]:
    return {row[0]: row[1:] for row in fsgen.listing(root) if row[0] != b""}


def blob_gets(reg: regservice.RegistryProcess, digest: str) -> int:
    """GETs of ``digest`` from any repository, as the registry's access log shows them."""
    return len(re.findall(rf'"GET /v2/[^ ]+/blobs/{re.escape(digest)} HTTP', reg.log()))


def _umoci_rootfs(image: str, tmp: Path, name: str) -> Path:
    umoci = services.require_tool("umoci", "umoci")
    bundle = tmp / name
    subprocess.run([umoci, "unpack", "--image", image, str(bundle)], check=True, capture_output=True)
    return bundle / "rootfs"


@pytest.fixture
def base_on_registry(tmp_path: Path, plain_registry: regservice.RegistryProcess, capsys) -> dict:
    """A two-layer base pushed to the plain registry as base/os:1; its top state unpacked by
    umoci; our two snapshots on top of it."""
    s0 = fsgen.build(tmp_path / "b0", fsgen.chain()[0])
    s1 = _copy(s0, tmp_path / "b1")
    (s1 / "usr/bin/tool").write_bytes(os.urandom(64 << 10))  # incompressible: a real blob size
    for s in (s0, s1):
        _whole_seconds(s)
    layout = tmp_path / "base-oci"
    _cli(
        capsys,
        "export",
        str(s0),
        str(s1),
        "--oci",
        str(layout),
        "--tag",
        "1",
        "-q",
        "--json",
        "--cmd",
        '["/usr/bin/tool"]',
    )
    ref = f"{plain_registry.address}/base/os:1"
    _cli(capsys, "push", f"{layout}:1", ref, "--insecure", "--json", "-q")
    index = json.loads((layout / "index.json").read_text())
    man = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    top = _umoci_rootfs(f"{layout}:1", tmp_path, "base-bundle")
    o1 = _copy(top, tmp_path / "o1")
    (o1 / "app").mkdir()
    (o1 / "app/run").write_bytes(b"run v1")
    o2 = _copy(o1, tmp_path / "o2")
    (o2 / "app/run").write_bytes(b"run v2")
    os.unlink(o2 / "usr/lib/libx.so")
    for s in (o1, o2):
        _whole_seconds(s)
    return {
        "ref": ref,
        "top": top,
        "ours": [o1, o2],
        "layers": [la["digest"] for la in man["layers"]],
        "config": man["config"]["digest"],
    }


@needs_root
def test_push_back_to_the_same_registry_never_downloads_the_base_layers(
    tmp_path: Path, plain_registry: regservice.RegistryProcess, base_on_registry: dict, capsys, monkeypatch
) -> None:
    b = base_on_registry
    store = tmp_path / "store"
    monkeypatch.setenv("BLOBCHAIN_STORE", str(store))
    target = f"{plain_registry.address}/team/app:v1"
    before = {d: blob_gets(plain_registry, d) for d in b["layers"]}
    data = _cli(
        capsys, "submit", *map(str, b["ours"]), "--base", b["ref"], "--base-snapshot", str(b["top"]),
        "--insecure", "--push", target, "--json", "-q", "--cmd", '["/app/run"]',
    )  # fmt: skip
    # nothing of the base was downloaded: not by the push, not by anything else
    assert {d: blob_gets(plain_registry, d) for d in b["layers"]} == before
    assert data["base"]["fetched"] == [] and data["base"]["unpacked"] is False
    for d in b["layers"]:
        assert not (store / "blobs/sha256" / d[7:]).exists()
    actions = {x["digest"]: x for x in data["pushed"]["blobs"]}
    for d in b["layers"]:
        assert actions[d]["action"] == "mounted" and actions[d]["mounted_from"] == "base/os"
    assert [la["digest"] for la in data["layers"][:2]] == b["layers"]

    # the registry serves the image: skopeo's digest, and umoci's unpack equals our top
    skopeo = services.require_tool("skopeo", "skopeo")
    info = subprocess.run(
        [skopeo, "inspect", "--tls-verify=false", f"docker://{target}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["Digest"] == data["pushed"]["digest"]
    copy = tmp_path / "copy"
    subprocess.run(
        [skopeo, "copy", "--src-tls-verify=false", f"docker://{target}", f"oci:{copy}:v1"],
        check=True,
        capture_output=True,
    )
    assert comparable(_umoci_rootfs(f"{copy}:v1", tmp_path, "bundle")) == comparable(b["ours"][-1])

    # pushed again: every blob present (HEAD hits), still no base download (skopeo's copy
    # above downloaded them, so count from here)
    before = {d: blob_gets(plain_registry, d) for d in b["layers"]}
    again = _cli(
        capsys, "submit", *map(str, b["ours"]), "--base", b["ref"], "--base-snapshot", str(b["top"]),
        "--insecure", "--push", target, "--json", "-q", "--cmd", '["/app/run"]',
    )  # fmt: skip
    assert {x["action"] for x in again["pushed"]["blobs"]} == {"exists"}
    assert again["pushed"]["digest"] == data["pushed"]["digest"]
    assert {d: blob_gets(plain_registry, d) for d in b["layers"]} == before


@needs_root
def test_export_to_a_layout_downloads_each_base_blob_once(
    tmp_path: Path, plain_registry: regservice.RegistryProcess, base_on_registry: dict, capsys
) -> None:
    b = base_on_registry
    before = {d: blob_gets(plain_registry, d) for d in b["layers"]}
    out = tmp_path / "oci"
    data = _cli(
        capsys, "export", *map(str, b["ours"]), "--oci", str(out), "--tag", "app", "--base", b["ref"],
        "--insecure", "--json", "-q",
    )  # fmt: skip
    # no base snapshot given: unpacked from the registry into the cache, one GET per layer,
    # and the export into the layout found them in the store
    assert data["base"]["unpacked"] is True
    assert {d: blob_gets(plain_registry, d) - before[d] for d in b["layers"]} == dict.fromkeys(b["layers"], 1)
    assert sorted(data["base"]["fetched"]) == sorted(b["layers"])
    assert comparable(Path(data["base"]["top_snapshot"])) == comparable(b["top"])
    assert comparable(_umoci_rootfs(f"{out}:app", tmp_path, "bundle")) == comparable(b["ours"][-1])
    # again: the cache and the store have everything, nothing is downloaded
    again = _cli(
        capsys, "export", *map(str, b["ours"]), "--oci", str(out), "--tag", "app", "--base", b["ref"],
        "--insecure", "--json", "-q",
    )  # fmt: skip
    assert again["base"]["unpacked"] is False and again["base"]["fetched"] == []
    assert {d: blob_gets(plain_registry, d) - before[d] for d in b["layers"]} == dict.fromkeys(b["layers"], 1)
    assert again["manifest"] == data["manifest"]


@needs_root
def test_push_to_another_registry_downloads_each_base_blob_once_then_uploads(
    tmp_path: Path, plain_registry: regservice.RegistryProcess, base_on_registry: dict, capsys, monkeypatch
) -> None:
    b = base_on_registry
    monkeypatch.setenv("BLOBCHAIN_STORE", str(tmp_path / "store"))
    before = {d: blob_gets(plain_registry, d) for d in b["layers"]}
    with regservice.registry(tmp_path / "other") as other:
        target = f"{other.address}/elsewhere/app:v1"
        data = _cli(
            capsys, "submit", *map(str, b["ours"]), "--base", b["ref"], "--base-snapshot", str(b["top"]),
            "--insecure", "--push", target, "--json", "-q",
        )  # fmt: skip
        actions = {x["digest"]: x["action"] for x in data["pushed"]["blobs"]}
        assert [actions[d] for d in b["layers"]] == ["uploaded", "uploaded"]
        assert all(other.has_blob(d) for d in b["layers"])
    assert {d: blob_gets(plain_registry, d) - before[d] for d in b["layers"]} == dict.fromkeys(b["layers"], 1)
    assert sorted(data["base"]["fetched"]) == sorted(b["layers"])


@needs_root
def test_a_download_torn_mid_blob_resumes_from_what_arrived(
    tmp_path: Path, plain_registry: regservice.RegistryProcess, base_on_registry: dict, capsys
) -> None:
    b = base_on_registry
    # the config (about 1 KiB) and the small first layer pass; the cut falls inside the
    # second layer (64 KiB of random bytes)
    proxy = regservice.FaultProxy(plain_registry.port, drop_after_blob_bytes=24 << 10)
    try:
        ref = f"{proxy.address}/base/os:1"
        out = tmp_path / "oci"
        data = _cli(
            capsys, "export", *map(str, b["ours"]), "--oci", str(out), "--tag", "app", "--base", ref,
            "--insecure", "--json", "-q",
        )  # fmt: skip
    finally:
        proxy.close()
    assert proxy.drops == 1 and data["base"]["resumed"] == 1
    assert sorted(data["base"]["fetched"]) == sorted(b["layers"])
    # the resumed blob is whole and intact (the ingest checked its digest), and so is the image
    rc = main(["verify", "--store", str(out)])
    assert rc == 0
    assert comparable(_umoci_rootfs(f"{out}:app", tmp_path, "bundle")) == comparable(b["ours"][-1])


@needs_root
def test_unpack_straight_from_a_registry(
    tmp_path: Path, plain_registry: regservice.RegistryProcess, base_on_registry: dict, capsys
) -> None:
    b = base_on_registry
    before = {d: blob_gets(plain_registry, d) for d in b["layers"]}
    out = tmp_path / "u"
    data = _cli(capsys, "unpack", f"docker://{b['ref']}", str(out), "--insecure", "--json")
    assert data["layers"] == 2
    assert comparable(out) == comparable(b["top"])  # what umoci unpacked from the layout
    assert {d: blob_gets(plain_registry, d) - before[d] for d in b["layers"]} == dict.fromkeys(b["layers"], 1)
    capsys.readouterr()
    assert main(["unpack", "docker://Not A Ref", str(tmp_path / "x")]) == 2
    assert "invalid_image_reference" in capsys.readouterr().err
