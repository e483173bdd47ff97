"""Multi-member gzip layers read by the real consumers.

The default gzip strategy (``libdeflate+stored``) writes one gzip member per 1 MiB block
(docs/compression.md). Every consumer must read all members: umoci unpacks the rootfs, skopeo
copies with ``--dest-decompress`` (containers/image's gzip reader), podman pulls the layout
into its store, and containerd imports and unpacks it, which checks each layer's uncompressed
digest against the config's diffIDs (a reader stopping after one member would fail there).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

import pytest
import services

from blobchain.client.cli import main
from blobchain.layers.compress import GZIP_STRATEGY
from blobchain.layers.identity import chain_id

from .containerd import SNAPSHOTTER, Containerd

pytestmark = [pytest.mark.compat]

MIB = 1 << 20


def _members(blob: bytes) -> int:
    n, rest = 0, blob
    while rest:
        d = zlib.decompressobj(31)
        d.decompress(rest)
        assert d.eof, "truncated member"
        n += 1
        rest = d.unused_data
    return n


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("l", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("d",)
            else:
                out[rel] = ("f", hashlib.sha256(Path(p).read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[dict[str, object]]]:
    """Two snapshots whose layers are several members each: text (deflated members), random
    bytes (stored members), small files; the second changes, adds and deletes."""
    assert GZIP_STRATEGY == "libdeflate+stored"
    root = tmp_path_factory.mktemp("members")
    rnd = random.Random(7)
    words = [rnd.randbytes(rnd.randint(2, 8)).hex().encode() for _ in range(500)]
    s0 = root / "s0"
    (s0 / "usr/share/doc").mkdir(parents=True)
    (s0 / "opt/data").mkdir(parents=True)
    (s0 / "usr/share/doc/text").write_bytes(b" ".join(rnd.choices(words, k=600_000))[: 3 * MIB + 12345])
    (s0 / "opt/data/weights.bin").write_bytes(rnd.randbytes(2 * MIB + 777))
    for i in range(50):
        (s0 / "usr/share/doc" / f"f{i}").write_bytes(rnd.randbytes(100) * (i + 1))
    (s0 / "link").symlink_to("usr/share/doc/text")
    s1 = root / "s1"
    shutil.copytree(s0, s1, symlinks=True)
    (s1 / "opt/data/weights.bin").write_bytes(rnd.randbytes(MIB + 5) + bytes(MIB))
    (s1 / "usr/share/doc/f3").unlink()
    (s1 / "new.txt").write_bytes(b" ".join(rnd.choices(words, k=300_000)))
    out = root / "oci"
    rc = main(["export", str(s0), str(s1), "--oci", str(out), "--tag", "t", "--json", "--quiet"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads(_blob(out, index["manifests"][0]["digest"]))
    for layer in manifest["layers"]:
        assert layer["mediaType"].endswith("+gzip")
        assert _members(_blob(out, layer["digest"])) >= 3  # really multi-member
    return out, [s0, s1], manifest["layers"]


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def test_umoci_unpacks_every_member(layout: tuple[Path, list[Path], list[dict[str, object]]], tmp_path: Path) -> None:
    out, snaps, _ = layout
    umoci = services.require_tool("umoci", "umoci")
    bundle = tmp_path / "bundle"
    subprocess.run([umoci, "unpack", "--rootless", "--image", f"{out}:t", str(bundle)], check=True, capture_output=True)
    assert _tree(bundle / "rootfs") == _tree(snaps[-1])


def test_skopeo_decompresses_every_member(
    layout: tuple[Path, list[Path], list[dict[str, object]]], tmp_path: Path
) -> None:
    out, _, layers = layout
    skopeo = services.require_tool("skopeo", "skopeo")
    dest = tmp_path / "dir"
    subprocess.run(
        [skopeo, "copy", "--dest-decompress", f"oci:{out}:t", f"dir:{dest}"], check=True, capture_output=True
    )
    config = json.loads(_blob(out, json.loads((dest / "manifest.json").read_text())["config"]["digest"]))
    manifest = json.loads((dest / "manifest.json").read_text())
    got = []
    for layer in manifest["layers"]:
        data = (dest / layer["digest"].split(":", 1)[1]).read_bytes()
        got.append("sha256:" + hashlib.sha256(data).hexdigest())
    # each decompressed layer is the whole tar: its digest is the diffID
    assert got == config["rootfs"]["diff_ids"]
    assert len(got) == len(layers)


def test_podman_pulls_the_layout(layout: tuple[Path, list[Path], list[dict[str, object]]], tmp_path: Path) -> None:
    out, snaps, _ = layout
    podman = services.require_tool("podman", "podman")
    run = tempfile.mkdtemp(prefix="bcpm-")  # podman wants a short runroot
    store = ["--root", str(tmp_path / "pm-root"), "--runroot", run, "--storage-driver", "vfs"]
    env = {**os.environ, "XDG_RUNTIME_DIR": run}
    try:
        r = subprocess.run([podman, *store, "pull", f"oci:{out}:t"], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        image = r.stdout.strip().splitlines()[-1]
        r = subprocess.run([podman, *store, "image", "mount", image], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert _tree(Path(r.stdout.strip())) == _tree(snaps[-1])
    finally:
        subprocess.run([podman, *store, "image", "unmount", "--all"], capture_output=True, env=env)
        subprocess.run([podman, *store, "rmi", "--all", "--force"], capture_output=True, env=env)
        shutil.rmtree(run, ignore_errors=True)


def test_containerd_imports_and_unpacks(
    layout: tuple[Path, list[Path], list[dict[str, object]]], tmp_path: Path, ctrd: Containerd
) -> None:
    out, _, _ = layout
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(out / name, arcname=name)
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads(_blob(out, index["manifests"][0]["digest"]))
    diff_ids = json.loads(_blob(out, manifest["config"]["digest"]))["rootfs"]["diff_ids"]
    top = chain_id(diff_ids)
    assert top.split(":", 1)[1] not in ctrd.snapshots("ls").decode()
    # import unpacks into the snapshotter, decompressing each layer and checking its digest
    # against the diffID; the top snapshot is named by the chain ID
    ctrd.ctr("images", "import", "--snapshotter", SNAPSHOTTER, "--base-name", "bc/members", "--digests", str(archive))
    assert "bc/members" in ctrd.ctr("images", "ls", "-q").decode()
    assert top in ctrd.snapshots("ls").decode()
