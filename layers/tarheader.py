"""One tar entry -> its header block(s), byte-exact with Go 1.19 ``archive/tar.Writer.WriteHeader``.

The header is the one containerd 1.6.20 builds (``Format = FormatPAX``, no atime/ctime, empty
uname/gname), so the writer picks USTAR unless a field forces PAX (spec §3.1-3.3, §7 rules
17-22). Whiteouts (format left unset in Go) take the same choice for every field we can carry.

Go rules mirrored here, each of which Python's ``tarfile`` gets differently:

- USTAR prefix split at Go's split point (``splitUSTARPath``), not the shortest prefix.
- A PAX ``path``/``linkpath`` record whenever the string is non-ASCII or longer than 100 bytes,
  even when the name could be split (it only matters once PAX is chosen for another reason).
- PAX extended header named ``path.Join(dir, "PaxHeaders.0", base)`` (so ``path.Clean``d),
  ASCII-only, truncated to 100 bytes, trailing slashes trimmed; mode/uid/gid/mtime written as
  octal zeros, devmajor/devminor left all-NUL.
- Records sorted by key bytes, ``"%d %s=%s\\n"`` with a self-counting length, raw values (no
  ``hdrcharset``).
- The main header of a PAX entry carries ``toASCII(name)`` (every byte >= 0x80 and NUL dropped:
  Go decodes invalid UTF-8 one byte at a time into U+FFFD, which is dropped too), truncated with
  Go's trailing-slash rule, no prefix, and 0 in numeric fields that overflow.
- Basic keys (``path``, ``uid``...) in ``TarEntry.pax`` are ignored unless equal to the field's
  own value (then kept); any ``pax`` record forces PAX.

The common case (ASCII names that fit, directly or split, small numbers, no records) is one
``%``-format plus a checksum, a few microseconds per entry.
"""

from __future__ import annotations

import zlib

from blobchain.layers import native as _native
from blobchain.layers.errors import InvalidArgument
from blobchain.layers.tarentry import TYPE_BLOCK, TYPE_CHAR, TYPE_DIR, TYPE_FIFO, TYPE_REG, TarEntry

__all__ = ["BLOCK_SIZE", "MAX_PAX_SIZE", "encode_header", "go_path_clean", "split_ustar_path"]

BLOCK_SIZE = 512
MAX_PAX_SIZE = 1 << 20  # Go's maxSpecialFileSize: larger PAX data is ErrFieldTooLong.

_MAX7 = 1 << 21  # largest value + 1 for a 7-digit octal field (mode, uid, gid, dev*)
_MAX11 = 1 << 33  # ... for an 11-digit one (size, mtime)
_NUL = b"\0"
_ZEROS = bytes(BLOCK_SIZE)
_NON_ASCII = bytes(range(0x80, 0x100)) + _NUL  # what Go's toASCII drops

# Types Go refuses to write with a trailing slash in the name.
_NO_SLASH = frozenset((TYPE_REG, TYPE_CHAR, TYPE_BLOCK, TYPE_FIFO, b"S"))
# Types only the writer itself may emit (PAX/GNU meta headers).
_RESERVED = frozenset((b"x", b"g", b"L", b"K"))
_BASIC_KEYS = frozenset(
    (b"path", b"linkpath", b"size", b"uid", b"gid", b"uname", b"gname", b"mtime", b"atime", b"ctime")
)

# The whole block as one format. Checksum field is 8 spaces while summing; uname and gname are
# always empty (containerd 1.6.20 uses FileInfoHeaderNoLookups).
_BLOCK_FMT = (
    b"%s"  # name (100, padded by the caller)
    b"%07o\0%07o\0%07o\0%011o\0%011o\0"  # mode uid gid size mtime
    b"        "  # chksum placeholder
    b"%s%s"  # typeflag, linkname (100)
    b"ustar\x0000" + bytes(64) + b"%07o\0%07o\0"  # magic, version, uname, gname, devmajor/minor
    b"%s" + bytes(12)  # prefix (155), pad
)

# The PAX extended header block after its name field: mode/uid/gid "0000000\0", size, mtime 0,
# typeflag 'x', empty linkname/uname/gname, devmajor/devminor all NUL, magic "ustar\0" "00".
_PAX_FMT = (
    b"%s"  # name (100)
    + b"0000000\0" * 3  # mode, uid, gid
    + b"%011o\0"  # size
    + b"00000000000\0"  # mtime
    + b"        x"
    + bytes(100)
    + b"ustar\x0000"
    + bytes(32 + 32 + 8 + 8 + 155 + 12)
)


def _finish(block: bytes) -> bytes:
    # The sum of 512 bytes can exceed Adler-32's modulus, but each half cannot (256 * 255 <
    # 65521), so the low words of two adler32 runs give the exact sum at C speed.
    mv = memoryview(block)
    chk = (zlib.adler32(mv[:256]) & 0xFFFF) + (zlib.adler32(mv[256:]) & 0xFFFF) - 2
    return b"%s%06o\0 %s" % (mv[:148], chk, mv[156:])


def _ascii(s: bytes) -> bool:
    # Go's isASCII: every rune < 0x80 and no NUL.
    return s.isascii() and _NUL not in s


def _to_ascii(s: bytes) -> bytes:
    return s if _ascii(s) else s.translate(None, _NON_ASCII)


def _fmt_string(s: bytes, size: int) -> bytes:
    """Go ``formatter.formatString``: copy, NUL-terminate if shorter, truncate if longer.

    When truncated and the field's last byte is '/', the first of the trailing slashes becomes
    NUL (slashes after it stay).
    """
    n = len(s)
    if n < size:
        return s + _ZEROS[: size - n]
    if n == size:
        return s
    b = s[:size]
    if b[-1] == 0x2F:
        k = len(b.rstrip(b"/"))
        b = b[:k] + _NUL + b[k + 1 :]
    return b


def split_ustar_path(name: bytes) -> tuple[bytes, bytes] | None:
    """Go ``splitUSTARPath``: ``(prefix, suffix)`` or None when the name cannot be split.

    The split is at the last '/' within the first 156 bytes (or within the whole name minus a
    final '/' when it is 156 bytes or shorter); prefix 1..155 bytes, suffix 1..100 bytes.
    """
    length = len(name)
    if length <= 100 or not _ascii(name):
        return None
    if length > 156:
        length = 156
    elif name[length - 1] == 0x2F:
        length -= 1
    i = name.rfind(b"/", 0, length)
    nlen = len(name) - i - 1
    if i <= 0 or nlen > 100 or nlen == 0 or i > 155:
        return None
    return name[:i], name[i + 1 :]


def go_path_clean(p: bytes) -> bytes:
    """Go ``path.Clean`` on raw bytes (component form; equivalent to Go's lazybuf walk)."""
    if not p:
        return b"."
    rooted = p[:1] == b"/"
    out: list[bytes] = []
    for part in p.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out and out[-1] != b"..":
                out.pop()
            elif not rooted:
                out.append(part)
            continue
        out.append(part)
    joined = b"/".join(out)
    if rooted:
        return b"/" + joined
    return joined or b"."


def _pax_name(name: bytes) -> bytes:
    # path.Split then path.Join(dir, "PaxHeaders.0", file); Join skips a leading empty dir.
    i = name.rfind(b"/")
    dir_, file = name[: i + 1], name[i + 1 :]
    joined = go_path_clean((dir_ + b"/" if dir_ else b"") + b"PaxHeaders.0/" + file)
    return _to_ascii(joined)[:100].rstrip(b"/")


def _pax_record(key: bytes, value: bytes) -> bytes:
    # Go formatPAXRecord: the length counts its own digits.
    size = len(key) + len(value) + 3
    size += len(b"%d" % size)
    rec = b"%d %s=%s\n" % (size, key, value)
    if len(rec) != size:
        rec = b"%d %s=%s\n" % (len(rec), key, value)
    return rec


def _octal_or_zero(n: int, limit: int) -> int:
    return n if 0 <= n < limit else 0


def _bad(msg: str, e: TarEntry, **details: object) -> InvalidArgument:
    return InvalidArgument(f"cannot encode tar header for {e.name!r}: {msg}", name=e.name, **details)


def encode_header(e: TarEntry) -> bytes:
    """The header block(s) Go 1.19 ``tar.Writer.WriteHeader`` writes for ``e``.

    One 512-byte USTAR block, or a PAX extended header (block + records padded to 512) followed
    by the main block. Raises :class:`InvalidArgument` for headers Go would refuse (NUL in a
    name, a regular/device/FIFO name ending in '/', mode or device numbers out of range,
    invalid PAX keys, PAX data over 1 MiB, negative size).
    """
    name = e.name
    link = e.linkname
    tf = e.typeflag
    mode, uid, gid, size, mtime = e.mode, e.uid, e.gid, e.size, e.mtime
    lib = _native.lib
    if lib is not None and not e.pax:
        # The same USTAR fast path in C; None means "not that case", decided below as before.
        block = lib.ustar_header(name, mode, uid, gid, size, mtime, tf, link, e.devmajor, e.devminor)
        if block is not None:
            return block
    if (
        not e.pax
        and len(link) <= 100
        and len(tf) == 1
        and _ascii(name)
        and (not link or _ascii(link))
        and 0 <= mode < _MAX7
        and 0 <= uid < _MAX7
        and 0 <= gid < _MAX7
        and 0 <= size < _MAX11
        and 0 <= mtime < _MAX11
        and 0 <= e.devmajor < _MAX7
        and 0 <= e.devminor < _MAX7
        and not (tf in _NO_SLASH and name[-1:] == b"/")
        and tf not in _RESERVED
        and tf != _NUL
    ):
        prefix = b""
        if len(name) > 100:
            split = split_ustar_path(name)
            if split is None:
                return _encode_general(e)
            prefix, name = split
        return _finish(
            _BLOCK_FMT
            % (
                name + _ZEROS[: 100 - len(name)],
                mode,
                uid,
                gid,
                size,
                mtime,
                tf,
                link + _ZEROS[: 100 - len(link)],
                e.devmajor,
                e.devminor,
                prefix + _ZEROS[: 155 - len(prefix)],
            )
        )
    return _encode_general(e)


def _encode_general(e: TarEntry) -> bytes:
    """Go ``allowedFormats`` + ``writeUSTARHeader``/``writePAXHeader``, field by field."""
    name, link, tf = e.name, e.linkname, e.typeflag
    mode, uid, gid, size, mtime = e.mode, e.uid, e.gid, e.size, e.mtime
    if len(tf) != 1:
        raise _bad("typeflag must be one byte", e, typeflag=tf)
    if tf == _NUL:  # Go promotes the legacy TypeRegA
        tf = TYPE_DIR if name.endswith(b"/") else TYPE_REG
    if tf in _RESERVED:
        raise _bad("typeflag is reserved for the writer", e, typeflag=tf)
    if tf in _NO_SLASH and name.endswith(b"/"):
        raise _bad("filename may not have trailing slash", e)
    if size < 0:
        raise _bad("negative size", e, size=size)
    for field, value in (("mode", mode), ("devmajor", e.devmajor), ("devminor", e.devminor)):
        if not 0 <= value < _MAX7:  # no PAX key exists for these
            raise _bad(f"{field} does not fit", e, **{field: value})

    given = {k.encode("utf-8", "surrogateescape"): v for k, v in e.pax.items()}
    pax: dict[bytes, bytes] = {}
    ustar = not given  # any PAXRecords => PAX only

    for key, s in ((b"path", name), (b"linkpath", link)):
        if not _ascii(s) or len(s) > 100:
            if key != b"path" or split_ustar_path(s) is None:
                ustar = False
            pax[key] = s
        if given.get(key) == s:
            pax[key] = s
    for key in (b"uname", b"gname"):  # always empty
        if given.get(key) == b"":
            pax[key] = b""
    for key, n, limit in ((b"uid", uid, _MAX7), (b"gid", gid, _MAX7), (b"size", size, _MAX11)):
        text = b"%d" % n
        if not 0 <= n < limit:
            ustar = False
            pax[key] = text
        if given.get(key) == text:
            pax[key] = text
    # ModTime is never Go's zero time here (containerd sets time.Unix(sec, 0)); whole seconds,
    # so a record appears only when the field cannot hold it.
    text = b"%d" % mtime
    if not 0 <= mtime < _MAX11:
        ustar = False
        pax[b"mtime"] = text
    if given.get(b"mtime") == text:
        pax[b"mtime"] = text
    for k, v in given.items():
        if k not in pax and k not in _BASIC_KEYS and not k.startswith(b"GNU.sparse."):
            pax[k] = v
    for k, v in pax.items():
        if not k or b"=" in k or _NUL in k:
            raise _bad("invalid PAX key", e, key=k)
        if k in (b"path", b"linkpath", b"uname", b"gname") and _NUL in v:
            raise _bad(f"NUL byte in {k.decode()}", e)

    if ustar:
        split = split_ustar_path(name)
        prefix = b""
        if split is not None:
            prefix, name = split
        return _finish(
            _BLOCK_FMT
            % (
                _fmt_string(name, 100),
                mode,
                uid,
                gid,
                size,
                mtime,
                tf,
                _fmt_string(link, 100),
                e.devmajor,
                e.devminor,
                _fmt_string(prefix, 155),
            )
        )

    parts: list[bytes] = []
    if pax:
        data = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
        if len(data) > MAX_PAX_SIZE:
            raise _bad("PAX records exceed 1 MiB", e, pax_size=len(data))
        parts.append(_finish(_PAX_FMT % (_fmt_string(_pax_name(name), 100), len(data))))
        parts.append(data)
        parts.append(_ZEROS[: -len(data) % BLOCK_SIZE])
    parts.append(
        _finish(
            _BLOCK_FMT
            % (
                _fmt_string(_to_ascii(name), 100),
                mode,
                _octal_or_zero(uid, _MAX7),
                _octal_or_zero(gid, _MAX7),
                _octal_or_zero(size, _MAX11),
                _octal_or_zero(mtime, _MAX11),
                tf,
                _fmt_string(_to_ascii(link), 100),
                e.devmajor,
                e.devminor,
                _ZEROS[:155],
            )
        )
    )
    return b"".join(parts)
