"""A corrupt blob is never reused or exported (issue 6, defect 1), through the real CLI and its
process pool: reruns rebuild it, ``blobchain verify`` reports it, conversions of it give a
named error or a rebuild, never a PicklingError."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from services import require_tool

from blobchain.client.cli import main
from blobchain.layers.records import Compression, LayerBlob, RefSpec
from blobchain.storage.content.local import LocalContentStore, _fingerprint
from blobchain.storage.metadata.sqlite import SqliteMetadataStore


def _snapshots(tmp_path: Path) -> list[str]:
    s0 = tmp_path / "snaps" / "s0"
    s1 = tmp_path / "snaps" / "s1"
    for s in (s0, s1):
        (s / "etc").mkdir(parents=True)
        (s / "etc" / "hostname").write_text(f"{s.name}\n")
    (s1 / "data").mkdir()
    # Random bytes: the layer is big enough to hold a flipped byte far from both ends.
    (s1 / "data" / "blob.bin").write_bytes(os.urandom(2 << 20))
    return [str(s0), str(s1)]


def _export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(["export", *args, "--json", "-q"])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if rc == 0 else {})


def _flip(path: Path, at: int = 1000) -> None:
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    path.chmod(0o444)


def _bit_rot(layout: Path, digest: str, at: int = 1000) -> None:
    """Damage that leaves no trace in the file's metadata (the disk flipped a bit): the store's
    recorded fingerprint is made to match again, so only a full read can tell."""
    path = layout / "blobs" / "sha256" / digest[7:]
    _flip(path, at)
    store = LocalContentStore(layout)
    store._labels.set_fingerprint(digest, _fingerprint(path.stat()))
    store.close()


def _sha(path: Path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _quarantined(layout: Path) -> list[str]:
    q = layout / ".blobchain" / "quarantine"
    return sorted(p.name for p in q.iterdir() if not p.name.endswith(".reason")) if q.exists() else []


def test_rerun_rebuilds_a_damaged_layer_instead_of_exporting_it(tmp_path, capsys):
    snaps = _snapshots(tmp_path)
    out = tmp_path / "oci"
    rc, first = _export(capsys, *snaps, "--oci", str(out), "--tag", "v1")
    assert rc == 0
    digest = first["layers"][1]["digest"]
    blob = out / "blobs" / "sha256" / digest[7:]
    _flip(blob)
    assert _sha(blob) != digest
    # Rerun (a new tag on the same layers): rc 0, and what the layout holds is the good blob.
    rc, second = _export(capsys, *snaps, "--oci", str(out), "--tag", "v2")
    assert rc == 0
    assert second["layers"] == first["layers"]
    assert _sha(blob) == digest
    # The bad copy is kept aside as evidence, not deleted.
    (bad,) = _quarantined(out)
    assert bad.startswith(digest[7:])
    assert _sha(out / ".blobchain" / "quarantine" / bad) != digest
    # And the whole layout verifies.
    capsys.readouterr()
    assert main(["verify", "--oci", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["corrupt"] == 0 and report["ok"] == report["checked"] >= 4
    # What skopeo reads is whole again (it re-hashes every layer it copies).
    skopeo = require_tool("skopeo", "skopeo")
    subprocess.run(
        [skopeo, "copy", f"oci:{out}:v2", f"dir:{tmp_path / 'copied'}"], check=True, capture_output=True
    )


def test_damaged_copy_in_another_layout_is_replaced(tmp_path, capsys):
    snaps = _snapshots(tmp_path)
    store, out = tmp_path / "store", tmp_path / "oci"
    rc, first = _export(capsys, *snaps, "--store", str(store), "--oci", str(out))
    assert rc == 0
    digest = first["layers"][1]["digest"]
    _flip(out / "blobs" / "sha256" / digest[7:])
    rc, _ = _export(capsys, *snaps, "--store", str(store), "--oci", str(out))
    assert rc == 0
    assert _sha(out / "blobs" / "sha256" / digest[7:]) == digest
    assert [q[:64] for q in _quarantined(out)] == [digest[7:]]
    assert _quarantined(store) == []


def test_damaged_manifest_in_the_layout_is_rewritten(tmp_path, capsys):
    snaps = _snapshots(tmp_path)
    out = tmp_path / "oci"
    rc, first = _export(capsys, *snaps, "--oci", str(out))
    assert rc == 0
    manifest = out / "blobs" / "sha256" / first["manifest"][7:]
    _flip(manifest, at=10)
    rc, _ = _export(capsys, *snaps, "--oci", str(out))
    assert rc == 0
    assert _sha(manifest) == first["manifest"]


def test_verify_reports_and_repair_marks_for_rebuild(tmp_path, capsys):
    snaps = _snapshots(tmp_path)
    out = tmp_path / "oci"
    rc, first = _export(capsys, *snaps, "--oci", str(out))
    assert rc == 0
    digest, ref = first["layers"][1]["digest"], first["layers"][1]["ref"]
    _bit_rot(out, digest)
    capsys.readouterr()
    # Without --repair: reported (exit 7), nothing moved or marked.
    assert main(["verify", "--oci", str(out), "--json"]) == 7
    report = json.loads(capsys.readouterr().out)
    (bad,) = [b for b in report["blobs"] if b["status"] != "ok"]
    assert bad["digest"] == digest and bad["status"] == "corrupt" and bad["refs"] == [ref]
    assert report["corrupt"] == 1 and not report["repaired"]
    assert _quarantined(out) == []
    assert main(["verify", "--oci", str(out)]) == 7
    human = capsys.readouterr()
    assert f"corrupt  {digest}" in human.err and "1 corrupt" in human.out
    # --repair: quarantined, the ref's record marked.
    assert main(["verify", "--oci", str(out), "--repair", "--json"]) == 7
    report = json.loads(capsys.readouterr().out)
    assert report["repaired"] and report["blobs"][0]["status"] in ("ok", "corrupt")
    assert [q[:64] for q in _quarantined(out)] == [digest[7:]]
    meta = SqliteMetadataStore(out / ".blobchain" / "metadata.db")
    rec = meta.get(ref)
    assert rec is not None and rec.damaged == (digest,)
    meta.close()
    # The next export rebuilds it from the snapshot and clears the mark.
    rc, again = _export(capsys, *snaps, "--oci", str(out))
    assert rc == 0 and again["layers"] == first["layers"]
    assert _sha(out / "blobs" / "sha256" / digest[7:]) == digest
    meta = SqliteMetadataStore(out / ".blobchain" / "metadata.db")
    rec = meta.get(ref)
    assert rec is not None and rec.damaged == ()
    meta.close()
    capsys.readouterr()
    assert main(["verify", "--oci", str(out)]) == 0


def test_verify_of_a_missing_layout_is_not_found(tmp_path, capsys):
    assert main(["verify", "--oci", str(tmp_path / "nope")]) == 3
    assert "is not an OCI layout" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "nope").exists()


def test_converting_a_rotten_blob_rebuilds_it_not_a_pickling_error(tmp_path, capsys):
    snaps = _snapshots(tmp_path)
    out = tmp_path / "oci"
    rc, first = _export(capsys, *snaps, "--oci", str(out))
    assert rc == 0
    digest = first["layers"][1]["digest"]
    _bit_rot(out, digest, at=5000)  # inside the deflate stream: zlib-ng fails mid-way
    rc, conv = _export(capsys, *snaps, "--oci", str(out), "-c", "zstd")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "PicklingError" not in err
    assert conv["layers"][1]["diff_id"] == first["layers"][1]["diff_id"]
    assert conv["layers"][1]["media_type"].endswith("zstd")
    assert [q[:64] for q in _quarantined(out)] == [digest[7:]]
    # The gzip blob comes back on the next gzip request.
    rc, again = _export(capsys, *snaps, "--oci", str(out))
    assert rc == 0 and again["layers"] == first["layers"]
    assert _sha(out / "blobs" / "sha256" / digest[7:]) == digest


def test_an_undecodable_stored_blob_is_a_named_error(tmp_path, capsys):
    """A blob that hashes to its name but is not the gzip its record says: corrupt_blob (4)."""
    snaps = _snapshots(tmp_path)[:1]
    out = tmp_path / "oci"
    store = LocalContentStore(out)
    with store.ingest("junk") as ing:
        ing.write(os.urandom(50_000))
        info = ing.commit()
    store.close()
    from blobchain.client.api import chain_specs

    (spec,) = chain_specs(snaps)
    meta = SqliteMetadataStore(out / ".blobchain" / "metadata.db")
    meta.register(RefSpec(spec.ref_id, spec.snapshot))
    diff_id = "sha256:" + "0" * 64
    gzip = Compression.GZIP
    meta.set_blob(
        spec.ref_id,
        LayerBlob(info.digest, info.size, gzip.media_type(), diff_id, gzip, variant="gzip-5"),
    )
    meta.close()
    capsys.readouterr()
    rc = main(["export", *snaps, "--oci", str(out), "-c", "zstd", "-q"])
    err = capsys.readouterr().err
    assert rc == 4, err
    assert "corrupt_blob" in err and "does not decode as gzip" in err
    assert "Traceback" not in err and "PicklingError" not in err
    # Stored that way, not damaged: left in place.
    assert _quarantined(out) == []
