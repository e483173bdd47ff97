"""``blobchain unpack LAYOUT[:TAG] DIR``: the OCI applier end to end, against umoci's unpack of
the same image (entry by entry), and its named errors with their exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import fsgen
import pytest
import services

from blobchain.client.cli import main

needs_root = services.needs_root("chown and device nodes, as umoci restores them")


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _export(capsys, states: list[Path], layout: Path, tag: str = "t") -> dict:
    rc, out, err = _cli(
        capsys, "export", *map(str, states), "--oci", str(layout), "--tag", tag, "-q", "--json"
    )
    assert rc == 0, err
    return json.loads(out)


def comparable(root: Path) -> dict[bytes, tuple[object, ...]]:
    """fsgen's listing keyed by path: type, mode, uid, gid, size, mtime, rdev, link target,
    security.capability, content digest, hardlink group. The root directory itself is left out
    (umoci gives it the bundle's attributes, not the image's)."""
    return {row[0]: row[1:] for row in fsgen.listing(root) if row[0] != b""}


@pytest.fixture
def chain_layout(tmp_path: Path, capsys) -> tuple[Path, list[Path]]:
    states = [fsgen.build(tmp_path / f"s{i}", spec) for i, spec in enumerate(fsgen.chain())]
    layout = tmp_path / "oci"
    _export(capsys, states, layout)
    return layout, states


@needs_root
@pytest.mark.compat
def test_unpack_equals_umoci_entry_by_entry(tmp_path: Path, chain_layout, capsys) -> None:
    umoci = services.require_tool("umoci", "umoci")
    layout, states = chain_layout
    bundle = tmp_path / "bundle"
    subprocess.run([umoci, "unpack", "--image", f"{layout}:t", str(bundle)], check=True, capture_output=True)
    ours = tmp_path / "ours"
    rc, out, err = _cli(capsys, "unpack", f"{layout}:t", str(ours), "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["layers"] == len(states) and data["path"] == str(ours)
    theirs = comparable(bundle / "rootfs")
    mine = comparable(ours)
    assert sorted(mine) == sorted(theirs)
    diffs = [(p, mine[p], theirs[p]) for p in mine if mine[p] != theirs[p]]
    assert not diffs, diffs[:5]


def test_unpack_without_tag_of_a_single_image_layout(tmp_path: Path, capsys) -> None:
    s = tmp_path / "s"
    (s / "d").mkdir(parents=True)
    (s / "d/f").write_bytes(b"x" * 10)
    layout = tmp_path / "oci"
    _export(capsys, [s], layout)
    rc, _out, err = _cli(capsys, "unpack", f"oci:{layout}", str(tmp_path / "out"))
    assert rc == 0, err
    assert (tmp_path / "out/d/f").read_bytes() == b"x" * 10
    # an existing empty directory is fine too
    (tmp_path / "empty").mkdir()
    assert _cli(capsys, "unpack", str(layout), str(tmp_path / "empty"))[0] == 0
    assert (tmp_path / "empty/d/f").read_bytes() == b"x" * 10


def _one_line(err: str, code: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error ({code}): "), err


def test_unpack_errors_are_named_with_exit_codes_and_leave_nothing(tmp_path: Path, capsys) -> None:
    s = tmp_path / "s"
    s.mkdir()
    (s / "f").write_bytes(b"hello" * 1000)
    layout = tmp_path / "oci"
    data = _export(capsys, [s], layout)
    out = tmp_path / "out"

    rc, _, err = _cli(capsys, "unpack", "oci:", str(out))
    assert rc == 2
    _one_line(err, "invalid_image_reference")
    rc, _, err = _cli(capsys, "unpack", f"{layout}:nope", str(out))
    assert rc == 3
    _one_line(err, "image_not_found")
    rc, _, err = _cli(capsys, "unpack", str(tmp_path / "no-layout"), str(out))
    assert rc == 3
    _one_line(err, "image_not_found")
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_bytes(b"")
    rc, _, err = _cli(capsys, "unpack", f"{layout}:t", str(tmp_path / "full"))
    assert rc == 6
    _one_line(err, "target_not_empty")
    assert os.listdir(tmp_path / "full") == ["x"]

    # a corrupt layer blob: exit 7, no target, no scratch directory left
    blob = layout / "blobs/sha256" / data["layers"][0]["digest"][7:]
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(raw))
    rc, _, err = _cli(capsys, "unpack", f"{layout}:t", str(out))
    assert rc == 7, err
    _one_line(err, "digest_mismatch")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def _layout_with_layer(tmp_path: Path, tar_bytes: bytes, diff_id: str | None = None) -> Path:
    """A hand-made OCI layout whose one uncompressed layer is ``tar_bytes``."""
    import hashlib

    def put(data: bytes) -> str:
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        p = tmp_path / "bad/blobs/sha256" / d[7:]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return d

    layer = put(tar_bytes)
    cfg = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id or layer]}}
    ).encode()
    c = put(cfg)
    man = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": c,
                "size": len(cfg),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer,
                    "size": len(tar_bytes),
                }
            ],
        }
    ).encode()
    m = put(man)
    (tmp_path / "bad/oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (tmp_path / "bad/index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": m,
                        "size": len(man),
                        "annotations": {"org.opencontainers.image.ref.name": "t"},
                    }
                ],
            }
        )
    )
    return tmp_path / "bad"


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _entry(
    name: str, typ: bytes, data: bytes | None = None, link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = typ
    ti.mode = 0o755 if typ == tarfile.DIRTYPE else 0o644
    ti.size = len(data or b"")
    ti.linkname = link
    return ti, data


@pytest.mark.parametrize(
    "members",
    [
        [_entry("../escape", tarfile.REGTYPE, b"x")],
        [_entry("/abs", tarfile.REGTYPE, b"x")],
        # a symlink out of DIR, then a file through it: never followed
        [_entry("link", tarfile.SYMTYPE, link="/tmp"), _entry("link/owned", tarfile.REGTYPE, b"x")],
    ],
    ids=["dotdot", "absolute", "through-symlink"],
)
def test_unpack_confines_entries(tmp_path: Path, capsys, members) -> None:
    layout = _layout_with_layer(tmp_path, _tar(*members))
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "unpack", f"{layout}:t", str(out))
    assert rc == 2, err
    _one_line(err, "path_escapes")
    assert not out.exists()
    assert not (tmp_path / "escape").exists() and not Path("/tmp/owned").exists()


def test_unpack_checks_the_diff_id(tmp_path: Path, capsys) -> None:
    layout = _layout_with_layer(
        tmp_path, _tar(_entry("f", tarfile.REGTYPE, b"x")), diff_id="sha256:" + "0" * 64
    )
    rc, _, err = _cli(capsys, "unpack", f"{layout}:t", str(tmp_path / "out"))
    assert rc == 7
    assert "diffID" in err
    assert not (tmp_path / "out").exists()


def test_unpack_applies_whiteouts(tmp_path: Path, capsys) -> None:
    lower = tmp_path / "s0"
    (lower / "keep").mkdir(parents=True)
    (lower / "keep/a").write_bytes(b"a")
    (lower / "gone").mkdir()
    (lower / "gone/x").write_bytes(b"x")
    (lower / "opq").mkdir()
    (lower / "opq/old").write_bytes(b"old")
    upper = tmp_path / "s1"
    subprocess.run(["cp", "-a", f"{lower}/.", str(upper)], check=True)
    subprocess.run(["rm", "-rf", str(upper / "gone"), str(upper / "opq")], check=True)
    (upper / "opq").mkdir()
    (upper / "opq/new").write_bytes(b"new")
    layout = tmp_path / "oci"
    _export(capsys, [lower, upper], layout)
    out = tmp_path / "out"
    assert _cli(capsys, "unpack", f"{layout}:t", str(out))[0] == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "keep",
        "keep/a",
        "opq",
        "opq/new",
    ]
