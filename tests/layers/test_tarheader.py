"""encode_header against Go 1.19.8 archive/tar, byte for byte.

The vectors in golden/ were written by golden/gen.go with go1.19.8 (the toolchain of Debian's
containerd 1.6.20); the tests need no Go. ``python tests/layers/test_tarheader.py --dump-random``
prints the seeded random entries that ``gen.go -random`` turns into golden/random.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blobchain.layers.errors import InvalidArgument
from blobchain.layers.tarentry import (
    TYPE_BLOCK,
    TYPE_CHAR,
    TYPE_DIR,
    TYPE_FIFO,
    TYPE_LINK,
    TYPE_REG,
    TYPE_SYMLINK,
    TarEntry,
)
from blobchain.layers.tarheader import _encode_general, encode_header, go_path_clean, split_ustar_path

GOLDEN = Path(__file__).parent / "golden"
HEADERS = json.loads((GOLDEN / "headers.json").read_text())
CASES = {c["id"]: c for c in HEADERS["cases"]}


def entry_from_json(e: dict[str, Any]) -> TarEntry:
    return TarEntry(
        name=bytes.fromhex(e["name_hex"]),
        typeflag=e["typeflag"].encode("latin-1"),
        mode=e["mode"],
        uid=e["uid"],
        gid=e["gid"],
        size=e["size"],
        mtime=e["mtime"],
        linkname=bytes.fromhex(e["linkname_hex"]),
        devmajor=e["devmajor"],
        devminor=e["devminor"],
        pax={k: bytes.fromhex(v) for k, v in e["pax_hex"].items()},
    )


def entry_to_json(e: TarEntry, whiteout: bool = False) -> dict[str, Any]:
    return {
        "name_hex": e.name.hex(),
        "typeflag": e.typeflag.decode("latin-1"),
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "size": e.size,
        "mtime": e.mtime,
        "linkname_hex": e.linkname.hex(),
        "devmajor": e.devmajor,
        "devminor": e.devminor,
        "pax_hex": {k: v.hex() for k, v in e.pax.items()},
        "whiteout": whiteout,
    }


def checksum_ok(block: bytes) -> bool:
    want = int(block[148:154], 8)
    return block[154:156] == b"\0 " and want == sum(block[:148]) + 8 * 32 + sum(block[156:])


# --- golden vectors from Go -------------------------------------------------------------------


def test_golden_file_is_from_go_1_19() -> None:
    assert HEADERS["go"].startswith("go1.19")
    assert len(CASES) >= 50


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_header_matches_go(case_id: str) -> None:
    case = CASES[case_id]
    got = encode_header(entry_from_json(case["entry"]))
    want = bytes.fromhex(case["header_hex"])
    assert got == want
    assert len(got) % 512 == 0


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_general_path_matches_go_too(case_id: str) -> None:
    # The fast path and the field-by-field path must agree wherever both apply.
    case = CASES[case_id]
    assert _encode_general(entry_from_json(case["entry"])) == bytes.fromhex(case["header_hex"])


@pytest.mark.parametrize("case", HEADERS["errors"], ids=lambda c: c["id"])
def test_refuses_what_go_refuses(case: dict[str, Any]) -> None:
    if case["id"] == "pax_too_big":
        e = TarEntry(name=b"big", typeflag=TYPE_REG, mode=0o644, mtime=1700000000)
        e.pax["SCHILY.xattr.user.big"] = b"v" * (1 << 20)
    else:
        e = entry_from_json(case["entry"])
    with pytest.raises(InvalidArgument):
        encode_header(e)


# --- the spec's observed bytes, spelled out ---------------------------------------------------


def test_biguid_pax_header_as_observed() -> None:
    h = encode_header(
        TarEntry(name=b"biguid", typeflag=TYPE_REG, mode=0o644, uid=3000000, gid=5, size=4, mtime=1700000000)
    )
    assert len(h) == 3 * 512
    pax, data, main = h[:512], h[512:1024], h[1024:]
    assert pax[:20] == b"PaxHeaders.0/biguid\0"
    assert pax[100:124] == b"0000000\0" * 3
    assert pax[124:136] == b"00000000017\0"
    assert pax[136:148] == b"00000000000\0"
    assert pax[148:156] == b"011405\0 "
    assert pax[156:157] == b"x"
    assert pax[329:345] == bytes(16)  # devmajor/devminor left all-NUL
    assert pax[257:265] == b"ustar\x0000"
    assert data == b"15 uid=3000000\n".ljust(512, b"\0")
    assert main[108:116] == b"0000000\0"  # uid overflows -> 0
    assert main[116:124] == b"0000005\0"
    assert main[329:345] == b"0000000\0" * 2
    assert checksum_ok(pax) and checksum_ok(main)


def test_non_ascii_name_drops_runes_in_main_header() -> None:
    h = encode_header(TarEntry(name="ünï.txt".encode(), typeflag=TYPE_REG, mode=0o644, mtime=1))
    assert h[:19] == b"PaxHeaders.0/n.txt\0"
    assert b"path=\xc3\xbcn\xc3\xaf.txt\n" in h[512:1024]
    assert h[1024 : 1024 + 6] == b"n.txt\0"


def test_invalid_utf8_bytes_are_dropped_one_by_one() -> None:
    # "\xc3(" is an invalid sequence: Go drops only \xc3 and keeps "(".
    h = encode_header(TarEntry(name=b"a\xc3(b\xff\x80c", typeflag=TYPE_REG, mtime=1))
    assert h[-512:][:7] == b"a(bc\0\0\0"


def test_capability_record_is_raw_without_hdrcharset() -> None:
    cap = b"\x01\x00\x00\x02\xff\xfe" + bytes(14)
    h = encode_header(
        TarEntry(
            name=b"capfile",
            typeflag=TYPE_REG,
            mode=0o644,
            mtime=1,
            pax={"SCHILY.xattr.security.capability": cap},
        )
    )
    assert b"hdrcharset" not in h
    rec = b"SCHILY.xattr.security.capability=" + cap + b"\n"
    assert h[512:1024].startswith(b"%d " % (len(rec) + 3) + rec)


def test_go_split_point_differs_from_shortest_prefix() -> None:
    name = b"a/" + b"b" * 50 + b"/" + b"c" * 60
    h = encode_header(TarEntry(name=name, typeflag=TYPE_REG, mtime=1))
    assert len(h) == 512
    assert h[:61] == b"c" * 60 + b"\0"
    assert h[345 : 345 + 53] == b"a/" + b"b" * 50 + b"\0"


def test_records_sorted_by_key_bytes() -> None:
    h = encode_header(
        TarEntry(
            name=b"x",
            typeflag=TYPE_REG,
            uid=1 << 22,
            pax={"zz": b"1", "MSWINDOWS.fileattr": b"32", "LIBARCHIVE.creationtime": b"1.0"},
        )
    )
    keys = [rec.split(b" ", 1)[1].split(b"=", 1)[0] for rec in h[512:1024].rstrip(b"\0").splitlines()]
    assert keys == [b"LIBARCHIVE.creationtime", b"MSWINDOWS.fileattr", b"uid", b"zz"]


# --- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "want"),
    [
        (b"", b"."),
        (b"a//b", b"a/b"),
        (b"a/./b/../c", b"a/c"),
        (b"/../a", b"/a"),
        (b"//a", b"/a"),
        (b"../../a/..", b"../.."),
        (b"x/../PaxHeaders.0/y", b"PaxHeaders.0/y"),
        (b"a/b/", b"a/b"),
        (b"/", b"/"),
        (b"..", b".."),
    ],
)
def test_go_path_clean(path: bytes, want: bytes) -> None:
    assert go_path_clean(path) == want


@pytest.mark.parametrize(
    ("name", "want"),
    [
        (b"a" * 100, None),  # fits: no split needed
        (b"a" * 101, None),  # no slash
        (b"p" * 155 + b"/" + b"s" * 100, (b"p" * 155, b"s" * 100)),
        (b"p" * 156 + b"/s", None),  # prefix too long
        (b"a/" + b"b" * 101, None),  # suffix too long
        (b"/" + b"b" * 100, None),  # empty prefix
        (b"d" * 100 + b"/", None),  # the trailing slash of a directory is not a split point
        ("ü/".encode() + b"b" * 100, None),  # non-ASCII never splits
    ],
)
def test_split_ustar_path(name: bytes, want: tuple[bytes, bytes] | None) -> None:
    assert split_ustar_path(name) == want


# --- seeded random entries vs Go ------------------------------------------------------------------

_ASCII_PIECES = [b"a", b"bc", b"/", b"/", b".", b"..", b"-"]
_PIECES = [*_ASCII_PIECES, "é".encode(), "ü".encode(), b"\xff", b"\x80", b"\xc3"]
_TYPES = [TYPE_REG, TYPE_DIR, TYPE_SYMLINK, TYPE_LINK, TYPE_CHAR, TYPE_BLOCK, TYPE_FIFO]


def _random_path(rng: random.Random) -> bytes:
    r = rng.random()
    target = rng.randint(0, 40) if r < 0.5 else rng.randint(95, 160) if r < 0.85 else rng.randint(250, 300)
    pieces = _ASCII_PIECES if rng.random() < 0.7 else _PIECES
    out = b""
    while len(out) < target:
        piece = rng.choice(pieces)
        out += piece * (rng.randint(1, 30) if piece in (b"a", b"bc") else 1)
    return out


def random_entries(seed: int = 20240501, n: int = 1000) -> list[tuple[TarEntry, bool]]:
    """Seeded random headers spread across every format boundary (entry, whiteout)."""
    rng = random.Random(seed)

    def num(common: list[int], edges: list[int]) -> int:
        return rng.choice(common) if rng.random() < 0.9 else rng.choice(edges)

    out = []
    for _ in range(n):
        tf = rng.choice(_TYPES)
        name = _random_path(rng)
        if tf in (TYPE_REG, TYPE_CHAR, TYPE_BLOCK, TYPE_FIFO):
            name = name.rstrip(b"/") or b"f"
        elif tf == TYPE_DIR and rng.random() < 0.7:
            name = name.rstrip(b"/") + b"/"
        link = _random_path(rng) if tf in (TYPE_SYMLINK, TYPE_LINK) else b""
        ids = [(1 << 21) - 1, 1 << 21, rng.randint(0, 1 << 31)]
        e = TarEntry(
            name=name,
            typeflag=tf,
            mode=rng.choice([0, 0o644, 0o755, 0o4755, 0o1777, 0o100644, 0o40755]),
            uid=num([0, 1000], ids),
            gid=num([0, 5], ids),
            size=num([0, 1, 4096], [(1 << 33) - 1, 1 << 33, 1 << 40]) if tf == TYPE_REG else 0,
            mtime=num([0, 1700000000], [(1 << 33) - 1, 1 << 33, -1, -rng.randint(1, 1 << 40)]),
            linkname=link,
            devmajor=rng.randint(0, 4095) if tf in (TYPE_CHAR, TYPE_BLOCK) else 0,
            devminor=rng.randint(0, (1 << 20) - 1) if tf in (TYPE_CHAR, TYPE_BLOCK) else 0,
        )
        keys = ["cap", "uid", "mtime", "path", "atime", "win", "uname"]
        for key in rng.sample(keys, rng.choice([0, 0, 0, 0, 0, 1, 2, 3])):
            if key == "cap":
                e.pax["SCHILY.xattr.security.capability"] = rng.randbytes(rng.choice([20, 24, 63, 64, 300]))
            elif key == "uid":
                e.pax["uid"] = b"%d" % (e.uid if rng.random() < 0.5 else 7)
            elif key == "mtime":
                e.pax["mtime"] = b"%d" % e.mtime
            elif key == "path":
                e.pax["path"] = e.name if rng.random() < 0.5 else b"other"
            elif key == "atime":
                e.pax["atime"] = b"1"
            elif key == "win":
                e.pax["MSWINDOWS.fileattr"] = b"32"
                e.pax["LIBARCHIVE.creationtime"] = b"%d.0" % e.mtime
            else:
                e.pax["uname"] = b""
        out.append((e, rng.random() < 0.1 and not e.pax))
    return out


def _digest(e: TarEntry) -> str:
    try:
        return hashlib.sha256(encode_header(e)).hexdigest()[:16]
    except InvalidArgument:
        return "error"


def test_random_entries_match_go() -> None:
    want = json.loads((GOLDEN / "random.json").read_text())["digests"]
    entries = random_entries()
    assert len(want) == len(entries)
    mismatches = [(i, e) for i, ((e, _), d) in enumerate(zip(entries, want, strict=True)) if _digest(e) != d]
    assert not mismatches, mismatches[:3]
    sizes = [len(encode_header(e)) for e, _ in entries]
    # The mix covers plain USTAR, prefix-split names and PAX entries.
    assert sum(n == 512 for n in sizes) > 250
    assert sum(n == 512 and len(e.name) > 100 for n, (e, _) in zip(sizes, entries, strict=True)) > 20
    assert sum(n > 512 for n in sizes) > 200


# --- properties -------------------------------------------------------------------------------------

_names = st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\0", b"x"))


@settings(max_examples=300, deadline=None)
@given(
    name=_names,
    link=st.binary(max_size=200).map(lambda b: b.replace(b"\0", b"y")),
    uid=st.integers(0, 1 << 32),
    size=st.integers(0, 1 << 40),
    mtime=st.integers(-(1 << 40), 1 << 40),
)
def test_fast_path_agrees_with_general_path(
    name: bytes, link: bytes, uid: int, size: int, mtime: int
) -> None:
    e = TarEntry(
        name=name.rstrip(b"/") or b"f", typeflag=TYPE_REG, uid=uid, size=size, mtime=mtime, linkname=link
    )
    assert encode_header(e) == _encode_general(e)


@settings(max_examples=200, deadline=None)
@given(
    name=_names,
    is_dir=st.booleans(),
    uid=st.integers(0, 1 << 31),
    mtime=st.integers(0, 1 << 34),
    cap=st.none() | st.binary(min_size=1, max_size=40),
)
def test_python_tarfile_reads_back_the_fields(
    name: bytes, is_dir: bool, uid: int, mtime: int, cap: bytes | None
) -> None:
    name = name.rstrip(b"/") or b"x"
    if is_dir:
        name += b"/"
    e = TarEntry(name=name, typeflag=TYPE_DIR if is_dir else TYPE_REG, mode=0o755, uid=uid, mtime=mtime)
    if cap is not None:
        e.pax["SCHILY.xattr.security.capability"] = cap
    h = encode_header(e)
    blocks = [h[i : i + 512] for i in range(0, len(h), 512)]
    assert all(checksum_ok(b) for b in (blocks[0], blocks[-1]))
    with tarfile.open(fileobj=io.BytesIO(h + bytes(1024)), encoding="utf-8", errors="surrogateescape") as tf:
        (m,) = tf.getmembers()
    assert m.name.encode("utf-8", "surrogateescape") == name.rstrip(b"/")  # tarfile strips the slash
    assert (m.uid, m.mtime, m.isdir()) == (uid, mtime, is_dir)
    if cap is not None:
        assert m.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == cap


if __name__ == "__main__":
    if sys.argv[1:] == ["--dump-random"]:
        json.dump([entry_to_json(e, wh) for e, wh in random_entries()], sys.stdout)
