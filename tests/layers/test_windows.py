"""windows_entries: BuildKit's winlayers rewrite, checked against Go and against the spec.

golden/windows.json was written by golden/gen.go: a containerd-style stream written with Go's
tar.Writer, read back with tar.Reader and rewritten the way BuildKit's makeWindowsLayer does,
with the Hives/Files time fixed to the epoch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

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
from blobchain.layers.tarheader import encode_header
from blobchain.layers.tarwriter import write_tar
from blobchain.layers.windows import SD_DIR, SD_FILE, windows_entries

GOLDEN = Path(__file__).parent / "golden"
WINDOWS = {c["id"]: c for c in json.loads((GOLDEN / "windows.json").read_text())["cases"]}
CAP = b"\x01\x00\x00\x02\x00\x04" + bytes(14)


class DirSnapshot:
    """Stand-in for layers.snapshot.Snapshot: ``open_file`` over a plain directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open_file(self, rel: bytes) -> int:
        return os.open(os.path.join(bytes(self.root), rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def golden_entries(case: dict[str, Any], root: Path) -> list[TarEntry]:
    out = []
    for i, e in enumerate(case["entries"]):
        source = None
        if e.get("body_hex"):
            source = b"body%d" % i
            (root / source.decode()).write_bytes(bytes.fromhex(e["body_hex"]))
        out.append(
            TarEntry(
                name=bytes.fromhex(e["name_hex"]),
                typeflag=e["typeflag"].encode(),
                mode=e["mode"],
                uid=e["uid"],
                gid=e["gid"],
                size=e["size"],
                mtime=e["mtime"],
                linkname=bytes.fromhex(e["linkname_hex"]),
                devmajor=e["devmajor"],
                devminor=e["devminor"],
                pax={k: bytes.fromhex(v) for k, v in e["pax_hex"].items()},
                source=source,
            )
        )
    return out


def sample() -> list[TarEntry]:
    return [
        TarEntry(name=b"etc/", typeflag=TYPE_DIR, mode=0o755, mtime=1700000000),
        TarEntry(name=b"etc/f", typeflag=TYPE_REG, mode=0o644, size=0, mtime=1700000001, uid=3000000),
        TarEntry(name=b"etc/.wh.gone", typeflag=TYPE_REG, mtime=0),
        TarEntry(
            name=b"cap", typeflag=TYPE_REG, mode=0o755, mtime=5, pax={"SCHILY.xattr.security.capability": CAP}
        ),
        TarEntry(name=b"lnk", typeflag=TYPE_SYMLINK, mode=0o777, linkname=b"../t", mtime=7),
        TarEntry(name=b"hl", typeflag=TYPE_LINK, mode=0o644, linkname=b"etc/f", mtime=8),
        TarEntry(name=b"c", typeflag=TYPE_CHAR, devmajor=1, devminor=3, mtime=9),
        TarEntry(name=b"b", typeflag=TYPE_BLOCK, devmajor=8, devminor=1, mtime=9),
        TarEntry(name=b"p", typeflag=TYPE_FIFO, mtime=9),
    ]


# --- bytes against Go -------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", sorted(WINDOWS))
def test_windows_stream_matches_go(case_id: str, tmp_path: Path) -> None:
    case = WINDOWS[case_id]
    chunks: list[bytes] = []
    entries = windows_entries(golden_entries(case, tmp_path), epoch=case.get("epoch", 0))
    n = write_tar(entries, DirSnapshot(tmp_path), chunks.append)
    data = b"".join(chunks)
    assert data == bytes.fromhex(case["tar_hex"])
    assert n == len(data)
    assert hashlib.sha256(data).hexdigest() == case["sha256"]


# --- structure against the spec ---------------------------------------------------------------


def test_hives_and_files_come_first() -> None:
    out = list(windows_entries([], epoch=1234))
    assert [e.name for e in out] == [b"Hives", b"Files"]
    for e in out:
        assert e.typeflag == TYPE_DIR
        assert e.mode == 0o40000
        assert e.mtime == 1234
        assert e.pax == {"LIBARCHIVE.creationtime": b"1234.0", "MSWINDOWS.fileattr": b"16"}
        h = encode_header(e)
        assert b"mtime=" not in h  # whole-second epoch: no fractional PAX mtime
        assert b"rawsd" not in h


def test_every_entry_is_rewritten_per_type() -> None:
    src = sample()
    out = list(windows_entries(src, epoch=0))[2:]
    assert [e.name for e in out] == [b"Files/" + e.name for e in src]
    by = {e.name[len(b"Files/") :]: e for e in out}

    d = by[b"etc/"]
    assert d.mode == 0o40755
    assert d.pax["MSWINDOWS.fileattr"] == b"16"
    assert d.pax["MSWINDOWS.rawsd"] == SD_DIR

    for name in (b"etc/f", b"etc/.wh.gone", b"cap"):
        f = by[name]
        assert f.mode & 0o170000 == 0o100000
        assert f.pax["MSWINDOWS.fileattr"] == b"32"
        assert f.pax["MSWINDOWS.rawsd"] == SD_FILE
    assert by[b"etc/f"].mode == 0o100644
    assert by[b"etc/.wh.gone"].mode == 0o100000  # whiteouts are regular files too
    assert by[b"cap"].pax["SCHILY.xattr.security.capability"] == CAP  # carried over

    for name in (b"lnk", b"hl", b"c", b"b", b"p"):
        other = by[name]
        assert "MSWINDOWS.fileattr" not in other.pax
        assert "MSWINDOWS.rawsd" not in other.pax
        assert other.pax["LIBARCHIVE.creationtime"] == b"%d.0" % other.mtime
    assert by[b"lnk"].linkname == b"Files/../t"  # symlink targets are prefixed too
    assert by[b"hl"].linkname == b"Files/etc/f"
    assert (by[b"c"].devmajor, by[b"c"].devminor) == (1, 3)

    # Go's creation time is set for any time read back from a tar, Unix 0 included.
    assert by[b"etc/.wh.gone"].pax["LIBARCHIVE.creationtime"] == b"0.0"
    assert by[b"etc/f"].uid == 3000000


def test_input_entries_are_not_modified() -> None:
    src = sample()
    before = [(e.name, e.mode, e.linkname, dict(e.pax)) for e in src]
    list(windows_entries(src))
    assert [(e.name, e.mode, e.linkname, dict(e.pax)) for e in src] == before


def test_bodies_keep_their_source_and_walk_identity() -> None:
    e = TarEntry(name=b"f", typeflag=TYPE_REG, size=9, source=b"x/f", ino=11, dev=12, mtime_ns=13)
    (w,) = list(windows_entries([e]))[2:]
    assert (w.size, w.source, w.ino, w.dev, w.mtime_ns) == (9, b"x/f", 11, 12, 13)


def test_every_header_is_pax_and_records_are_sorted() -> None:
    for e in windows_entries(sample(), epoch=99):
        h = encode_header(e)
        assert h[156:157] == b"x"
        size = int(h[124:135], 8)
        keys = [r.split(b" ", 1)[1].split(b"=", 1)[0] for r in h[512 : 512 + size].splitlines()]
        assert keys == sorted(keys)
        assert keys[0] == b"LIBARCHIVE.creationtime"


def test_deterministic() -> None:
    def render(epoch: int) -> bytes:
        return b"".join(encode_header(e) for e in windows_entries(sample(), epoch=epoch))

    assert render(1700000000) == render(1700000000)
    assert render(1700000000) != render(1700000001)


# --- the security descriptors are the spec's SDDL ---------------------------------------------------

BA, SY, BU, CO = "S-1-5-32-544", "S-1-5-18", "S-1-5-32-545", "S-1-3-0"
OI, CI, IO = 0x1, 0x2, 0x8
FA, GA, READ_EXEC = 0x1F01FF, 0x10000000, 0x1200A9
LC, DC = 0x4, 0x2  # SDDL "LC" (list children) and "DC" (delete child)


def _sid(b: bytes, off: int) -> tuple[str, int]:
    rev, n = b[off], b[off + 1]
    auth = int.from_bytes(b[off + 2 : off + 8], "big")
    subs = struct.unpack_from(f"<{n}I", b, off + 8)
    return f"S-{rev}-{auth}" + "".join(f"-{s}" for s in subs), 8 + 4 * n


def parse_sd(raw: bytes) -> tuple[str, str, list[tuple[int, int, int, str]]]:
    """Self-relative SECURITY_DESCRIPTOR -> (owner, group, [(type, flags, mask, sid)])."""
    rev, _, control, o_owner, o_group, o_sacl, o_dacl = struct.unpack_from("<BBHIIII", raw)
    assert (rev, control, o_sacl) == (1, 0x8004, 0)  # self-relative, DACL present, no SACL
    owner, _ = _sid(raw, o_owner)
    group, _ = _sid(raw, o_group)
    acl_rev, _, acl_size, count, _ = struct.unpack_from("<BBHHH", raw, o_dacl)
    assert acl_rev == 2 and o_dacl + acl_size == len(raw)
    aces, off = [], o_dacl + 8
    for _ in range(count):
        typ, flags, size, mask = struct.unpack_from("<BBHI", raw, off)
        sid, sid_len = _sid(raw, off + 8)
        assert size == 8 + sid_len
        aces.append((typ, flags, mask, sid))
        off += size
    return owner, group, aces


def test_directory_sd_is_the_spec_sddl() -> None:
    # O:BAG:SYD:(A;OICI;FA;;;BA)(A;OICI;FA;;;SY)(A;;FA;;;BA)(A;OICIIO;GA;;;CO)
    #           (A;OICI;0x1200a9;;;BU)(A;CI;LC;;;BU)(A;CI;DC;;;BU)
    assert parse_sd(base64.b64decode(SD_DIR)) == (
        BA,
        SY,
        [
            (0, OI | CI, FA, BA),
            (0, OI | CI, FA, SY),
            (0, 0, FA, BA),
            (0, OI | CI | IO, GA, CO),
            (0, OI | CI, READ_EXEC, BU),
            (0, CI, LC, BU),
            (0, CI, DC, BU),
        ],
    )


def test_file_sd_is_the_spec_sddl() -> None:
    # O:BAG:SYD:(A;;FA;;;BA)(A;;FA;;;SY)(A;;0x1200a9;;;BU)
    assert parse_sd(base64.b64decode(SD_FILE)) == (
        BA,
        SY,
        [(0, 0, FA, BA), (0, 0, FA, SY), (0, 0, READ_EXEC, BU)],
    )
