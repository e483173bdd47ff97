"""``--base IMAGE`` from an OCI layout, embedded: the base's layers are refs with blobs (nothing
diffed or recompressed), chain IDs continue from its diffIDs, its config and history come
first, the first snapshot is diffed against the base's top state (a cached unpack, made once,
or a snapshot the caller gives), and umoci's unpack of the result equals our top snapshot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import fsgen
import pytest
import services

from blobchain.client import Client
from blobchain.client import unpack as unpack_mod
from blobchain.client.cli import main
from blobchain.client.image import LayoutImageSource, resolve
from blobchain.client.unpack import unpack_layers
from blobchain.config.settings import Settings
from blobchain.layers.identity import chain_ids, next_ids
from blobchain.workers.verify import verify_store


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _whole_seconds(root: Path) -> None:
    """Layer headers keep whole-second mtimes: make the snapshots so, to compare trees exactly."""
    for d, dirs, files in os.walk(root, topdown=False):
        for name in [*dirs, *files]:
            p = os.path.join(d, name)
            st = os.lstat(p)
            t = st.st_mtime_ns // 10**9 * 10**9
            os.utime(p, ns=(t, t), follow_symlinks=False)


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
    return dst


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs/sha256" / digest[7:]).read_bytes()


def _manifest(layout: Path, tag: str) -> tuple[dict, dict]:
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    man = json.loads(_blob(layout, entry["digest"]))
    return man, json.loads(_blob(layout, man["config"]["digest"]))


@pytest.fixture
def base_layout(tmp_path: Path, capsys) -> Path:
    """A two-layer base image with a runnable config (what FROM inherits)."""
    s0 = fsgen.build(tmp_path / "b0", fsgen.chain()[0])
    s1 = _copy(s0, tmp_path / "b1")
    (s1 / "usr/bin/tool").write_bytes(b"tool v1")
    os.chmod(s1 / "usr/bin/tool", 0o755)
    os.symlink("tool", s1 / "usr/bin/t")
    (s1 / "etc/hostname").unlink()
    for s in (s0, s1):
        _whole_seconds(s)
    layout = tmp_path / "base-oci"
    rc, _, err = _cli(
        capsys, "export", str(s0), str(s1), "--oci", str(layout), "--tag", "base", "-q",
        "--platform", "linux/arm64/v8", "--env", "PATH=/usr/bin", "--env", "MODE=base",
        "--entrypoint", '["/usr/bin/tool"]', "--cmd", '["--help"]', "--workdir", "/srv",
        "--user", "1000", "--label", "from=base", "--expose", "8080", "--comment", "base os",
        "--comment", "base tool",
    )  # fmt: skip
    assert rc == 0, err
    return layout


def _top_of(base_layout: Path, tmp_path: Path) -> Path:
    """The base's top state as a user would have it (umoci's unpack of the base)."""
    umoci = services.require_tool("umoci", "umoci")
    bundle = tmp_path / "base-bundle"
    subprocess.run(
        [umoci, "unpack", "--image", f"{base_layout}:base", str(bundle)], check=True, capture_output=True
    )
    return bundle / "rootfs"


def _ours(top: Path, tmp_path: Path) -> list[Path]:
    a = _copy(top, tmp_path / "o1")
    (a / "app").mkdir()
    (a / "app/main").write_bytes(b"#!/bin/sh\necho app\n")
    os.chmod(a / "app/main", 0o755)
    shutil.rmtree(a / "var/tmp")  # a directory of the base removed: a whiteout
    b = _copy(a, tmp_path / "o2")
    (b / "app/main").write_bytes(b"#!/bin/sh\necho app v2\n")
    (b / "usr/bin/tool").write_bytes(b"tool v2")  # a base file changed
    for s in (a, b):
        _whole_seconds(s)
    return [a, b]


def comparable(root: Path) -> dict[bytes, tuple[object, ...]]:
    return {row[0]: row[1:] for row in fsgen.listing(root) if row[0] != b""}


@services.needs_root("unpacks with owners, as umoci")
@pytest.mark.compat
def test_base_from_a_layout_end_to_end(tmp_path: Path, base_layout: Path, capsys) -> None:
    top = _top_of(base_layout, tmp_path)
    ours = _ours(top, tmp_path)
    out = tmp_path / "oci"
    rc, stdout, err = _cli(
        capsys, "export", *map(str, ours), "--oci", str(out), "--tag", "app", "-q", "--json",
        "--base", f"oci:{base_layout}:base", "--env", "MODE=app", "--cmd", '["serve"]',
        "--comment", "add app", "--comment", "app v2",
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads(stdout)
    base_man, base_cfg = _manifest(base_layout, "base")
    man, cfg = _manifest(out, "app")

    # the base's layers, byte for byte: same digests, sizes, no recompression
    base_digests = [la["digest"] for la in base_man["layers"]]
    assert [la["digest"] for la in man["layers"][:2]] == base_digests
    assert [la["size"] for la in man["layers"][:2]] == [la["size"] for la in base_man["layers"]]
    for d in base_digests:
        assert _blob(out, d) == _blob(base_layout, d)
    assert len(man["layers"]) == 4
    # layers: the base's refs first, with its blobs; chain IDs continue from its diffIDs
    layers = data["layers"]
    assert [la["digest"] for la in layers[:2]] == base_digests
    diff_ids = [la["diff_id"] for la in layers]
    assert diff_ids[:2] == base_cfg["rootfs"]["diff_ids"]
    assert [la["chain_id"] for la in layers] == chain_ids(diff_ids)
    assert cfg["rootfs"]["diff_ids"] == diff_ids
    # history: the base's, then ours
    assert [h["created_by"] for h in cfg["history"]] == ["base os", "base tool", "add app", "app v2"]
    # config inherited as FROM does, explicit flags over it
    c = cfg["config"]
    assert c["Env"] == ["PATH=/usr/bin", "MODE=app"]
    assert c["Entrypoint"] == ["/usr/bin/tool"] and c["Cmd"] == ["serve"]
    assert c["WorkingDir"] == "/srv" and c["User"] == "1000"
    assert c["Labels"] == {"from": "base"} and c["ExposedPorts"] == {"8080/tcp": {}}
    assert (cfg["architecture"], cfg["variant"]) == ("arm64", "v8")
    # the base was unpacked once into the store's cache, each base blob fetched once
    assert data["base"]["unpacked"] is True
    assert sorted(data["base"]["fetched"]) == sorted(base_digests)
    cached = Path(data["base"]["top_snapshot"])
    assert cached.parent == out / ".blobchain/base-rootfs" and cached.name == data["base"]["chain_id"][7:]
    assert comparable(cached) == comparable(top)

    # umoci's unpack of the result is our top snapshot, entry by entry
    umoci = services.require_tool("umoci", "umoci")
    bundle = tmp_path / "bundle"
    subprocess.run([umoci, "unpack", "--image", f"{out}:app", str(bundle)], check=True, capture_output=True)
    assert comparable(bundle / "rootfs") == comparable(ours[-1])
    # and so is skopeo's copy (the image is valid for it), with the same manifest digest
    skopeo = services.require_tool("skopeo", "skopeo")
    subprocess.run(
        [skopeo, "copy", f"oci:{out}:app", f"oci:{tmp_path / 'copy'}:app"], check=True, capture_output=True
    )
    assert _manifest(tmp_path / "copy", "app")[0] == man

    # a second run: the cache is reused (nothing unpacked or fetched), same manifest
    rc, stdout2, err = _cli(
        capsys, "export", *map(str, ours), "--oci", str(out), "--tag", "app", "-q", "--json",
        "--base", f"oci:{base_layout}:base", "--env", "MODE=app", "--cmd", '["serve"]',
        "--comment", "add app", "--comment", "app v2",
    )  # fmt: skip
    assert rc == 0, err
    again = json.loads(stdout2)
    assert again["base"]["unpacked"] is False and again["base"]["fetched"] == []
    assert again["manifest"] == data["manifest"]


@services.needs_root("unpacks with owners, as umoci")
def test_base_refs_are_cached_never_built_and_a_given_snapshot_skips_the_unpack(
    tmp_path: Path, base_layout: Path
) -> None:
    top = _top_of(base_layout, tmp_path)
    ours = _ours(top, tmp_path)
    store = tmp_path / "store"
    with Client(Settings(store=str(store))) as client:
        base = client.base(f"oci:{base_layout}:base", snapshot=top)
        assert base.unpacked is False and base.snapshot == str(top)
        specs = client.register_chain(ours, parent=base.top_ref)
        with client.lease() as lease:
            job = client.compute_blob_chain(specs[-1].ref_id, lease=lease, force=True, compression="zstd")
            result = job.wait(120)
            client.hold(lease, result)
        states = {r: ev.state for r, ev in job.progress().items()}
        # zstd asked: our layers are zstd, the base's keep their gzip blobs untouched
        assert [states[s.ref_id] for s in base.specs] == ["cached", "cached"]
        assert [states[s.ref_id] for s in specs] == ["built", "built"]
        blobs = result.layer_blobs()
        assert [b.digest for b in blobs[:2]] == [la.descriptor.digest for la in base.image.layers]
        assert [str(b.compression) for b in blobs] == ["gzip", "gzip", "zstd", "zstd"]
        assert [r.chain_id for r in result.records] == chain_ids([b.diff_id for b in blobs])
        # blobChainID as BuildKit: over each ref's main blob (the base's own for its refs)
        pair = None
        for rec in result.records:
            assert rec.blob is not None
            pair = next_ids(pair, rec.blob.digest, rec.blob.diff_id)
            assert (rec.chain_id, rec.blob_chain_id) == pair
        # nothing of the base fetched, no cache made: no export needed its bytes yet
        assert base.fetched == [] and not (store / ".blobchain/base-rootfs").exists()
        for b in blobs[:2]:
            assert client.deps.content.info(b.digest) is None
        # `blobchain verify` does not call the unfetched base blobs missing
        report = verify_store(client.deps.content, client.deps.metadata)
        assert not report.bad and report.to_dict()["missing"] == 0
        out = tmp_path / "oci"
        client.export(result, out, tag="app", base=base)
        assert sorted(base.fetched) == sorted(b.digest for b in blobs[:2])  # copied into the layout
    # the first snapshot was diffed against the given top: the same layers as from the cache
    with Client(Settings(store=str(tmp_path / "store2"))) as client:
        cached = client.base(f"oci:{base_layout}:base")
        assert cached.unpacked is True
        specs2 = client.register_chain(ours, parent=cached.top_ref)
        with client.lease() as lease:
            r2 = client.compute_blob_chain(
                specs2[-1].ref_id, lease=lease, compression="zstd", force=True
            ).wait(120)
    assert [b.diff_id for b in r2.layer_blobs()] == [b.diff_id for b in blobs]


def test_a_cache_published_between_the_checks_is_kept(
    tmp_path: Path, base_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (a CI flake of the test below): another run published the cache tree after
    this one found it missing but before it checked the target; that was TargetNotEmpty."""
    src = LayoutImageSource(str(base_layout), "base")
    img = resolve(src)
    dest = tmp_path / "cache" / img.top_chain_id[7:]  # type: ignore[index]
    real_check = unpack_mod.check_target

    def published_meanwhile(path: str) -> None:
        monkeypatch.setattr(unpack_mod, "check_target", real_check)  # the other run checks as usual
        unpack_layers(img, lambda la: src.open_blob(la.descriptor), str(dest), exist_ok=True)
        real_check(path)

    monkeypatch.setattr(unpack_mod, "check_target", published_meanwhile)
    got = unpack_layers(img, lambda la: src.open_blob(la.descriptor), str(dest), exist_ok=True)
    assert got.layers == 0  # the other run's tree is kept, ours was never started
    assert os.listdir(tmp_path / "cache") == [dest.name]
    assert (dest / "usr/bin/tool").read_bytes() == b"tool v1"


def test_concurrent_unpacks_into_the_cache_publish_one_tree(tmp_path: Path, base_layout: Path) -> None:
    src = LayoutImageSource(str(base_layout), "base")
    img = resolve(src)
    dest = tmp_path / "cache" / img.top_chain_id[7:]  # type: ignore[index]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            unpack_layers(img, lambda la: src.open_blob(la.descriptor), str(dest), exist_ok=True)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path / "cache") == [dest.name]  # no scratch directory left behind
    assert (dest / "usr/bin/tool").read_bytes() == b"tool v1"


def test_bad_base_input_is_a_named_error_and_writes_nothing(tmp_path: Path, capsys) -> None:
    s = tmp_path / "s"
    s.mkdir()
    (s / "f").write_text("x")
    out = tmp_path / "oci"
    cases = [
        (["--base", f"oci:{tmp_path / 'none'}:x"], 3, "image_not_found"),
        (["--base", "Not A Ref!"], 2, "invalid_image_reference"),
        (["--base-snapshot", str(s)], 2, "invalid_argument"),
    ]
    for extra, code, name in cases:
        rc, _, err = _cli(capsys, "export", str(s), "--oci", str(out), "-q", *extra)
        assert rc == code, err
        assert err.startswith(f"error ({name}): ") and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


@services.needs_root("unpacks with owners, as umoci")
def test_base_recompress_converts_the_base_layers_without_diffing(
    tmp_path: Path, base_layout: Path, capsys
) -> None:
    top = _top_of(base_layout, tmp_path)
    ours = _ours(top, tmp_path)
    out = tmp_path / "oci"
    args = [
        "export", *map(str, ours), "--oci", str(out), "--tag", "z", "-q", "--json", "--compression", "zstd",
        "--base", f"oci:{base_layout}:base", "--base-snapshot", str(top), "--base-recompress",
    ]  # fmt: skip
    rc, stdout, err = _cli(capsys, *args)
    assert rc == 0, err
    data = json.loads(stdout)
    base_man, base_cfg = _manifest(base_layout, "base")
    man, cfg = _manifest(out, "z")
    assert [la["mediaType"] for la in man["layers"]] == ["application/vnd.oci.image.layer.v1.tar+zstd"] * 4
    # converted: new blobs, the same diffIDs, so the same chain IDs as without conversion
    assert {la["digest"] for la in man["layers"][:2]}.isdisjoint(la["digest"] for la in base_man["layers"])
    assert cfg["rootfs"]["diff_ids"][:2] == base_cfg["rootfs"]["diff_ids"]
    diff_ids = [la["diff_id"] for la in data["layers"]]
    assert [la["chain_id"] for la in data["layers"]] == chain_ids(diff_ids)
    # the base's blobs were fetched for it (a --base-snapshot: no unpack needed them)
    assert data["base"]["unpacked"] is False
    assert sorted(data["base"]["fetched"]) == sorted(la["digest"] for la in base_man["layers"])
    # our applier reads zstd (umoci 0.4 does not): the result is our top snapshot
    rc, _, err = _cli(capsys, "unpack", f"{out}:z", str(tmp_path / "u"))
    assert rc == 0, err
    assert comparable(tmp_path / "u") == comparable(ours[-1])
    skopeo = services.require_tool("skopeo", "skopeo")
    subprocess.run([skopeo, "inspect", f"oci:{out}:z"], check=True, capture_output=True)
    # a second run converts nothing again: the variants are recorded
    rc, stdout2, err = _cli(capsys, *args)
    assert rc == 0, err
    again = json.loads(stdout2)
    assert again["manifest"] == data["manifest"] and again["base"]["fetched"] == []


def test_a_multi_platform_base_resolves_to_the_platform_asked_for(tmp_path: Path, capsys) -> None:
    layout = tmp_path / "multi"
    for arch in ("amd64", "arm64"):
        s = tmp_path / f"base-{arch}"
        s.mkdir()
        (s / "arch").write_text(arch)
        rc, _, err = _cli(
            capsys, "export", str(s), "--oci", str(layout), "--tag", arch, "-q", "--platform", f"linux/{arch}"
        )
        assert rc == 0, err
    assert _cli(capsys, "index", str(layout), "amd64", "arm64", "--tag", "multi")[0] == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "arch").write_text("arm64")
    (mine / "extra").write_text("x")
    out = tmp_path / "oci"
    rc, stdout, err = _cli(
        capsys, "export", str(mine), "--oci", str(out), "--tag", "t", "-q", "--json",
        "--base", f"oci:{layout}:multi", "--platform", "linux/arm64",
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads(stdout)
    arm_man, _ = _manifest(layout, "arm64")
    assert data["layers"][0]["digest"] == arm_man["layers"][0]["digest"]
    _, cfg = _manifest(out, "t")
    assert cfg["architecture"] == "arm64"
    # a platform the index does not have: a named error
    rc, _, err = _cli(
        capsys, "export", str(mine), "--oci", str(tmp_path / "o2"), "-q",
        "--base", f"oci:{layout}:multi", "--platform", "linux/s390x",
    )  # fmt: skip
    assert rc == 3 and "image_not_found" in err and "linux/amd64" in err, err


def test_two_bases_with_the_same_content_in_other_blobs_keep_their_own(tmp_path: Path, capsys) -> None:
    """Regression: base refs were keyed by chainID alone, so a zstd copy of a gzip base (same
    diffIDs) reused the gzip base's records, and its export named blobs it never fetched."""
    s = tmp_path / "s"
    (s / "etc").mkdir(parents=True)
    (s / "etc/conf").write_text("base")
    layouts = {}
    for comp in ("gzip", "zstd"):
        layouts[comp] = tmp_path / f"base-{comp}"
        rc, _, err = _cli(
            capsys, "export", str(s), "--oci", str(layouts[comp]), "--tag", "b", "-q", "-c", comp
        )
        assert rc == 0, err
    mine = _copy(s, tmp_path / "mine")
    (mine / "app").write_text("app")
    store = tmp_path / "store"
    for comp in ("gzip", "zstd"):
        out = tmp_path / f"out-{comp}"
        rc, _, err = _cli(
            capsys, "export", str(mine), "--oci", str(out), "--store", str(store), "--tag", "t", "-q", "--json",
            "--base", f"oci:{layouts[comp]}:b",
        )  # fmt: skip
        assert rc == 0, err
        base_man, _ = _manifest(layouts[comp], "b")
        man, _ = _manifest(out, "t")
        assert man["layers"][0] == base_man["layers"][0]
        assert _blob(out, man["layers"][0]["digest"]) == _blob(layouts[comp], base_man["layers"][0]["digest"])
