"""Issue 6 part B, the output layout: tags, file modes, the export's media-type scheme, a store
or layout overlapping a snapshot, a layout that cannot take an image, and what a failed export
leaves. Each test fails on the code before the fix."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import services
from hypothesis import given, settings
from hypothesis import strategies as st

from blobchain.client import Client
from blobchain.client.cli import main
from blobchain.client.export import export_layout
from blobchain.client.sample import make_sample_chain
from blobchain.config.settings import Settings
from blobchain.layers.errors import FailedPrecondition, InvalidTag
from blobchain.layers.oci import REF_NAME, check_tag, index_with
from blobchain.layers.records import Descriptor

OCI_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
def chain(tmp_path: Path) -> list[str]:
    return make_sample_chain(str(tmp_path / "snaps"))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(err: str, code: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error ({code}): "), err
    assert "Traceback" not in err


def _index(out: str | Path) -> dict:
    return json.loads(Path(out, "index.json").read_bytes())


def _tags(out: str | Path) -> dict[str, str]:
    return {m["annotations"][REF_NAME]: m["digest"] for m in _index(out)["manifests"] if "annotations" in m}


def _manifest(out: str | Path, digest: str) -> dict:
    return json.loads(Path(out, "blobs", "sha256", digest[7:]).read_bytes())


def _tree(path: Path) -> dict[str, bytes | None]:
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
        if ".blobchain" not in p.parts
    }


# --- defect 2: tags --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag", ["v1", "latest", "1.0.0", "a/b", "a/b:c", "x--y", "v1.0+build.5", "my_tag", "a@b", "A9"]
)
def test_valid_ref_names(tag: str) -> None:
    assert check_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["my tag", "../x", "", "a..b", "_a", "a-", "a//b", "/a", "a/", "é", "a\nb", "a---b"]
)
def test_invalid_ref_names(tag: str) -> None:
    with pytest.raises(InvalidTag):
        check_tag(tag)


@pytest.mark.parametrize("tag", ["my tag", "../x", "", "a..b"])
def test_an_invalid_tag_is_refused_before_anything_is_written(tmp_path, chain, capsys, tag) -> None:
    out = tmp_path / "oci"
    rc, _, err = _cli(capsys, "export", *chain, "--oci", str(out), "--tag", "v1", "-q")
    assert rc == 0
    before = _tree(out)
    rc, _, err = _cli(capsys, "export", *chain, "--oci", str(out), "--tag", tag, "-q")
    assert rc == 2
    _one_line_error(err, "invalid_tag")
    assert _tree(out) == before  # the valid tag is still there, nothing else changed
    fresh = tmp_path / "fresh"
    rc, _, err = _cli(capsys, "export", *chain, "--oci", str(fresh), "--tag", tag, "-q")
    assert rc == 2
    assert not fresh.exists()


def test_a_second_tag_keeps_the_first_and_retagging_moves_only_that_tag(tmp_path, chain, capsys) -> None:
    out = tmp_path / "oci"
    assert _cli(capsys, "export", *chain, "--oci", str(out), "-t", "v1", "-q")[0] == 0
    assert _cli(capsys, "export", *chain, "--oci", str(out), "-t", "v2", "-q")[0] == 0
    tags = _tags(out)
    assert set(tags) == {"v1", "v2"} and tags["v1"] == tags["v2"]  # same image, two names
    # a different image under v1 moves v1 only
    assert _cli(capsys, "export", *chain[:2], "--oci", str(out), "-t", "v1", "-q")[0] == 0
    moved = _tags(out)
    assert set(moved) == {"v1", "v2"}
    assert moved["v2"] == tags["v2"] and moved["v1"] != tags["v1"]
    assert [m["annotations"][REF_NAME] for m in _index(out)["manifests"]] == ["v1", "v2"]  # order kept
    skopeo = services.require_tool("skopeo", "skopeo")
    for t in ("v1", "v2"):
        subprocess.run([skopeo, "inspect", f"oci:{out}:{t}"], check=True, capture_output=True)


@pytest.mark.compat
def test_the_peers_accept_every_tag_the_grammar_accepts(tmp_path, chain, capsys) -> None:
    """The grammar is the one skopeo and umoci check: edge cases of it resolve in both."""
    skopeo = services.require_tool("skopeo", "skopeo")
    umoci = services.require_tool("umoci", "umoci")
    out = tmp_path / "oci"
    tags = ["a/b:c", "x--y", "v1.0+build.5", "my_tag", "a@b", "A9/b-c.d"]
    for tag in tags:
        assert _cli(capsys, "export", *chain[:1], "--oci", str(out), "-t", tag, "-q")[0] == 0
    assert set(_tags(out)) == set(tags)
    listed = subprocess.run([umoci, "ls", "--layout", str(out)], capture_output=True, text=True, check=True)
    assert set(listed.stdout.split()) == set(tags)
    for i, tag in enumerate(tags):
        res = subprocess.run([skopeo, "inspect", f"oci:{out}:{tag}"], capture_output=True, text=True)
        assert res.returncode == 0, (tag, res.stderr)
        # (umoci 0.4.7's `stat` panics on any image without history; unpack resolves the tag too)
        bundle = tmp_path / f"bundle{i}"
        res = subprocess.run(
            [umoci, "unpack", "--image", f"{out}:{tag}", str(bundle)], capture_output=True, text=True
        )
        assert res.returncode == 0, (tag, res.stderr)
        assert (bundle / "rootfs" / "etc").is_dir()


def test_index_with_keeps_other_entries_and_foreign_fields() -> None:
    a = Descriptor(OCI_MANIFEST, "sha256:" + "a" * 64, 10)
    b = Descriptor(OCI_MANIFEST, "sha256:" + "b" * 64, 11)
    foreign = {
        "mediaType": OCI_MANIFEST,
        "digest": "sha256:" + "c" * 64,
        "size": 3,
        "platform": {"os": "linux"},
    }
    idx = json.loads(index_with({"manifests": [foreign], "annotations": {"k": "v"}}, a, None))
    assert idx["manifests"][0] == foreign and idx["annotations"] == {"k": "v"}
    idx = json.loads(index_with(idx, a, "t1"))  # the untagged entry of a is replaced by the tag
    assert [m["digest"][7] for m in idx["manifests"]] == ["c", "a"]
    idx = json.loads(index_with(idx, a, None))  # an untagged re-export adds nothing
    assert len(idx["manifests"]) == 2
    idx = json.loads(index_with(idx, b, "t1"))
    assert [(m["digest"][7], m.get("annotations")) for m in idx["manifests"]] == [
        ("c", None),
        ("b", {REF_NAME: "t1"}),
    ]
    with pytest.raises(InvalidTag):
        index_with(idx, b, "bad tag")


# --- defect 3: modes -------------------------------------------------------------------------


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode", "blob_mode"),
    [(0o022, 0o644, 0o755, 0o444), (0o027, 0o640, 0o750, 0o440)],
)
def test_layout_modes_follow_the_umask(tmp_path, chain, capsys, mask, file_mode, dir_mode, blob_mode) -> None:
    out = tmp_path / "oci"
    with _umask(mask):
        assert _cli(capsys, "export", *chain, "--oci", str(out), "-q")[0] == 0
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(out / "index.json") == file_mode  # was 0600 (mkstemp)
    assert mode(out / "oci-layout") == file_mode
    assert mode(out / "blobs") == dir_mode and mode(out / "blobs" / "sha256") == dir_mode
    for blob in (out / "blobs" / "sha256").iterdir():
        assert mode(blob) == blob_mode


def _run_as_nobody(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    import pwd

    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgid(nobody.pw_gid)
        os.setgroups([])
        os.setuid(nobody.pw_uid)

    return subprocess.run(
        cmd, preexec_fn=drop, capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HOME": "/tmp"}
    )


@pytest.mark.compat
def test_a_non_root_reader_can_read_the_layout(chain, capsys) -> None:
    services.require_root("switching to the nobody user")
    skopeo = services.require_tool("skopeo", "skopeo")
    # tmp_path's parents are 0700; a world-traversable directory of our own instead.
    base = Path(tempfile.mkdtemp(prefix="blobchain-nobody-"))
    try:
        base.chmod(0o755)
        out = base / "oci"
        with _umask(0o022):
            assert _cli(capsys, "export", *chain, "--oci", str(out), "-t", "demo", "-q")[0] == 0
        # every file of the layout, read as nobody (index.json was 0600: denied)
        cat = _run_as_nobody(
            ["/bin/sh", "-c", f"cd {out} && cat index.json oci-layout blobs/sha256/* >/dev/null"]
        )
        assert cat.returncode == 0, cat.stderr
        res = _run_as_nobody([skopeo, "inspect", f"oci:{out}:demo"])
        assert res.returncode == 0, res.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- defect 4: the media-type scheme is the export's --------------------------------------------


def _layer_types(out: Path, tag: str) -> tuple[str, list[str]]:
    man = _manifest(out, _tags(out)[tag])
    return man["mediaType"], [layer["mediaType"] for layer in man["layers"]]


def test_built_oci_exported_docker_and_back(tmp_path, chain, capsys) -> None:
    out = tmp_path / "oci"
    rc, stdout, _ = _cli(capsys, "export", *chain, "--oci", str(out), "-t", "oci", "-q", "--json")
    assert rc == 0 and {layer["media_type"] for layer in json.loads(stdout)["layers"]} == {OCI_GZ}
    rc, stdout, _ = _cli(
        capsys, "export", *chain, "--oci", str(out), "-t", "docker", "--docker-media-types", "-q", "--json"
    )
    assert rc == 0 and {layer["media_type"] for layer in json.loads(stdout)["layers"]} == {DOCKER_GZ}
    assert _layer_types(out, "docker") == (DOCKER_MANIFEST, [DOCKER_GZ] * 3)  # was: OCI layer types
    assert _layer_types(out, "oci") == (OCI_MANIFEST, [OCI_GZ] * 3)


def test_built_docker_exported_oci(tmp_path, chain, capsys) -> None:
    out = tmp_path / "oci"
    assert (
        _cli(capsys, "export", *chain, "--oci", str(out), "-t", "docker", "--docker-media-types", "-q")[0]
        == 0
    )
    assert _cli(capsys, "export", *chain, "--oci", str(out), "-t", "oci", "-q")[0] == 0
    assert _layer_types(out, "oci") == (OCI_MANIFEST, [OCI_GZ] * 3)  # was: Docker layer types
    assert _layer_types(out, "docker") == (DOCKER_MANIFEST, [DOCKER_GZ] * 3)
    # Same blobs in both images: only the descriptors' types differ.
    layers = lambda t: [m["digest"] for m in _manifest(out, _tags(out)[t])["layers"]]  # noqa: E731
    assert layers("oci") == layers("docker")
    # skopeo 1.9 reads only OCI manifests from a layout: the OCI export must be whole OCI.
    skopeo = services.require_tool("skopeo", "skopeo")
    res = subprocess.run(
        [skopeo, "copy", f"oci:{out}:oci", f"dir:{tmp_path / 'copy'}"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    copied = json.loads((tmp_path / "copy" / "manifest.json").read_bytes())
    assert {layer["mediaType"] for layer in copied["layers"]} == {OCI_GZ}


# --- defect 5: a store or layout overlapping a snapshot ------------------------------------------


def test_layout_inside_a_snapshot_is_refused(tmp_path, chain, capsys) -> None:
    before = {s: _tree(Path(s)) for s in chain}
    for inside in (Path(chain[1]) / "out", Path(chain[0]), Path(chain[2]) / "etc" / "deeper" / "out"):
        rc, _, err = _cli(capsys, "export", *chain, "--oci", str(inside), "-q")
        assert rc == 2, err
        _one_line_error(err, "store_overlaps_snapshot")
    assert {s: _tree(Path(s)) for s in chain} == before  # nothing written into any snapshot


def test_store_inside_a_snapshot_or_a_snapshot_inside_the_store_is_refused(tmp_path, chain, capsys) -> None:
    out = tmp_path / "oci"
    rc, _, err = _cli(
        capsys, "export", *chain, "--oci", str(out), "--store", str(Path(chain[0]) / "st"), "-q"
    )
    assert rc == 2
    _one_line_error(err, "store_overlaps_snapshot")
    assert not (Path(chain[0]) / "st").exists() and not out.exists()
    # a snapshot inside the store (the store is an ancestor of the snapshots)
    rc, _, err = _cli(capsys, "export", *chain, "--oci", str(out), "--store", str(tmp_path), "-q")
    assert rc == 2
    _one_line_error(err, "store_overlaps_snapshot")
    # through a symlink too
    link = tmp_path / "link"
    link.symlink_to(chain[0])
    rc, _, err = _cli(capsys, "export", *chain, "--oci", str(link / "out"), "-q")
    assert rc == 2
    assert not (Path(chain[0]) / "out").exists()


def test_client_refuses_a_store_inside_a_snapshot(tmp_path, chain) -> None:
    store = Path(chain[0]) / "store"
    with Client(Settings(store=str(store)), in_process=True) as client, pytest.raises(Exception) as e:
        client.register_chain(chain)
    assert getattr(e.value, "code", None) == "store_overlaps_snapshot"
    assert not store.exists()


# --- defect 7: a layout that cannot take an image ------------------------------------------------


def test_out_is_a_regular_file(tmp_path, chain, capsys) -> None:
    out = tmp_path / "file"
    out.write_bytes(b"not a layout")
    rc, _, err = _cli(capsys, "export", *chain, "--oci", str(out), "-q")
    assert rc == 4
    _one_line_error(err, "invalid_layout")
    assert out.read_bytes() == b"not a layout"
    rc, _, err = _cli(capsys, "export", *chain, "--oci", str(out / "sub"), "-q")
    assert rc == 4
    _one_line_error(err, "invalid_layout")


def test_a_store_that_is_a_regular_file(tmp_path, chain, capsys) -> None:
    store = tmp_path / "store"
    store.write_bytes(b"x")
    rc, _, err = _cli(capsys, "export", *chain, "--oci", str(tmp_path / "oci"), "--store", str(store), "-q")
    assert rc == 4
    _one_line_error(err, "invalid_layout")
    assert not (tmp_path / "oci").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"manifests": 5}',
        b'{"manifests": [{"digest": "sha256:zz"}]}',
        b'{"schemaVersion": 1}',
    ],
)
def test_corrupt_index_is_refused_before_any_layer_is_built(tmp_path, chain, capsys, content) -> None:
    out = tmp_path / "oci"
    out.mkdir()
    (out / "index.json").write_bytes(content)
    rc, _, err = _cli(capsys, "export", *chain, "--oci", str(out), "-q")
    assert rc == 4, err
    _one_line_error(err, "invalid_layout")
    assert (out / "index.json").read_bytes() == content
    assert not (out / "blobs").exists()  # no layer was built (before: all committed, then a traceback)


def test_immutable_out(tmp_path, chain, capsys) -> None:
    services.require_root("setting the immutable flag")
    chattr = services.require_tool("chattr", "e2fsprogs")
    out = tmp_path / "oci"
    out.mkdir()
    res = subprocess.run([chattr, "+i", str(out)], capture_output=True, text=True)
    services.require(res.returncode == 0, f"no immutable flag on this filesystem: {res.stderr.strip()}")
    try:
        for dest in (out, out / "sub"):
            rc, _, err = _cli(capsys, "export", *chain, "--oci", str(dest), "-q")
            assert rc == 4, err
            _one_line_error(err, "not_writable")
    finally:
        subprocess.run([chattr, "-i", str(out)], check=True)
    assert list(out.iterdir()) == []


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tiny filesystem at ``path``; skips (fails under CI) where mounting is not allowed."""
    services.require_root("mounting a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if res.returncode != 0:
        services.missing(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_filesystem(tmp_path, chain, capsys) -> None:
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        for dest in (ro, ro / "out"):
            rc, _, err = _cli(capsys, "export", *chain, "--oci", str(dest), "-q")
            assert rc == 4, err
            _one_line_error(err, "not_writable")


def _fill(mnt: Path, leave: int) -> None:
    """Fill the filesystem at ``mnt`` until ``leave`` bytes remain."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    with contextlib.suppress(OSError), open(mnt / "filler", "ab") as f:
        while os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize > leave:
            f.write(b"\0" * 4096)
            f.flush()


def test_a_full_disk_while_the_store_is_created(tmp_path, chain, capsys) -> None:
    with _tmpfs(tmp_path / "mnt", "size=256k") as mnt:
        _fill(mnt, 0)
        out = mnt / "oci"
        rc, _, err = _cli(capsys, "export", *chain, "--oci", str(out), "-q", "--jobs", "1")
        assert rc == 5, err
        _one_line_error(err, "store_full")
        assert not out.exists()  # no skeleton, no .blobchain/oci-layout.<uuid>.tmp
        out.mkdir()
        rc, _, err = _cli(capsys, "export", *chain, "--oci", str(out), "-q", "--jobs", "1")
        assert rc == 5, err
        assert list(out.iterdir()) == []  # it existed, empty: it stays, empty


def test_a_full_disk_is_always_store_full(tmp_path, chain, capsys) -> None:
    """Whatever write meets the full disk first (the layout marker, SQLite's database, WAL or
    journal, an ingest, index.json), the error is store_full, never 'unavailable: disk I/O'."""
    seen = set()
    for pages in range(0, 40, 3):
        with _tmpfs(tmp_path / f"mnt{pages}", "size=512k") as mnt:
            _fill(mnt, pages * 4096)
            out = mnt / "oci"
            rc, _, err = _cli(capsys, "export", *chain, "--oci", str(out), "-q", "--jobs", "1")
            if rc == 0:
                continue
            assert rc == 5, err
            _one_line_error(err, "store_full")
            seen.add(pages)
    assert seen  # the disk was full at least once


# --- defect 8: what a failed export leaves, status and gc on a layout --------------------------


def test_a_failed_export_leaves_no_skeleton(tmp_path, chain, capsys) -> None:
    out = tmp_path / "oci"
    rc, _, err = _cli(capsys, "export", chain[0], str(tmp_path / "missing"), "--oci", str(out), "-q")
    assert rc == 2
    _one_line_error(err, "snapshot_not_found")
    assert not out.exists()  # was: oci-layout, blobs/, .blobchain/
    rc, _, err = _cli(capsys, "export", chain[0], "--oci", str(out), "--level", "99", "-q")
    assert rc == 2 and not out.exists()
    # a layout that already held an image is left as it was
    assert _cli(capsys, "export", *chain, "--oci", str(out), "-q")[0] == 0
    before = _tree(out)
    assert _cli(capsys, "export", str(tmp_path / "missing"), "--oci", str(out), "-q")[0] == 2
    assert _tree(out) == before


def test_the_cleanup_keeps_a_skeleton_another_run_is_building_into(tmp_path) -> None:
    """Two runs that both found OUT missing: the one that fails must not remove what the other,
    still running, has set up (its lease says so)."""
    from blobchain.client.layout import remove_if_empty

    out = tmp_path / "oci"
    with Client(Settings(store=str(out)), in_process=True) as other:
        with other.lease():
            other.deps  # noqa: B018 - opens (creates) the store
            assert not remove_if_empty(str(out))
            assert (out / ".blobchain" / "metadata.db").exists() and (out / "oci-layout").exists()
        assert remove_if_empty(str(out))  # its lease is gone and nothing was committed
    assert not out.exists()


def test_status_and_gc_take_the_layout(tmp_path, chain, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "oci"
    rc, stdout, _ = _cli(capsys, "export", *chain, "--oci", str(out), "-q", "--json")
    assert rc == 0
    top = json.loads(stdout)["layers"][-1]
    for flag in ("--oci", "--store"):
        rc, stdout, err = _cli(capsys, "status", top["ref"], flag, str(out), "--json")
        assert rc == 0, err
        assert json.loads(stdout)["blob"]["digest"] == top["digest"]
    rc, stdout, _ = _cli(capsys, "gc", "--oci", str(out), "--dry-run", "--json")
    assert rc == 0 and json.loads(stdout)["deleted"] == []
    # without --oci: the default store does not exist, and status does not create it
    rc, _, err = _cli(capsys, "status", top["ref"])
    assert rc == 3
    _one_line_error(err, "store_not_found")
    rc, _, err = _cli(capsys, "gc")
    assert rc == 3
    assert not (tmp_path / "xdg").exists()
    rc, _, err = _cli(capsys, "status", top["ref"], "--oci", str(tmp_path / "nowhere"))
    assert rc == 3 and not (tmp_path / "nowhere").exists()


def test_unknown_ref_is_not_found(tmp_path, chain, capsys) -> None:
    out = tmp_path / "oci"
    assert _cli(capsys, "export", *chain, "--oci", str(out), "-q")[0] == 0
    rc, _, err = _cli(capsys, "status", "r-unknown", "--oci", str(out))
    assert rc == 3
    _one_line_error(err, "ref_not_found")
    with (
        Client(Settings(store=str(out)), in_process=True) as client,
        client.lease() as lease,
        pytest.raises(Exception) as e,
    ):
        client.compute_blob_chain("r-unknown", lease=lease).wait(30)
    assert getattr(e.value, "code", None) == "ref_not_found"  # was: missing_parent ... parent r-unknown
    assert "parent" not in str(e.value)


def test_executor_reports_an_unknown_ref_as_not_found(tmp_path) -> None:
    from blobchain.layers.errors import RefNotFound
    from blobchain.layers.records import LayerOptions

    with (
        Client(Settings(store=str(tmp_path / "st")), in_process=True) as client,
        pytest.raises(RefNotFound, match="unknown ref r-nope"),
    ):
        client.executor.submit("r-nope", LayerOptions()).wait(30)


@pytest.mark.integration
def test_a_missing_bucket_is_named(tmp_path, chain, s3_client) -> None:
    from blobchain.storage.content.s3 import S3ContentStore

    with Client(Settings(store=str(tmp_path / "st")), in_process=True) as client:
        specs = client.register_chain(chain)
        with client.lease() as lease:
            result = client.compute_blob_chain(specs[-1].ref_id, lease=lease).wait(60)
        gone = S3ContentStore(s3_client, "no-such-bucket-6b", "")
        deps = dataclasses.replace(client.deps, content=gone)
        with pytest.raises(FailedPrecondition, match="no-such-bucket-6b") as e:
            export_layout(result, deps, str(tmp_path / "out"))
    assert "does not exist" in e.value.message  # was: "blob ... is missing from the content store"
    assert not (tmp_path / "out").exists()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from([None, "t1", "t2", "a/b:c"])), max_size=12)
)
def test_index_with_is_a_tag_map(ops) -> None:
    """Any sequence of exports: each tag names the digest it was last exported with, in the
    place it was first written; an untagged entry exists only for a digest no tag names."""
    index = None
    want: dict[str, str] = {}
    order: list[str] = []
    for d, tag in ops:
        desc = Descriptor(OCI_MANIFEST, "sha256:" + d * 64, 1)
        index = json.loads(index_with(index, desc, tag))
        if tag:
            want[tag] = desc.digest
            if tag not in order:
                order.append(tag)
    manifests = (index or {}).get("manifests", [])
    tagged = [(m["annotations"][REF_NAME], m["digest"]) for m in manifests if "annotations" in m]
    assert tagged == [(t, want[t]) for t in order]
    untagged = [m["digest"] for m in manifests if "annotations" not in m]
    assert len(untagged) == len(set(untagged))
    assert not set(untagged) & set(want.values())
