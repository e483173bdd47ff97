"""``blobchain unpack`` against crafted layers: hand-built OCI layouts whose blobs, digests and
diffIDs are all correct, so that the applier itself (``layers/apply.py``) meets the input.

Each case checks the promise: a named one-line error (never a traceback), nothing created or
changed outside DIR (a sentinel sibling), no DIR and no scratch directory after a failure.
Cases that the older tests (tests/layers/test_apply.py, tests/client/test_unpack.py) cover
are not repeated here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import services
import zstandard

from blobchain.client import image as images
from blobchain.client.cli import main
from blobchain.client.unpack import unpack_layers
from blobchain.layers.apply import InvalidLayer, _chmod_nofollow, apply_layer, remove_tree
from blobchain.layers.errors import PathEscapes

needs_root = services.needs_root("security.* and trusted.* xattrs")

BLOCK = 512
END = b"\0" * 1024
LAYER = "application/vnd.oci.image.layer.v1.tar"


# --- building layers and layouts ------------------------------------------------------------


def _s(name: bytes | str) -> str:
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name


def entry(
    name: bytes | str, typ: bytes = tarfile.REGTYPE, data: bytes = b"", *, link: bytes | str = "", **kw
):
    ti = tarfile.TarInfo(_s(name))
    ti.type = typ
    ti.mode = kw.pop("mode", 0o755 if typ == tarfile.DIRTYPE else 0o644)
    ti.size = len(data) if typ == tarfile.REGTYPE else 0
    ti.linkname = _s(link)
    ti.mtime = kw.pop("mtime", 1000)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, (data if typ == tarfile.REGTYPE else None)


def tar(*members, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def header(name: str, typ: bytes, size: int = 0, **kw) -> bytes:
    """One raw ustar header block (the checksum right), for records tarfile will not write."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.mtime = typ, size, kw.pop("mode", 0o644), 1000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti.tobuf(tarfile.GNU_FORMAT)


def pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % BLOCK)


def record(key: str, value: bytes | str) -> bytes:
    """One PAX record, ``"%d %s=%s\\n"``, its length prefix counting itself."""
    body = b" " + key.encode() + b"=" + (value.encode() if isinstance(value, str) else value) + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax(records: list[bytes], then: bytes, typ: bytes = tarfile.XHDTYPE) -> bytes:
    body = b"".join(records)
    return header("././@PaxHeader", typ, len(body)) + pad(body) + then


def longname(name: bytes, then: bytes, typ: bytes = tarfile.GNUTYPE_LONGNAME) -> bytes:
    return header("././@LongLink", typ, len(name) + 1) + pad(name + b"\0") + then


def file_entry(name: str = "x", data: bytes = b"") -> bytes:
    return header(name, tarfile.REGTYPE, len(data)) + (pad(data) if data else b"")


def _put(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = root / "blobs/sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return "sha256:" + digest


def layout(root: Path, layers: list[tuple[bytes, str, bytes]]) -> Path:
    """An OCI layout with one image, tag ``t``: each layer is (blob, media-type suffix, its tar);
    digests, sizes and diffIDs are all right, so only the applier can refuse the content."""
    descs = [
        {"mediaType": LAYER + suffix, "digest": _put(root, blob), "size": len(blob)}
        for blob, suffix, _ in layers
    ]
    diff_ids = ["sha256:" + hashlib.sha256(plain).hexdigest() for _, _, plain in layers]
    cfg = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    )
    cfg_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _put(root, cfg.encode())}
    cfg_desc["size"] = len(cfg)
    man = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": cfg_desc,
            "layers": descs,
        }
    ).encode()
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _put(root, man),
                "size": len(man),
                "annotations": {"org.opencontainers.image.ref.name": "t"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


def plain(t: bytes) -> tuple[bytes, str, bytes]:
    return t, "", t


def gz(t: bytes) -> tuple[bytes, str, bytes]:
    return gzip.compress(t, 1), "+gzip", t


class Box:
    """DIR's parent: a sentinel file and directory beside DIR that must come out untouched."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "box"
        self.out = self.root / "out"
        (self.root / "sentinel.d").mkdir(parents=True)
        (self.root / "sentinel").write_bytes(b"keep")
        (self.root / "sentinel.d/f").write_bytes(b"keep")
        self._before = self._state()

    def _state(self) -> list[tuple[str, int, int]]:
        rows = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != str(self.out)]
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                if p != str(self.out):
                    st = os.lstat(p)
                    rows.append((os.path.relpath(p, self.root), st.st_mode, st.st_mtime_ns))
        return sorted(rows)

    def untouched(self) -> bool:
        return self._state() == self._before and (self.root / "sentinel").read_bytes() == b"keep"


def unpack(tmp_path: Path, capsys, layers: list[tuple[bytes, str, bytes]]) -> tuple[int, str, Box]:
    lay = layout(tmp_path / "oci", layers)
    box = Box(tmp_path)
    capsys.readouterr()
    rc = main(["unpack", f"{lay}:t", str(box.out)])
    return rc, capsys.readouterr().err, box


def refused(rc: int, err: str, box: Box, code: str, exit_code: int) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error ({code}): "), err
    assert rc == exit_code, err
    assert not box.out.exists()
    assert sorted(os.listdir(box.root)) == ["sentinel", "sentinel.d"]  # no scratch directory left
    assert box.untouched()


# --- malformed tars: a named error, not a traceback and not a silent stop ----------------------

ONE = tar(entry("a", data=b"1"), entry("b", data=b"2"), entry("c", data=b"3"), fmt=tarfile.USTAR_FORMAT)


def _bad_checksum(t: bytes, at: int) -> bytes:
    raw = bytearray(t)
    raw[at + 148] ^= 1
    return bytes(raw)


MALFORMED = {
    # tarfile takes a bad header after the first for the end of the archive: the rest was dropped
    # and the unpack succeeded with part of the layer (Go, hence containerd and umoci, refuse).
    "bad-checksum-later-header": _bad_checksum(ONE, 2 * BLOCK),
    "zero-block-then-headers": tar(entry("a", data=b"1"))[: 2 * BLOCK] + b"\0" * BLOCK + tar(entry("b")),
    # NUL in a PAX name reached os.* calls: ValueError traceback.
    "pax-path-nul": pax([record("path", b"a\0b")], file_entry()) + END,
    "pax-linkpath-nul": pax([record("linkpath", b"a\0b")], header("x", tarfile.SYMTYPE)) + END,
    # Times and ids: ValueError/OverflowError tracebacks, or a silent uid 0 for "abc".
    "pax-mtime-nan": pax([record("mtime", "nan")], file_entry()) + END,
    "pax-mtime-inf": pax([record("mtime", "inf")], file_entry()) + END,
    "pax-mtime-out-of-range": pax([record("mtime", "99999999999999")], file_entry()) + END,
    "pax-mtime-exponent": pax([record("mtime", "1e999999999")], file_entry()) + END,
    "pax-uid-negative": pax([record("uid", "-5")], file_entry()) + END,
    "pax-uid-not-a-number": pax([record("uid", "abc")], file_entry()) + END,
    "uid-over-32-bits": tar(entry("f", uid=2**40), fmt=tarfile.GNU_FORMAT),
    "devmajor-over-32-bits": tar(entry("d", tarfile.CHRTYPE, devmajor=2**40), fmt=tarfile.GNU_FORMAT),
    # A malformed PAX body was parsed by quadratic regexes (seconds per 64 KiB on 3.11.7).
    "pax-malformed": pax([b"1" * 20000], file_entry()) + END,
    # GNU sparse 1.0 map cut short: ValueError traceback from tarfile.
    "sparse-1.0": pax(
        [record("GNU.sparse.major", "1"), record("GNU.sparse.minor", "0"), record("GNU.sparse.name", "s")],
        header("x", tarfile.REGTYPE, BLOCK) + pad(b"5\nzz"),
    )
    + END,
    "old-gnu-sparse": header("s", tarfile.GNUTYPE_SPARSE) + END,
    "symlink-empty-target": tar(entry("l", tarfile.SYMTYPE)),  # was not_found (3) from symlinkat
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_layer_is_invalid_layer(tmp_path: Path, capsys, name: str) -> None:
    rc, err, box = unpack(tmp_path, capsys, [plain(tar(entry("lower", data=b"l"))), plain(MALFORMED[name])])
    refused(rc, err, box, "invalid_layer", 2)


@pytest.mark.parametrize(
    "blob, suffix",
    [
        (b"\x1f\x8b\x08\x00" + b"garbage" * 20, "+gzip"),  # zlib-ng error: a traceback
        (gzip.compress(tar(entry("f", data=os.urandom(50000))))[:-20], "+gzip"),  # EOFError: silent exit 1
        (b"\x28\xb5\x2f\xfd" + b"garbage" * 20, "+zstd"),  # ZstdError: a traceback
    ],
    ids=["gzip-garbage", "gzip-truncated", "zstd-garbage"],
)
def test_blob_that_does_not_decompress_is_corrupt_blob(
    tmp_path: Path, capsys, blob: bytes, suffix: str
) -> None:
    # The digest matches the bytes: the blob was published undecodable (corrupt_blob, exit 4).
    rc, err, box = unpack(tmp_path, capsys, [(blob, suffix, b"")])
    refused(rc, err, box, "corrupt_blob", 4)


def test_damaged_blob_is_a_digest_mismatch_not_a_bad_tar(tmp_path: Path, capsys) -> None:
    lay = layout(tmp_path / "oci", [plain(ONE)])
    blob = lay / "blobs/sha256" / hashlib.sha256(ONE).hexdigest()
    blob.write_bytes(_bad_checksum(ONE, 2 * BLOCK))  # a flipped bit: the tar is now malformed too
    box = Box(tmp_path)
    capsys.readouterr()
    rc = main(["unpack", f"{lay}:t", str(box.out)])
    refused(rc, capsys.readouterr().err, box, "digest_mismatch", 7)


# --- memory and depth --------------------------------------------------------------------------


class _Stream(io.RawIOBase):
    """``head``, then ``size`` bytes of ``fill``, then ``tail``: a big record without the memory."""

    def __init__(self, head: bytes, size: int, fill: bytes, tail: bytes) -> None:
        self._head, self._left, self._fill, self._tail = head, size, fill, tail

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self._head:
            chunk, self._head = self._head[: len(b)], self._head[len(b) :]
        elif self._left:
            chunk = self._fill * min(len(b), self._left)
            self._left -= len(chunk)
        else:
            chunk, self._tail = self._tail[: len(b)], self._tail[len(b) :]
        b[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("typ", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE])
def test_huge_meta_records_are_refused_without_reading_them_into_memory(tmp_path: Path, typ: bytes) -> None:
    # tarfile reads a long-name or PAX record whole: a 1 GiB one (1 MiB gzipped) took 9 GB of RSS.
    size = 64 << 20
    fill = b"a" if typ == tarfile.GNUTYPE_LONGNAME else b"\0"
    stream = _Stream(header("././@LongLink", typ, size), size, fill, file_entry() + END)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidLayer, match="limit"):
            apply_layer(io.BufferedReader(stream, 1 << 16), tmp_path / "dest", same_owner=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_pax_records_up_to_the_limit_are_read(tmp_path: Path, capsys) -> None:
    big = pax([record("comment", b"1" * ((1 << 20) - 40)), record("path", "renamed")], file_entry("x", b"d"))
    rc, err, box = unpack(tmp_path, capsys, [gz(big + END)])
    assert rc == 0, err
    assert (box.out / "renamed").read_bytes() == b"d"


def test_deep_trees_are_applied_and_removed(tmp_path: Path, capsys) -> None:
    # 1500 levels: the recursive whiteout, opaque and cleanup code hit the recursion limit (a
    # traceback, and the scratch directory was left behind on a failure).
    deep = "/".join(["d"] * 1500)
    layers = [
        plain(tar(entry(deep + "/f", data=b"x"), entry("e/" + deep + "/f"), entry("o/" + deep + "/f"))),
        plain(tar(entry(".wh.d", data=b""), entry("o/.wh..wh..opq"), entry("o/new"))),
    ]
    rc, err, box = unpack(tmp_path, capsys, layers)
    try:
        assert rc == 0, err
        assert sorted(os.listdir(box.out)) == ["e", "o"] and os.listdir(box.out / "o") == ["new"]
        assert (box.out / "e" / deep / "f").exists()
        assert box.untouched()
    finally:
        remove_tree(box.out)  # pytest's tmp_path cleanup (shutil.rmtree) would recurse too deep

    rc, err, box = unpack(tmp_path / "2", capsys, [plain(tar(entry(deep + "/f"), entry("../escape")))])
    refused(rc, err, box, "path_escapes", 2)


@needs_root
@services.needs_tool("setpriv", "util-linux")
def test_a_failed_unpack_without_dac_override_removes_read_only_directories(tmp_path: Path) -> None:
    # Root without CAP_DAC_OVERRIDE meets mode bits as an unprivileged user does: the cleanup
    # could not empty the layer's 0555 directory, so the scratch tree stayed and its EACCES
    # (not_writable) replaced the real error.
    lower = tar(entry("usr/lib/f", data=b"x"), entry("usr/lib", tarfile.DIRTYPE, mode=0o555))
    lay = layout(tmp_path / "oci", [plain(lower), plain(tar(entry("../escape")))])
    box = Box(tmp_path)
    no_dac = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    blobchain = str(Path(sys.executable).parent / "blobchain")
    r = subprocess.run(
        [*no_dac, blobchain, "unpack", f"{lay}:t", str(box.out)], capture_output=True, text=True, timeout=120
    )
    refused(r.returncode, r.stderr, box, "path_escapes", 2)


def test_names_longer_than_path_max_are_path_too_long(tmp_path: Path, capsys) -> None:
    name = "/".join(["n" * 200] * 21)  # 4220 bytes: no kernel lookup takes it whole
    rc, err, box = unpack(tmp_path, capsys, [plain(tar(entry(name)))])
    refused(rc, err, box, "path_too_long", 2)


# --- where Python's tarfile and Go's archive/tar (containerd, umoci) read a tar differently ----


def test_a_zero_byte_layer_is_an_empty_layer_as_in_go(tmp_path: Path, capsys) -> None:
    rc, err, box = unpack(tmp_path, capsys, [plain(tar(entry("f", data=b"x"))), plain(b""), gz(b"")])
    assert rc == 0, err  # was invalid_layer ("empty file"); umoci and containerd take it
    assert os.listdir(box.out) == ["f"]


def test_global_pax_header_is_ignored_as_containerd_does(tmp_path: Path, capsys) -> None:
    # tarfile applied a global path to later entries with a PAX header of their own: f became g.
    layer = pax([record("path", "g")], b"", typ=tarfile.XGLTYPE) + tar(
        entry("f", data=b"x", pax_headers={"c": "1"})
    )
    rc, err, box = unpack(tmp_path, capsys, [plain(layer)])
    assert rc == 0, err
    assert os.listdir(box.out) == ["f"]


def test_gnu_long_name_wins_over_pax_path_as_in_go(tmp_path: Path, capsys) -> None:
    layer = pax([record("path", "from-pax")], longname(b"from-gnu", file_entry("short", b"x"))) + END
    rc, err, box = unpack(tmp_path, capsys, [plain(layer)])
    assert rc == 0, err
    assert os.listdir(box.out) == ["from-gnu"]


# --- confinement: escapes spelled the other ways (names in PAX and GNU records, links, layers) --

ESCAPES = {
    "pax-path-dotdot": pax([record("path", "../escape")], file_entry("ok", b"x")) + END,
    "pax-path-absolute": pax([record("path", "/tmp/blobchain-adversarial")], file_entry("ok", b"x")) + END,
    "gnu-longname-dotdot": longname(b"a/" * 60 + b"../" * 62 + b"escape", file_entry("ok", b"x")) + END,
    "pax-hardlink-target-dotdot": file_entry("ok")
    + pax([record("linkpath", "../sentinel")], header("h", tarfile.LNKTYPE))
    + END,
    "gnu-longlink-hardlink-absolute": longname(
        b"/etc/passwd", header("h", tarfile.LNKTYPE), tarfile.GNUTYPE_LONGLINK
    )
    + END,
    # a symlink out of DIR, then a directory and a hardlink written "through" it (same layer)
    "dir-through-symlink": tar(entry("l", tarfile.SYMTYPE, link=".."), entry("l/evil", tarfile.DIRTYPE)),
    "hardlink-into-symlink": tar(
        entry("l", tarfile.SYMTYPE, link=".."), entry("f"), entry("l/h", tarfile.LNKTYPE, link="f")
    ),
    "whiteout-through-symlink": tar(entry("l", tarfile.SYMTYPE, link=".."), entry("l/.wh.sentinel")),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escapes_in_other_spellings_are_refused(tmp_path: Path, capsys, name: str) -> None:
    rc, err, box = unpack(tmp_path, capsys, [plain(ESCAPES[name])])
    refused(rc, err, box, "path_escapes", 2)
    assert not Path("/tmp/blobchain-adversarial").exists()


@pytest.mark.parametrize(
    "upper",
    [
        tar(entry("d/x", data=b"evil")),  # the lower layer's symlink is not followed
        tar(entry("d/sub", tarfile.DIRTYPE)),
        tar(entry("d/.wh..wh..opq")),
        tar(entry("d/.wh.sentinel")),
    ],
    ids=["file", "dir", "opaque", "whiteout"],
)
def test_symlink_from_a_lower_layer_is_not_followed(tmp_path: Path, capsys, upper: bytes) -> None:
    # Layer 1 has a real directory d, layer 2 turns it into a symlink to DIR's parent, layer 3
    # writes through it.
    lower = tar(entry("d", tarfile.DIRTYPE), entry("d/f", data=b"f"))
    swap = tar(entry("d", tarfile.SYMTYPE, link=".."))
    rc, err, box = unpack(tmp_path, capsys, [plain(lower), gz(swap), plain(upper)])
    refused(rc, err, box, "path_escapes", 2)


def test_hardlink_to_a_symlink_that_leaves_dir_links_the_symlink(tmp_path: Path, capsys) -> None:
    # The link is to the symlink itself (linkat without AT_SYMLINK_FOLLOW); writing the name
    # later replaces it rather than writing through it.
    layers = [
        plain(
            tar(entry("out", tarfile.SYMTYPE, link="../sentinel"), entry("h", tarfile.LNKTYPE, link="out"))
        ),
        plain(tar(entry("h", data=b"overwritten"), entry("out", data=b"overwritten"))),
    ]
    rc, err, box = unpack(tmp_path, capsys, layers[:1])
    assert rc == 0, err
    assert os.readlink(box.out / "h") == "../sentinel"
    assert os.lstat(box.out / "h").st_ino == os.lstat(box.out / "out").st_ino
    assert box.untouched()
    rc, err, box = unpack(tmp_path / "2", capsys, layers)
    assert rc == 0, err
    assert (box.out / "h").read_bytes() == b"overwritten" and not (box.out / "h").is_symlink()
    assert box.untouched()


def test_the_tree_is_out_of_other_users_reach_until_verified(tmp_path: Path) -> None:
    # The scratch tree was 0755 from the start: while layers were still unverified, any local
    # user could run their setuid files or open their device nodes, and race the applier in
    # directories a layer chowned to them. Now 0700 until every digest matched, then 0755.
    lay = layout(tmp_path / "oci", [plain(tar(entry("su", data=b"x", mode=0o4755))), gz(tar(entry("f")))])
    src = images.LayoutImageSource(str(lay), "t")
    img = images.resolve(src)
    box = Box(tmp_path)
    seen: list[int] = []

    def opener(layer: images.ImageLayer):
        # Called for each layer in turn: the earlier ones are on disk in the scratch directory.
        for p in box.root.iterdir():
            if p.name.startswith(".out.unpack-"):
                seen.append(stat.S_IMODE(p.stat().st_mode))
        return src.open_blob(layer.descriptor)

    unpack_layers(img, opener, str(box.out))
    assert seen == [0o700, 0o700]
    assert stat.S_IMODE(box.out.stat().st_mode) == 0o755
    assert stat.S_IMODE((box.out / "su").stat().st_mode) == 0o4755


def test_attribute_chmod_does_not_follow_a_symlink_swapped_in(tmp_path: Path) -> None:
    # The applier chmods an entry it created a moment before; fchmodat (the old call) followed a
    # symlink that a user owning the parent had swapped in, chmodding its target outside DIR.
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    victim.chmod(0o600)
    (tmp_path / "d").mkdir()
    (tmp_path / "d/entry").symlink_to(victim)
    fd = os.open(tmp_path / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(PathEscapes):
            _chmod_nofollow(fd, b"entry", 0o777)
        (tmp_path / "d/real").mkdir(mode=0o700)
        _chmod_nofollow(fd, b"real", 0o2755)
    finally:
        os.close(fd)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d/real").stat().st_mode) == 0o2755


@needs_root
def test_only_the_capability_xattr_is_restored(tmp_path: Path, capsys) -> None:
    cap = b"\x01\x00\x00\x02" + b"\x00\x04\x00\x00" + b"\x00" * 12
    records = {
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.security.selinux": "system_u:object_r:shadow_t:s0",
        "SCHILY.xattr.user.x": "1",
        "SCHILY.xattr.security.capability": _s(cap),
    }
    layer = tar(entry("d", tarfile.DIRTYPE, pax_headers=records), entry("f", data=b"x", pax_headers=records))
    rc, err, box = unpack(tmp_path, capsys, [plain(layer)])
    assert rc == 0, err
    for n in ("d", "f"):
        names = [
            x
            for x in os.listxattr(box.out / n, follow_symlinks=False)
            if not x.startswith("security.selinux")
        ]
        assert names == ["security.capability"], names
        assert os.getxattr(box.out / n, "security.capability") == cap


def test_zstd_layer_with_a_wrong_diff_id_leaves_nothing(tmp_path: Path, capsys) -> None:
    # The compressed digest is right, the uncompressed bytes are not the config's diffID.
    t = tar(entry("f", data=b"x"))
    lay = layout(tmp_path / "oci", [(zstandard.ZstdCompressor().compress(t), "+zstd", t + b"\0" * BLOCK)])
    box = Box(tmp_path)
    capsys.readouterr()
    rc = main(["unpack", f"{lay}:t", str(box.out)])
    err = capsys.readouterr().err
    refused(rc, err, box, "digest_mismatch", 7)
    assert "diffID" in err
