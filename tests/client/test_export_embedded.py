"""The main job end to end, embedded: CLI and client -> OCI layout that the peers accept."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import services

from blobchain.client import Client
from blobchain.client.cli import main
from blobchain.client.sample import make_sample_chain
from blobchain.config.settings import Settings
from blobchain.layers.errors import (
    InvalidLevel,
    SnapshotNotFound,
    SnapshotOutsideRoots,
    UnknownCompression,
    UnsupportedCompression,
)
from blobchain.layers.identity import chain_ids
from blobchain.storage.leases import MissingLease
from blobchain.workers.errors import NoBlobs


@pytest.fixture
def chain(tmp_path):
    return make_sample_chain(str(tmp_path / "snaps"))


def _blobs(layout) -> dict[str, bytes]:
    d = os.path.join(layout, "blobs", "sha256")
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def _export_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["export", *args, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_live_progress_then_the_summary(tmp_path, chain, capsys, monkeypatch):
    # Regression: with rich loaded on first use, the live display got the lazy wrapper instead
    # of a Console (rich's Live enters it as a context manager) and failed with a TypeError.
    monkeypatch.setenv("BLOBCHAIN_PROGRESS", "1")  # the live display, though stderr is no terminal
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(["export", *chain, "--oci", str(tmp_path / "oci")]) == 0
    c = capsys.readouterr()
    assert "files" in c.err and "built" in c.err
    assert c.out.startswith("chain ") and "diffID" in c.out


def test_export_writes_a_valid_layout_with_chain_ids(tmp_path, chain, capsys):
    out = str(tmp_path / "oci")
    data = _export_json(capsys, *chain, "--oci", out, "--tag", "t1")
    layers = data["layers"]
    assert [layer["snapshot"] for layer in layers] == chain
    diff_ids = [layer["diff_id"] for layer in layers]
    assert [layer["chain_id"] for layer in layers] == chain_ids(diff_ids)
    for layer in layers:
        assert layer["media_type"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        blob = open(os.path.join(out, "blobs", "sha256", layer["digest"][7:]), "rb").read()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
        assert len(blob) == layer["size"]
    # every blob in the layout is whole and named by its digest
    for name, content in _blobs(out).items():
        assert hashlib.sha256(content).hexdigest() == name
    index = json.load(open(os.path.join(out, "index.json")))
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "t1"
    manifest = json.loads(_blobs(out)[index["manifests"][0]["digest"][7:]])
    config = json.loads(_blobs(out)[manifest["config"]["digest"][7:]])
    assert config["rootfs"]["diff_ids"] == diff_ids
    assert [m["digest"] for m in manifest["layers"]] == [layer["digest"] for layer in layers]


def test_export_is_deterministic_across_runs_and_job_counts(tmp_path, chain, capsys):
    a = _export_json(capsys, *chain, "--oci", str(tmp_path / "a"), "--compression", "zstd", "--jobs", "1")
    b = _export_json(capsys, *chain, "--oci", str(tmp_path / "b"), "--compression", "zstd", "--jobs", "2")
    assert a["layers"] == b["layers"]
    assert a["manifest"] == b["manifest"]
    assert _blobs(tmp_path / "a") == _blobs(tmp_path / "b")


def test_rerun_reuses_existing_blobs(tmp_path, chain, capsys):
    out = str(tmp_path / "oci")
    first = _export_json(capsys, *chain, "--oci", out)
    stats = {n: os.stat(os.path.join(out, "blobs", "sha256", n)) for n in _blobs(out)}
    # Remove the snapshots: a rerun must not need to walk them again.
    shutil.rmtree(os.path.dirname(chain[0]))
    second = _export_json(capsys, *chain, "--oci", out)
    assert second == first
    for n, st in stats.items():
        assert os.stat(os.path.join(out, "blobs", "sha256", n)).st_ino == st.st_ino


@pytest.mark.compat
@pytest.mark.parametrize("peer", ["skopeo", "oci-image-tool", "umoci"])
def test_peers_accept_the_layout(tmp_path, chain, capsys, peer):
    tool = services.require_tool(peer, peer)
    out = str(tmp_path / "oci")
    _export_json(capsys, *chain, "--oci", out, "--tag", "demo")
    if peer == "skopeo":
        subprocess.run([tool, "inspect", f"oci:{out}:demo"], check=True, capture_output=True)
        subprocess.run(
            [tool, "copy", f"oci:{out}:demo", f"oci:{tmp_path / 'copy'}:x"],
            check=True,
            capture_output=True,
        )
    elif peer == "oci-image-tool":
        subprocess.run(
            [tool, "validate", "--type", "image", "--ref", "name=demo", out],
            check=True,
            capture_output=True,
        )
    else:
        bundle = tmp_path / "bundle"
        subprocess.run([tool, "unpack", "--image", f"{out}:demo", str(bundle)], check=True, capture_output=True)
        top = chain[-1]
        got = sorted(
            os.path.relpath(os.path.join(d, f), bundle / "rootfs")
            for d, ds, fs in os.walk(bundle / "rootfs")
            for f in fs + ds
        )
        want = sorted(os.path.relpath(os.path.join(d, f), top) for d, ds, fs in os.walk(top) for f in fs + ds)
        assert got == want
        assert open(bundle / "rootfs/etc/app.conf", "rb").read() == open(f"{top}/etc/app.conf", "rb").read()


def _client(tmp_path, **kw) -> Client:
    return Client(Settings(store=str(tmp_path / "store"), **kw), in_process=True)


def test_client_semantics(tmp_path, chain):
    with _client(tmp_path) as client:
        specs = client.register_chain(chain)
        top = specs[-1].ref_id
        with pytest.raises(MissingLease, match="missing lease requirement"):
            client.compute_blob_chain(top)
        with client.lease() as lease:
            with pytest.raises(NoBlobs):
                client.compute_blob_chain(top, create_if_needed=False, lease=lease).wait(60)
            with pytest.raises(UnknownCompression, match="unknown layer compression type"):
                client.compute_blob_chain(top, compression="lz4", lease=lease)
            with pytest.raises(InvalidLevel):
                client.compute_blob_chain(top, level=12, lease=lease)
            gz = client.compute_blob_chain(top, lease=lease).wait(60)
            # a second request reuses the blobs
            again = client.compute_blob_chain(top, compression="zstd", lease=lease).wait(60)
            assert again.layer_blobs() == gz.layer_blobs()
            # force converts the existing blob without walking the snapshot
            shutil.rmtree(os.path.dirname(chain[0]))
            zs = client.compute_blob_chain(top, compression="zstd", force=True, lease=lease).wait(60)
        assert [b.diff_id for b in zs.layer_blobs()] == [b.diff_id for b in gz.layer_blobs()]
        assert all(b.media_type.endswith("+zstd") for b in zs.layer_blobs())
        # chain IDs come from the main (first) blob, as in BuildKit
        assert [r.blob_chain_id for r in zs.records] == [r.blob_chain_id for r in gz.records]
        assert client.status(top).variants[0].compression == "zstd"


def test_bad_snapshots_commit_nothing(tmp_path, chain):
    with _client(tmp_path, roots=(os.path.dirname(chain[0]),)) as client:
        with pytest.raises(SnapshotNotFound):
            client.register_chain([chain[0], str(tmp_path / "missing")])
        outside = tmp_path / "outside"
        outside.mkdir()
        with pytest.raises(SnapshotOutsideRoots):
            client.register_chain([chain[0], str(outside)])
        assert list(client.deps.metadata.list_refs()) == []


def test_windows_layers_refuse_zstd(tmp_path, chain):
    with _client(tmp_path) as client:
        specs = client.register_chain(chain[:1], layer_type="windows")
        with client.lease() as lease:
            with pytest.raises(UnsupportedCompression):
                client.compute_blob_chain(specs[0].ref_id, compression="zstd", lease=lease).wait(60)
            res = client.compute_blob_chain(specs[0].ref_id, lease=lease).wait(60)
        assert res.records[0].blob is not None


def test_cli_errors_have_exit_codes(tmp_path, chain, capsys):
    out = str(tmp_path / "oci")
    assert main(["export", chain[0], "--oci", out, "--compression", "lz4", "-q"]) == 2
    assert "unknown layer compression type" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--oci", out, "-q"]) == 2
    assert main(["export", chain[0], "--oci", out, "--level", "99", "-q"]) == 2
    assert not os.path.exists(os.path.join(out, "index.json"))


@pytest.mark.slow
def test_ctrl_c_leaves_no_partial_blob_and_rerun_continues(tmp_path):
    snap = tmp_path / "big"
    snap.mkdir()
    # Incompressible data at zstd's slowest level, so the export runs long enough to interrupt
    # (16 MiB: ~5 s of it, against the ~0.1 s the interrupt needs; the rerun does it all again).
    with open(snap / "data.bin", "wb") as f:
        for _ in range(16):
            f.write(os.urandom(1 << 20))
    out = tmp_path / "oci"
    cmd = [sys.executable, "-c", "import sys; from blobchain.client.cli import main; sys.exit(main())"]
    args = ["export", str(snap), "--oci", str(out), "--compression", "zstd", "--level", "19", "-q"]
    proc = subprocess.Popen(cmd + args, start_new_session=True)
    ingest = out / ".blobchain" / "ingest"
    deadline = time.time() + 60
    while time.time() < deadline and not (ingest.exists() and any(ingest.iterdir())):
        time.sleep(0.05)
    assert ingest.exists() and any(ingest.iterdir()), "the export never started writing"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal Ctrl-C does
    assert proc.wait(60) == 130
    # Nothing was committed, so the layout the run created is gone again (no empty skeleton);
    # had a layer been committed, it would stay for the rerun.
    assert not ingest.exists() or not any(ingest.iterdir())
    assert not os.path.exists(out / "index.json")
    if out.exists():
        for name, content in _blobs(out).items():
            assert hashlib.sha256(content).hexdigest() == name
    assert subprocess.run(cmd + args).returncode == 0
    assert os.path.exists(out / "index.json")
