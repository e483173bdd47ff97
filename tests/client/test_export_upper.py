"""``blobchain export --upper``: overlay upper dirs give the same top layer as full rootfs states,
without walking the parents."""

from __future__ import annotations

import io
import json
import os
import tarfile

import services
from fsgen import build, overlay_opaque

from blobchain.client.cli import main

pytestmark = services.needs_root("whiteout devices and trusted.* xattrs")


def _export(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["export", *args, "--json", "-q", "--compression", "uncompressed"]) == 0
    return json.loads(capsys.readouterr().out)


def _names(layout, digest) -> list[str]:
    with open(os.path.join(layout, "blobs", "sha256", digest[7:]), "rb") as f:
        return tarfile.open(fileobj=io.BytesIO(f.read())).getnames()


def test_upper_chain_matches_rootfs_chain_on_the_top_layer(tmp_path, capsys):
    uppers, upper, merged_lower, merged = overlay_opaque()
    dirs = [str(build(tmp_path / f"u{i}", spec)) for i, spec in enumerate([*uppers, upper])]
    up = _export(capsys, *dirs, "--upper", "--oci", str(tmp_path / "oci-upper"))
    full = [str(build(tmp_path / "m0", merged_lower)), str(build(tmp_path / "m1", merged))]
    ref = _export(capsys, *full, "--oci", str(tmp_path / "oci-full"))
    # The top layer (merged parents -> merged result) is the same changeset either way.
    assert up["layers"][-1]["diff_id"] == ref["layers"][-1]["diff_id"]
    names = _names(str(tmp_path / "oci-upper"), up["layers"][-1]["digest"])
    assert "a/.wh.gone" in names and "a/.wh.new1" in names
    assert "a/.wh.never" not in names  # a whiteout of nothing is dropped
    assert not any(n.endswith(".wh..wh..opq") for n in names)  # explicit whiteouts, as containerd
    assert "o/y/" not in names and "o/.wh.y" in names  # opaque dir hides the lower's children
    # Chain IDs follow from the layers' diffIDs.
    assert len({layer["chain_id"] for layer in up["layers"]}) == len(dirs)
